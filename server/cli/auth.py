"""Identity commands of the ``edgeloop`` CLI: operator tokens, bootstrap tokens, revocation,
and the Mosquitto files.

``tokens``/``devices`` commands go through the server's API with the caller's ``--token``;
``broker write-config`` reads the database directly (it runs next to the server, like a
migration) so the broker can be configured before the server first starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from server.identity.auth import Role


def register(
    app: typer.Typer,
    devices_app: typer.Typer,
    *,
    call: Callable[..., Any],
    console: Console,
) -> None:
    """Add ``tokens``, ``broker`` and the ``devices`` identity commands to the CLI."""
    tokens_app = typer.Typer(help="Operator tokens (admin).", no_args_is_help=True)
    broker_app = typer.Typer(help="Mosquitto password file and ACL.", no_args_is_help=True)
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(broker_app, name="broker")

    @app.command("whoami")
    def whoami() -> None:
        me = call("GET", "/api/v1/auth/me")
        console.print(f"{me['name']} ({me['role']})")

    @tokens_app.command("create")
    def tokens_create(
        name: Annotated[str, typer.Option("--name", help="Who holds the token.")],
        role: Annotated[Role, typer.Option("--role", help="viewer, operator, approver, admin")],
    ) -> None:
        r = call("POST", "/api/v1/operators/tokens", json={"name": name, "role": role.value})
        console.print(f"token {r['id']} for {r['name']} ({r['role']}); shown once:")
        console.print(r["token"], markup=False, highlight=False)

    @tokens_app.command("list")
    def tokens_list() -> None:
        for t in call("GET", "/api/v1/operators/tokens"):
            revoked = f" revoked {t['revoked_at']}" if t["revoked_at"] else ""
            console.print(f"{t['id']}  {t['name']}  {t['role']}{revoked}")

    @tokens_app.command("revoke")
    def tokens_revoke(token_id: int) -> None:
        call("POST", f"/api/v1/operators/tokens/{token_id}/revoke")
        console.print(f"token {token_id} revoked")

    @devices_app.command("enroll-token")
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
        r = call("POST", "/api/v1/enrollment-tokens", json=body)
        console.print(f"bootstrap token {r['id']} ({r['max_uses']} uses, until {r['expires_at']}):")
        console.print(r["token"], markup=False, highlight=False)

    @devices_app.command("revoke")
    def devices_revoke(device_id: str) -> None:
        call("POST", f"/api/v1/devices/{device_id}/revoke")
        console.print(f"device {device_id} revoked")

    @broker_app.command("write-config")
    def broker_write_config(
        out: Annotated[Path, typer.Option("--out", help="Directory for passwd and acl.")],
        port: Annotated[int, typer.Option("--port", help="Listener port in mosquitto.conf")] = 1883,
        host: Annotated[str, typer.Option("--host", help="Listener address.")] = "0.0.0.0",
    ) -> None:
        """Write passwd, acl and a mosquitto.conf using them, from EDGELOOP_* settings."""
        from server.core.config import Settings
        from server.db.engine import create_all, make_engine, make_sessionmaker
        from server.identity.broker_acl import mosquitto_conf, write_broker_config

        settings = Settings()
        engine = make_engine(settings.database_url)
        create_all(engine)
        out = out.resolve()
        with make_sessionmaker(engine)() as session:
            passwd, acl = write_broker_config(
                session,
                out,
                server_user=settings.mqtt_username,
                server_password=settings.mqtt_password,
            )
        engine.dispose()
        (out / "mosquitto.conf").write_text(mosquitto_conf(out, port=port, host=host))
        console.print(f"wrote {passwd}, {acl} and {out / 'mosquitto.conf'}")
