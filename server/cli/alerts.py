"""``edgeloop alerts``: monitoring alerts (list, show, ack) and the windows behind them."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from server.cli import base
from server.cli.base import console, table

app = typer.Typer(help="Monitoring alerts: drift, accuracy, latency, errors.", no_args_is_help=True)

ALERT_COLUMNS = [
    "id",
    "rule",
    "model_line",
    "model_version",
    "group",
    "state",
    "last_window",
    "value",
    "retrain_job_id",
    "acknowledged_by",
]


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@app.command("list")
def alerts_list(
    line: Annotated[str | None, typer.Option("--line", help="Model line.")] = None,
    version: Annotated[int | None, typer.Option("--version", help="Model version.")] = None,
    group: Annotated[
        str | None, typer.Option("--group", help="Device group ('*': a version's fleet).")
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(
            "--rule", help="drift, estimated_accuracy, live_accuracy, latency or error_rate."
        ),
    ] = None,
    state: Annotated[str | None, typer.Option("--state", help="raised or cleared.")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 100,
) -> None:
    """Alerts, newest first."""
    rows = base.call(
        "GET",
        "/api/v1/alerts",
        params=_params(
            model_line=line, model_version=version, group=group, rule=rule, state=state, limit=limit
        ),
    )
    table("alerts", rows, ALERT_COLUMNS)


@app.command("show")
def alerts_show(alert_id: int) -> None:
    """One alert: the figures of the window that raised it, its training and webhook."""
    a = base.call("GET", f"/api/v1/alerts/{alert_id}")
    if base.state.json:
        print(json.dumps(a, default=str))
        return
    console.print(
        f"[bold]alert {a['id']}[/bold] {a['rule']} {a['state']}  {a['model_line']} "
        f"v{a['model_version']} group {a['group']}",
        highlight=False,
    )
    console.print(
        f"windows {a['first_window']} .. {a['last_window']}  raised {a['raised_at']}"
        + (f"  cleared {a['cleared_at']}" if a.get("cleared_at") else ""),
        highlight=False,
    )
    f = a.get("figures") or {}
    drifted = (f.get("drift") or {}).get("drifted") or []
    console.print(
        f"samples {f.get('samples')}  drifted {', '.join(drifted) or '-'}  estimated accuracy "
        f"{_num(f.get('estimated_accuracy'))} (reference {_num(f.get('reference_accuracy'))})  "
        f"live {_num(f.get('live_accuracy'))}  p95 {_num(f.get('latency_p95_ms'))} ms  "
        f"error rate {_num(f.get('error_rate'))}",
        highlight=False,
    )
    if a.get("acknowledged_by"):
        console.print(
            f"acknowledged by {a['acknowledged_by']} at {a['acknowledged_at']}"
            + (f": {a['ack_note']}" if a.get("ack_note") else ""),
            highlight=False,
        )
    if a.get("retrain_job_id") is not None:
        console.print(f"training job {a['retrain_job_id']} queued by this alert", highlight=False)
    elif a.get("retrain_note"):
        console.print(f"no training: {a['retrain_note']}", highlight=False)
    if a.get("deliveries"):
        table(
            "webhook deliveries",
            a["deliveries"],
            ["id", "event", "status", "attempts", "last_status", "last_error", "delivered_at"],
        )


@app.command("ack")
def alerts_ack(
    alert_id: int,
    note: Annotated[
        str | None, typer.Option("--note", help="What you are doing about it (audited).")
    ] = None,
) -> None:
    """Acknowledge a raised alert (operator role): recorded with your name, audited, sent to
    the webhook. The alert stays raised until clean windows clear it; its training goes on."""
    body = {"note": note} if note is not None else {}
    a = base.call("POST", f"/api/v1/alerts/{alert_id}/acknowledge", json=body)
    if base.state.json:
        print(json.dumps(a, default=str))
        return
    console.print(
        f"alert {a['id']} {a['rule']} on {a['model_line']} v{a['model_version']} group "
        f"{a['group']}: acknowledged by {a['acknowledged_by']} at {a['acknowledged_at']} "
        f"(still {a['state']})",
        highlight=False,
    )


@app.command("windows")
def alerts_windows(
    line: str,
    version: Annotated[int | None, typer.Option("--version")] = None,
    group: Annotated[str | None, typer.Option("--group")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
) -> None:
    """The monitoring windows of a line, newest first (per version and group)."""
    rows = base.call(
        "GET",
        f"/api/v1/model-lines/{line}/monitoring/windows",
        params=_params(version=version, group=group, limit=limit),
    )
    table(
        "monitoring windows",
        rows,
        [
            "window_start",
            "model_version",
            "group",
            "devices",
            "samples",
            "drift_ratio",
            "drifted",
            "estimated_accuracy",
            "live_accuracy",
            "latency_p95_ms",
            "errors",
            "breaches",
        ],
    )


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"
