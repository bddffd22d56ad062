"""The ``edgeloop`` operator CLI: talks to the server over HTTP.

edgeloop --server URL devices list
edgeloop --token $EDGELOOP_TOKEN rollouts approve 3   # who approves: the token's operator
edgeloop tokens create --name alice --role approver    # admin: a token, printed once
edgeloop devices enroll-token --uses 50                # operator: a bootstrap token
edgeloop devices revoke cam-7
edgeloop broker write-config --out ./broker            # passwd + acl from the database
edgeloop models show digits 3            # metrics and the gate report
edgeloop models alias digits champion
edgeloop lineage model digits 3          # model -> dataset -> samples -> devices
edgeloop lineage sample SAMPLE_ID        # sample -> datasets -> models
edgeloop keys init ./keys
edgeloop releases export digits 7 ./bundle   # for `edgeloop-agent install ./bundle` offline
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
lineage_app = typer.Typer(help="Which data made which model, and back.", no_args_is_help=True)
releases_app = typer.Typer(help="Signed releases.", no_args_is_help=True)
for sub, name in (
    (devices_app, "devices"),
    (models_app, "models"),
    (rollouts_app, "rollouts"),
    (jobs_app, "jobs"),
    (keys_app, "keys"),
    (lineage_app, "lineage"),
    (releases_app, "releases"),
):
    app.add_typer(sub, name=name)

console = Console()
err_console = Console(stderr=True)
TIMEOUT_S = 30.0  # seconds per HTTP request


class _State:
    server: str = "http://127.0.0.1:8000"
    token: str = ""  # operator bearer token (--token / EDGELOOP_TOKEN)


state = _State()


@app.callback()
def _main(
    server: Annotated[
        str,
        typer.Option(
            "--server", envvar="EDGELOOP_SERVER_URL", help="Base URL of the edgeloop server."
        ),
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str,
        typer.Option("--token", envvar="EDGELOOP_TOKEN", help="Operator bearer token."),
    ] = "",
) -> None:
    state.server = server.rstrip("/")
    state.token = token


def _call(method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
    try:
        headers = {"Authorization": f"Bearer {state.token}"} if state.token else {}
        resp = httpx.request(
            method,
            state.server + path,
            json=json,
            params=params,
            headers=headers,
            timeout=TIMEOUT_S,
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


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def _print_report(r: dict[str, Any]) -> None:
    report = r.get("report") or {}
    metrics = report.get("metrics") or {}
    console.print(
        f"[bold]{r['line']} v{r['version']}[/bold] {r['status']}  trainer {r['trainer']}  "
        f"dataset {str(r.get('dataset_version'))[:16]}  sha256 {str(r.get('sha256'))[:16]}"
    )
    rows = []
    for who in ("challenger", "champion"):
        m = metrics.get(who) or {}
        if m:
            rows.append(
                {
                    "model": who,
                    **{
                        k: _num(m.get(k))
                        for k in (
                            "golden_accuracy",
                            "golden_macro_f1",
                            "golden_roc_auc",
                            "golden_ece",
                            "field_accuracy",
                            "field_macro_f1",
                        )
                    },
                }
            )
    if rows:
        _table("metrics", rows, list(rows[0]))
    gate = report.get("gate") or {}
    console.print(f"gate: {gate.get('reason') or report.get('reason') or r.get('reason')}")
    failed = [c for c in gate.get("checks") or [] if not c.get("passed")]
    for c in failed:
        console.print(f"  [red]failed[/red] {c.get('check')}: {c.get('detail') or c}")
    repro = report.get("reproducibility")
    if repro:
        console.print(
            f"reproducibility: dataset {repro['dataset_version'][:16]} config "
            f"{repro['config_sha256'][:16]} seed {repro['seed']} -> metrics "
            f"{repro['metrics_sha256'][:16]}"
        )


@models_app.command("show")
def models_show(line: str, version: int) -> None:
    """One version: metrics (golden and field), the gate verdict and reproducibility."""
    _print_report(_call("GET", f"/api/v1/model-lines/{line}/versions/{version}"))


@models_app.command("alias")
def models_alias(line: str, alias: str) -> None:
    """The version an alias (champion, candidate, latest) points at."""
    _print_report(_call("GET", f"/api/v1/model-lines/{line}/aliases/{alias}"))


def _print_lineage_models(models: list[dict[str, Any]]) -> None:
    _table(
        "model versions",
        [{**m, "dataset_version": str(m.get("dataset_version"))[:16]} for m in models],
        ["line", "version", "status", "trainer", "dataset_version", "job_id", "gate_reason"],
    )


@lineage_app.command("model")
def lineage_model(
    line: str,
    version: int,
    samples: Annotated[int, typer.Option("--samples", help="Sample ids to list.")] = 20,
) -> None:
    """Model version -> dataset version -> samples -> contributing devices."""
    r = _call(
        "GET",
        f"/api/v1/model-lines/{line}/versions/{version}/lineage",
        params={"sample_limit": samples},
    )
    m, ds = r["model"], r.get("dataset")
    console.print(
        f"[bold]{m['line']} v{m['version']}[/bold] ({m['status']}) trained by job "
        f"{m['job_id']} with {m['trainer']}"
    )
    if ds is None:
        console.print("no stored dataset version for this model")
        return
    console.print(
        f"dataset {ds['version']}\n  base {ds['base']} ({ds['base_sha256'][:16]}), "
        f"{ds['sample_count']} samples: {r['sample_counts']['train']} train, "
        f"{r['sample_counts']['field']} field (field fraction {ds['field_fraction']:g}), "
        f"{ds['rejected_count']} rejected"
    )
    _table("devices", r["devices"], ["device_id", "samples"])
    _table(f"samples (first {samples})", r["samples"], ["sample_id", "role", "device_id"])


@lineage_app.command("sample")
def lineage_sample(sample_id: str) -> None:
    """Sample -> dataset versions holding it -> model versions trained on them."""
    r = _call("GET", f"/api/v1/samples/{sample_id}/lineage")
    s = r["sample"]
    console.print(
        f"[bold]sample {s['sample_id']}[/bold] from device {s['device_id']} "
        f"({s['model_line']}), label {s['true_label']}, received {s['received_at']}"
    )
    _table("dataset versions", r["datasets"], ["version", "role", "created_at"])
    _print_lineage_models(r["models"])


@lineage_app.command("device")
def lineage_device(device_id: str) -> None:
    """Device -> its samples -> dataset versions -> model versions."""
    r = _call("GET", f"/api/v1/devices/{device_id}/lineage")
    console.print(f"[bold]device {device_id}[/bold]: {r['samples']} accepted samples")
    _table("dataset versions", r["datasets"], ["version", "samples"])
    _print_lineage_models(r["models"])


@lineage_app.command("dataset")
def lineage_dataset(version: str) -> None:
    """Dataset version -> its manifest, models, devices."""
    r = _call("GET", f"/api/v1/datasets/{version}", params={"sample_limit": 0})
    ds = r["dataset"]
    console.print(
        f"[bold]dataset {ds['version']}[/bold]: base {ds['base']}, {ds['sample_count']} "
        f"samples ({r['sample_counts']['train']} train, {r['sample_counts']['field']} field)"
    )
    _table("devices", r["devices"], ["device_id", "samples"])
    _print_lineage_models(r["models"])


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
    rollout_id: int,
    approver: Annotated[
        str | None,
        typer.Option("--as", help="Optional: must be the token's operator (checked)."),
    ] = None,
) -> None:
    body = {"approver": approver} if approver else {}
    r = _call("POST", f"/api/v1/rollouts/{rollout_id}/approve", json=body)
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


@rollouts_app.command("rollback")
def rollouts_rollback(
    rollout_id: int, reason: Annotated[str | None, typer.Option("--reason")] = None
) -> None:
    """Everyone back to the previous model (a new signed release), also after completion."""
    _action(rollout_id, "rollback", reason)


@rollouts_app.command("watch")
def rollouts_watch(
    rollout_id: int,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds.")] = 1.0,
) -> None:
    """Live progress per wave; exits when the rollout completes, rolls back or is aborted."""
    import time

    from rich.live import Live

    from server.rollout.watch import finished, frame

    detail = _call("GET", f"/api/v1/rollouts/{rollout_id}")
    if once or finished(detail):
        console.print(frame(detail))
        return
    with Live(frame(detail), console=console, refresh_per_second=4) as live:
        while not finished(detail):
            time.sleep(interval)
            detail = _call("GET", f"/api/v1/rollouts/{rollout_id}")
            live.update(frame(detail))


@releases_app.command("export")
def releases_export(
    line: str,
    release: Annotated[int, typer.Argument(min=1)],
    directory: Path,
) -> None:
    """Write release N of LINE, its artifact and the root chain into DIRECTORY, for an offline
    install (`edgeloop-agent install DIRECTORY`). Layout: docs/bundle-format.md, section 8."""
    from datetime import UTC, datetime

    from server.release.export import (
        ExportError,
        check_release,
        prepare_directory,
        write_artifact,
        write_bundle,
    )

    rel = _call("GET", f"/api/v1/model-lines/{line}/releases/{release}")
    roots = _call("GET", "/api/v1/trust/roots")["roots"]
    now = datetime.now(UTC)
    try:
        manifest = check_release(rel["envelope"], roots, line=line, release=release, now=now)
        prepare_directory(directory)
        with _stream(f"/api/v1/artifacts/{manifest.artifact.sha256}") as resp:
            write_artifact(directory, manifest, resp.iter_bytes())
        index = write_bundle(
            directory,
            envelope=rel["envelope"],
            roots=roots,
            manifest=manifest,
            exported_at=now,
            exported_from=state.server,
        )
    except ExportError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(
        f"exported {line} release {release} (model version {manifest.model_version}, "
        f"{manifest.artifact.size} bytes, sha256 {manifest.artifact.sha256[:16]}) with root "
        f"v1..v{len(index.roots)} into {directory}"
    )


@contextmanager
def _stream(path: str) -> Iterator[httpx.Response]:
    """A streamed GET on the server (same token and error handling as ``_call``)."""
    headers = {"Authorization": f"Bearer {state.token}"} if state.token else {}
    try:
        with httpx.stream("GET", state.server + path, headers=headers, timeout=TIMEOUT_S) as resp:
            if resp.status_code >= 400:
                resp.read()
                err_console.print(f"[red]error {resp.status_code}: {resp.text[:500]}[/red]")
                raise typer.Exit(1)
            yield resp
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach {state.server}: {exc}[/red]")
        raise typer.Exit(2) from exc


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
            "attempts",
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
    from server.release.signing import write_key_pair

    private = directory / "signing.pem"
    if private.exists() and not force:
        err_console.print(f"[red]{private} exists; use --force to replace it[/red]")
        raise typer.Exit(1)
    pub = write_key_pair(private)
    console.print(f"wrote {private} (keep secret) and {pub} (give to devices)")


def _register_trust_commands() -> None:
    from server.cli.keys import register

    register(keys_app)


_register_trust_commands()


def _register_auth_commands() -> None:
    from server.cli.auth import register

    register(app, devices_app, call=_call, console=console)


_register_auth_commands()


def _register_audit_commands() -> None:
    from server.cli.audit import register

    register(app, call=_call, console=console, err_console=err_console)


_register_audit_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
