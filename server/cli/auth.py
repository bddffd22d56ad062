"""Identity commands of the ``edgeloop`` CLI: ``whoami``, operator ``tokens`` and the Mosquitto
files (``broker``). Bootstrap tokens and revocation are ``edgeloop devices`` commands.

``tokens`` and ``whoami`` go through the server's API with the caller's ``--token``;
``broker write-config`` reads the database directly (it runs next to the server, after
``edgeloop db upgrade``) so the broker can be configured before the server first starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from server.cli import base
from server.cli.base import console, err_console
from server.core.config import Settings
from server.core.errors import SchemaError
from server.db.engine import make_engine, make_sessionmaker
from server.db.migrate import require_current
from server.identity.auth import Role
from server.identity.broker_acl import mosquitto_conf, write_broker_config

tokens_app = typer.Typer(help="Operator tokens (admin).", no_args_is_help=True)
broker_app = typer.Typer(help="Mosquitto password file and ACL.", no_args_is_help=True)


def whoami() -> None:
    """Who the token is: operator name and role."""
    me = base.call("GET", "/api/v1/auth/me")
    console.print(f"{me['name']} ({me['role']})")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", help="Who holds the token.")],
    role: Annotated[Role, typer.Option("--role", help="viewer, operator, approver, admin")],
) -> None:
    r = base.call("POST", "/api/v1/operators/tokens", json={"name": name, "role": role.value})
    console.print(f"token {r['id']} for {r['name']} ({r['role']}); shown once:")
    console.print(r["token"], markup=False, highlight=False)


@tokens_app.command("list")
def tokens_list() -> None:
    for t in base.call("GET", "/api/v1/operators/tokens"):
        revoked = f" revoked {t['revoked_at']}" if t["revoked_at"] else ""
        console.print(f"{t['id']}  {t['name']}  {t['role']}{revoked}")


@tokens_app.command("revoke")
def tokens_revoke(token_id: int) -> None:
    base.call("POST", f"/api/v1/operators/tokens/{token_id}/revoke")
    console.print(f"token {token_id} revoked")


@broker_app.command("write-config")
def broker_write_config(
    out: Annotated[Path, typer.Option("--out", help="Directory for passwd and acl.")],
    port: Annotated[int, typer.Option("--port", help="Listener port in mosquitto.conf")] = 1883,
    host: Annotated[str, typer.Option("--host", help="Listener address.")] = "0.0.0.0",
) -> None:
    """Write passwd, acl and a mosquitto.conf using them, from EDGELOOP_* settings."""
    settings = Settings()
    engine = make_engine(settings.database_url)
    try:
        require_current(engine)
    except SchemaError as exc:
        engine.dispose()
        err_console.print(exc.message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
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
