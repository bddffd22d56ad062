"""``edgeloop artifacts gc``: list, and with ``--apply`` delete, the store's unreferenced objects.

It reads the settings the server reads (``EDGELOOP_DATABASE_URL``, ``EDGELOOP_ARTIFACT_STORE_URL``
and the S3 credentials, ``EDGELOOP_DATA_DIR``), on a machine that reaches the database and the
store, like ``edgeloop worker``; it needs no server running. Without ``--apply`` nothing is
deleted. See :mod:`server.release.artifact_gc` for what is garbage.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated

import typer

from server.cli import base
from server.cli.base import console, err_console
from server.core.config import Settings
from server.core.errors import ConfigError, EdgeloopError
from server.db.base import utcnow
from server.db.engine import make_engine, make_sessionmaker
from server.db.migrate import require_current
from server.release.artifact_gc import collect
from server.release.artifacts import open_artifact_store

artifacts_app = typer.Typer(help="The artifact store.", no_args_is_help=True)


@artifacts_app.command("gc")
def artifacts_gc(
    older_than: Annotated[
        float,
        typer.Option(
            "--older-than", min=0, help="Days: only objects stored longer ago are collected."
        ),
    ] = 7.0,
    apply: Annotated[
        bool, typer.Option("--apply", help="Delete them (default: list them, delete nothing).")
    ] = False,
) -> None:
    """List the objects no model version, release, line or unfinished job refers to."""
    settings = Settings()
    engine = make_engine(settings.database_url)
    try:
        require_current(engine)
        store = open_artifact_store(settings)
        found = collect(
            store,
            make_sessionmaker(engine),
            older_than=timedelta(days=older_than),
            now=utcnow(),
            apply=apply,
        )
    except (ConfigError, EdgeloopError) as exc:
        err_console.print(f"edgeloop artifacts gc: {exc.message}", markup=False)
        raise typer.Exit(2) from exc
    finally:
        engine.dispose()
    rows = [
        {"sha256": o.sha256, "size": o.size, "stored_at": o.stored_at.isoformat()}
        for o in found.garbage
    ]
    if base.state.json:
        summary = {
            "store": store.url,
            "applied": apply,
            "garbage": rows,
            "garbage_bytes": found.garbage_bytes,
            "kept_referenced": found.referenced,
            "kept_young": found.young,
        }
        print(json.dumps(summary))
        return
    if rows:
        base.table(f"unreferenced objects in {store.url}", rows, ["sha256", "size", "stored_at"])
    done = "deleted" if apply else "would delete (dry run; --apply deletes)"
    console.print(
        f"{done} {len(rows)} object(s), {found.garbage_bytes} bytes; kept {found.referenced} "
        f"referenced and {found.young} newer than {older_than:g} day(s)",
        soft_wrap=True,
        markup=False,
    )
