"""``edgeloop devices``: list devices, issue bootstrap tokens, revoke a device."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from server.cli import base
from server.cli.base import console, table

app = typer.Typer(help="Devices.", no_args_is_help=True)


@app.command("list")
def devices_list(line: Annotated[str | None, typer.Option("--line")] = None) -> None:
    rows = base.call("GET", "/api/v1/devices", params={"model_line": line} if line else None)
    table(
        "devices",
        rows,
        ["device_id", "model_line", "state", "model_version", "release", "last_seen"],
    )


@app.command("enroll-token")
def devices_enroll_token(
    uses: Annotated[int, typer.Option("--uses", help="Devices it may enroll.")] = 1,
    ttl_s: Annotated[float | None, typer.Option("--ttl-s", help="Lifetime, seconds.")] = None,
    line: Annotated[str | None, typer.Option("--line", help="Pin the model line.")] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="Allowed group.")] = None,
) -> None:
    body: dict[str, Any] = {"max_uses": uses, "groups": group or []}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    if line is not None:
        body["model_line"] = line
    r = base.call("POST", "/api/v1/enrollment-tokens", json=body)
    console.print(f"bootstrap token {r['id']} ({r['max_uses']} uses, until {r['expires_at']}):")
    console.print(r["token"], markup=False, highlight=False)


@app.command("revoke")
def devices_revoke(device_id: str) -> None:
    base.call("POST", f"/api/v1/devices/{device_id}/revoke")
    console.print(f"device {device_id} revoked")
