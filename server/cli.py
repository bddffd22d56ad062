"""The ``edgeloop`` operator CLI: talks to the server over HTTP.

edgeloop --server URL devices list
edgeloop rollouts approve 3 --as alice
edgeloop keys init ./keys
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Operate an edgeloop server.", no_args_is_help=True)
devices_app = typer.Typer(help="Devices.", no_args_is_help=True)
models_app = typer.Typer(help="Model lines and versions.", no_args_is_help=True)
rollouts_app = typer.Typer(help="Staged rollouts.", no_args_is_help=True)
jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
keys_app = typer.Typer(help="Signing keys.", no_args_is_help=True)
for sub, name in (
    (devices_app, "devices"),
    (models_app, "models"),
    (rollouts_app, "rollouts"),
    (jobs_app, "jobs"),
    (keys_app, "keys"),
):
    app.add_typer(sub, name=name)

console = Console()
err_console = Console(stderr=True)
TIMEOUT_S = 30.0  # seconds per HTTP request


class _State:
    server: str = "http://127.0.0.1:8000"


state = _State()


@app.callback()
def _main(
    server: Annotated[
        str,
        typer.Option(
            "--server", envvar="EDGELOOP_SERVER_URL", help="Base URL of the edgeloop server."
        ),
    ] = "http://127.0.0.1:8000",
) -> None:
    state.server = server.rstrip("/")


def _call(method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
    try:
        resp = httpx.request(
            method, state.server + path, json=json, params=params, timeout=TIMEOUT_S
        )
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach {state.server}: {exc}[/red]")
        raise typer.Exit(2) from exc
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        err_console.print(f"[red]error {resp.status_code}: {detail}[/red]")
        raise typer.Exit(1)
    return resp.json()


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(table)


@devices_app.command("list")
def devices_list(line: Annotated[str | None, typer.Option("--line")] = None) -> None:
    rows = _call("GET", "/api/v1/devices", params={"model_line": line} if line else None)
    _table(
        "devices",
        rows,
        ["device_id", "model_line", "state", "model_version", "release", "last_seen"],
    )


@models_app.command("list")
def models_list(line: str) -> None:
    info = _call("GET", f"/api/v1/model-lines/{line}")
    console.print(
        f"[bold]{line}[/bold] champion v{info['champion_version']} "
        f"release {info['current_release']} new samples "
        f"{info['new_samples']}/{info['retrain_threshold']}"
    )
    rows = _call("GET", f"/api/v1/model-lines/{line}/versions")
    for r in rows:
        golden = ((r.get("metrics") or {}).get("challenger") or {}).get("golden_accuracy")
        r["golden_accuracy"] = golden
    _table(
        "versions",
        rows,
        [
            "version",
            "status",
            "parent_version",
            "dataset_version",
            "golden_accuracy",
            "sample_count",
            "created_at",
        ],
    )


@rollouts_app.command("list")
def rollouts_list() -> None:
    rows = _call("GET", "/api/v1/rollouts")
    _table(
        "rollouts",
        rows,
        [
            "id",
            "model_line",
            "from_version",
            "to_version",
            "state",
            "release",
            "rollback_release",
            "reason",
        ],
    )


@rollouts_app.command("show")
def rollouts_show(rollout_id: int) -> None:
    r = _call("GET", f"/api/v1/rollouts/{rollout_id}")
    console.print_json(data=r)


@rollouts_app.command("approve")
def rollouts_approve(
    rollout_id: int, approver: Annotated[str, typer.Option("--as", help="Who approves.")]
) -> None:
    r = _call("POST", f"/api/v1/rollouts/{rollout_id}/approve", json={"approver": approver})
    console.print(f"rollout {rollout_id}: {r['state']} (release {r['release']})")


def _action(rollout_id: int, action: str, reason: str | None) -> None:
    body: dict[str, Any] = {"reason": reason} if reason else {}
    r = _call("POST", f"/api/v1/rollouts/{rollout_id}/{action}", json=body)
    console.print(f"rollout {rollout_id}: {r['state']}")


@rollouts_app.command("pause")
def rollouts_pause(rollout_id: int) -> None:
    _action(rollout_id, "pause", None)


@rollouts_app.command("resume")
def rollouts_resume(rollout_id: int) -> None:
    _action(rollout_id, "resume", None)


@rollouts_app.command("abort")
def rollouts_abort(
    rollout_id: int, reason: Annotated[str | None, typer.Option("--reason")] = None
) -> None:
    _action(rollout_id, "abort", reason)


@jobs_app.command("list")
def jobs_list(line: Annotated[str | None, typer.Option("--line")] = None) -> None:
    rows = _call("GET", "/api/v1/training-jobs", params={"model_line": line} if line else None)
    _table(
        "training jobs",
        rows,
        [
            "id",
            "model_line",
            "status",
            "trigger",
            "sample_count",
            "result_version",
            "created_at",
            "error",
        ],
    )


@jobs_app.command("trigger")
def jobs_trigger(line: str) -> None:
    job = _call("POST", "/api/v1/training-jobs", json={"model_line": line})
    console.print(f"queued training job {job['id']} for {line}")


@keys_app.command("init")
def keys_init(directory: Path, force: Annotated[bool, typer.Option("--force")] = False) -> None:
    """Generate an Ed25519 signing key (signing.pem) and its public key (signing.pub.pem)."""
    from server.signing import write_key_pair

    private = directory / "signing.pem"
    if private.exists() and not force:
        err_console.print(f"[red]{private} exists; use --force to replace it[/red]")
        raise typer.Exit(1)
    pub = write_key_pair(private)
    console.print(f"wrote {private} (keep secret) and {pub} (give to devices)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
