"""Schema commands: ``edgeloop db upgrade`` and ``edgeloop db current``.

Both read the database directly (``--database-url`` or ``EDGELOOP_DATABASE_URL``), not the API:
the server never changes its own schema, it refuses to start on one that is not current. The
upgrade: stop every server on the database, back it up, ``edgeloop db upgrade``, start them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from server.cli import base
from server.cli.base import DEFAULT_DB_URL, DbUrl, console, err_console
from server.core.errors import SchemaError
from server.db import migrate
from server.db.engine import make_engine

db_app = typer.Typer(
    help="The database schema: upgrade it, show its revision.", no_args_is_help=True
)


@db_app.command("upgrade")
def db_upgrade(database_url: DbUrl = DEFAULT_DB_URL) -> None:
    """Bring the database to this edgeloop's schema (stop the servers, back it up first).

    Creates the tables in an empty database, adopts one made before migrations, runs the
    migrations since its revision; all in one transaction, so a failure changes nothing.
    """
    try:
        result = migrate.upgrade(database_url)
    except SchemaError as exc:
        err_console.print(exc.message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    except OperationalError as exc:
        _unreachable(database_url, exc)
    where = migrate.database_name(database_url)
    before = result.before
    if not result.changed:
        console.print(f"{where}: already at revision {result.revision} (head)", soft_wrap=True)
    elif before.empty:
        console.print(f"{where}: created the schema at revision {result.revision}", soft_wrap=True)
    elif before.legacy:
        console.print(
            f"{where}: adopted a database made before migrations; now at revision "
            f"{result.revision}",
            soft_wrap=True,
        )
    else:
        console.print(
            f"{where}: upgraded from revision {before.current} to {result.revision}",
            soft_wrap=True,
        )


@db_app.command("current")
def db_current(database_url: DbUrl = DEFAULT_DB_URL) -> None:
    """Print the database's revision and this edgeloop's; exit 1 unless they are the same."""
    parsed = make_url(database_url)
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file not in (None, "", ":memory:") and not Path(str(file)).exists():
        err_console.print(f"no database file at {file}", markup=False)
        raise typer.Exit(1)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            state = migrate.schema_state(conn)
    except OperationalError as exc:
        _unreachable(database_url, exc)
    finally:
        engine.dispose()
    if base.state.json:
        print(
            json.dumps(
                {
                    "current": state.current,
                    "head": state.head,
                    "up_to_date": state.up_to_date,
                    "legacy": state.legacy,
                }
            )
        )
    else:
        hint = "" if state.up_to_date else f": run `{migrate.UPGRADE_COMMAND}`"
        if not state.known:
            hint = ""
        console.print(f"{state.current or 'none'}: {state.describe()}{hint}", soft_wrap=True)
    if not state.up_to_date:
        raise typer.Exit(1)


def _unreachable(database_url: str, exc: OperationalError) -> NoReturn:
    err_console.print(
        f"cannot reach {migrate.database_name(database_url)}: {exc.orig}",
        markup=False,
        soft_wrap=True,
    )
    raise typer.Exit(2) from exc
