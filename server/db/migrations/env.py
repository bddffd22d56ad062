"""Alembic's environment: the revisions run on the connection ``server.db.migrate`` hands over,
inside its transaction (``edgeloop db upgrade``; ``scripts/new_migration.py`` for autogenerate).
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext

from server.db.base import UTCDateTime
from server.db.migrate import CONNECTION, target_metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate writes edgeloop's column types as the plain types they store, so a revision
    never imports the models it must outlive."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes.get(CONNECTION)
if connection is None:
    raise RuntimeError(
        "edgeloop's migrations run through `edgeloop db upgrade` (server.db.migrate.upgrade), "
        "which hands Alembic a connection; there is no alembic.ini or offline mode"
    )
context.configure(
    connection=connection,
    target_metadata=target_metadata,
    # SQLite alters most things only by rebuilding the table: batch operations do that (and on
    # PostgreSQL they are plain ALTERs), so one revision serves both.
    render_as_batch=True,
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
