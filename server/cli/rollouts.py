"""``edgeloop rollouts``: list, inspect, approve, pause, resume, abort, roll back, watch."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.live import Live

from server.cli import base
from server.cli.base import console, table
from server.rollout.watch import finished, frame

app = typer.Typer(help="Staged rollouts.", no_args_is_help=True)


@app.command("list")
def rollouts_list() -> None:
    rows = base.call("GET", "/api/v1/rollouts")
    table(
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


@app.command("show")
def rollouts_show(rollout_id: int) -> None:
    r = base.call("GET", f"/api/v1/rollouts/{rollout_id}")
    console.print_json(data=r)


@app.command("approve")
def rollouts_approve(
    rollout_id: int,
    approver: Annotated[
        str | None,
        typer.Option("--as", help="Optional: must be the token's operator (checked)."),
    ] = None,
) -> None:
    body = {"approver": approver} if approver else {}
    r = base.call("POST", f"/api/v1/rollouts/{rollout_id}/approve", json=body)
    console.print(f"rollout {rollout_id}: {r['state']} (release {r['release']})")


def _action(rollout_id: int, action: str, reason: str | None) -> None:
    body: dict[str, Any] = {"reason": reason} if reason else {}
    r = base.call("POST", f"/api/v1/rollouts/{rollout_id}/{action}", json=body)
    console.print(f"rollout {rollout_id}: {r['state']}")


@app.command("pause")
def rollouts_pause(rollout_id: int) -> None:
    _action(rollout_id, "pause", None)


@app.command("resume")
def rollouts_resume(rollout_id: int) -> None:
    _action(rollout_id, "resume", None)


@app.command("abort")
def rollouts_abort(
    rollout_id: int, reason: Annotated[str | None, typer.Option("--reason")] = None
) -> None:
    _action(rollout_id, "abort", reason)


@app.command("rollback")
def rollouts_rollback(
    rollout_id: int, reason: Annotated[str | None, typer.Option("--reason")] = None
) -> None:
    """Everyone back to the previous model (a new signed release), also after completion."""
    _action(rollout_id, "rollback", reason)


@app.command("watch")
def rollouts_watch(
    rollout_id: int,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds.")] = 1.0,
) -> None:
    """Live progress per wave; exits when the rollout completes, rolls back or is aborted."""
    detail = base.call("GET", f"/api/v1/rollouts/{rollout_id}")
    if once or finished(detail):
        console.print(frame(detail))
        return
    with Live(frame(detail), console=console, refresh_per_second=4) as live:
        while not finished(detail):
            time.sleep(interval)
            detail = base.call("GET", f"/api/v1/rollouts/{rollout_id}")
            live.update(frame(detail))
