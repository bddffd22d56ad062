"""Schema migrations: bring a database to this edgeloop's schema, or check that it is there.

``edgeloop db upgrade`` calls :func:`upgrade`; the server only calls :func:`require_current` at
start and refuses a database that is empty, behind or ahead of it. The Alembic revisions live in
``server/db/migrations/versions/`` and ship in the package; Alembic is configured here, not by an
``alembic.ini``, so an installed edgeloop migrates from any working directory.

A database made before migrations (edgeloop tables, no ``alembic_version`` table) is adopted: the
baseline revision creates only what it lacks (tables, indexes, the two nullable columns added
after their tables' first release, the audit log's triggers), Alembic records the revision, the
later revisions run, and the result is compared with the models: any other difference aborts the
upgrade, which leaves the database as it was.

One upgrade at a time, all or nothing: the whole upgrade is one transaction (PostgreSQL and SQLite
both run DDL transactionally). On PostgreSQL it holds a transaction-scoped advisory lock; on SQLite
``BEGIN IMMEDIATE`` holds the write lock. A second ``db upgrade`` started meanwhile waits, then
finds nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, inspect, text
from sqlalchemy.engine import make_url

from server.core.errors import SchemaError
from server.db.base import Base

# engine.py imports every table module, so Base.metadata holds every table from here on.
from server.db.engine import READ_ONLY_OPTION, make_engine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Keys of Config.attributes that env.py and the baseline revision read.
CONNECTION = "connection"
ADOPT_LEGACY = "edgeloop_adopt_legacy"
# Arbitrary constant naming the migration's advisory lock on PostgreSQL.
_PG_LOCK_KEY = 0x0A0D18
UPGRADE_COMMAND = "edgeloop db upgrade"
UPGRADE_HINT = (
    f"stop every server on this database, back it up, run `{UPGRADE_COMMAND}` "
    "(EDGELOOP_DATABASE_URL or --database-url names it), then start the servers"
)
CREATE_HINT = (
    f"create the tables with `{UPGRADE_COMMAND}` "
    "(EDGELOOP_DATABASE_URL or --database-url names the database), then start the server"
)

target_metadata: MetaData = Base.metadata


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands against this edgeloop's migrations."""

    current: str | None  # the revision recorded in alembic_version; None: none recorded
    head: str  # the revision this edgeloop's models need
    legacy: bool  # edgeloop tables but no recorded revision: made before migrations
    known: bool  # ``current`` is one of this edgeloop's revisions (or None)

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def empty(self) -> bool:
        return self.current is None and not self.legacy

    def describe(self) -> str:
        """One sentence an operator can act on."""
        if self.up_to_date:
            return f"schema at revision {self.head} (head)"
        if self.empty:
            return "no edgeloop tables (an empty database)"
        if self.legacy:
            return "tables made by an edgeloop from before schema migrations (no revision)"
        if not self.known:
            return (
                f"schema at revision {self.current}, which this edgeloop does not know "
                "(made by a newer edgeloop?)"
            )
        return f"schema at revision {self.current}, behind this edgeloop's {self.head}"


@dataclass(frozen=True)
class UpgradeResult:
    before: SchemaState
    revision: str  # the revision the database is at now (the head)

    @property
    def changed(self) -> bool:
        return self.before.current != self.revision


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for edgeloop's revisions, running on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        config.attributes[CONNECTION] = connection
    return config


def head_revision() -> str:
    """The revision the models correspond to (one head: parallel branches must be merged)."""
    return _head(ScriptDirectory.from_config(alembic_config()))


def _head(script: ScriptDirectory) -> str:
    head = script.get_current_head()
    if head is None:
        raise SchemaError(f"no migrations in {MIGRATIONS_DIR}")
    return head


def schema_state(conn: Connection) -> SchemaState:
    """Read the recorded revision (and, without one, whether edgeloop tables exist)."""
    script = ScriptDirectory.from_config(alembic_config())
    heads = MigrationContext.configure(conn).get_current_heads()
    if len(heads) > 1:
        raise SchemaError(f"the database records several revisions: {', '.join(heads)}")
    current = heads[0] if heads else None
    legacy = current is None and bool(
        set(inspect(conn).get_table_names()) & set(target_metadata.tables)
    )
    known = True
    if current is not None:
        try:
            known = script.get_revision(current) is not None
        except CommandError:
            known = False
    return SchemaState(current=current, head=_head(script), legacy=legacy, known=known)


def database_name(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def require_current(engine: Engine) -> None:
    """Refuse a database whose schema is not this edgeloop's head revision.

    Raises:
        SchemaError: the database is empty, made before migrations, behind, or ahead; the message
            names ``edgeloop db upgrade`` where that fixes it.
    """
    with engine.execution_options(**{READ_ONLY_OPTION: True}).connect() as conn:
        state = schema_state(conn)
    if state.up_to_date:
        return
    where = engine.url.render_as_string(hide_password=True)
    if not state.known:
        raise SchemaError(
            f"database {where}: {state.describe()}: run the edgeloop that made it, "
            "or restore a backup taken before its upgrade"
        )
    hint = CREATE_HINT if state.empty else UPGRADE_HINT
    raise SchemaError(f"database {where}: {state.describe()}: {hint}")


def upgrade(url: str) -> UpgradeResult:
    """Bring the database at ``url`` to the head revision, in one transaction.

    An empty database gets every table; one made before migrations is adopted (module docstring);
    one at an older revision runs the revisions since. Two upgrades at once are serialised.

    Raises:
        SchemaError: the database is at a revision this edgeloop does not know, a migration left a
            foreign key dangling (SQLite), or an adopted database differs from the models in
            ways the baseline does not repair. Nothing was changed.
    """
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    try:
        with engine.connect() as conn:
            if sqlite:
                # Batch migrations rebuild a SQLite table (create, copy, drop, rename), which
                # with foreign keys on would cascade into or refuse the children; the keys are
                # checked as a whole before commit instead. The pragma is a no-op inside a
                # transaction, so it goes to the driver before ours begins.
                _sqlite_pragma(conn, "PRAGMA foreign_keys=OFF")
            try:
                with conn.begin():
                    if not sqlite:
                        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
                    before = schema_state(conn)
                    if not before.known:
                        raise SchemaError(f"database {database_name(url)}: {before.describe()}")
                    if not before.up_to_date:
                        config = alembic_config(conn)
                        config.attributes[ADOPT_LEGACY] = before.legacy
                        command.upgrade(config, "head")
                        if sqlite:
                            _check_foreign_keys(conn)
                        if before.legacy:
                            _check_matches_models(conn, url)
                    after = schema_state(conn)
            finally:
                if sqlite:
                    _sqlite_pragma(conn, "PRAGMA foreign_keys=ON")
    finally:
        engine.dispose()
    assert after.current is not None and after.up_to_date, after
    return UpgradeResult(before=before, revision=after.current)


def _sqlite_pragma(conn: Connection, pragma: str) -> None:
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute(pragma)


def _check_foreign_keys(conn: Connection) -> None:
    bad = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if bad:
        rows = ", ".join(f"{r[0]} row {r[1]} -> {r[2]}" for r in bad[:10])
        raise SchemaError(f"the migration left rows whose foreign key points nowhere: {rows}")


def schema_differences(conn: Connection, *, only_ours: bool = False) -> list[object]:
    """Alembic's autogenerate diff between the database and the models (empty: they agree).

    ``only_ours`` ignores tables the models do not define (a database may hold others).
    """

    def ours(name: str | None, type_: str, _parent: object) -> bool:
        return type_ != "table" or name in target_metadata.tables

    opts: dict[str, object] = {"compare_type": True}
    if only_ours:
        opts["include_name"] = ours
    context = MigrationContext.configure(conn, opts=opts)
    return list(compare_metadata(context, target_metadata))


def _check_matches_models(conn: Connection, url: str) -> None:
    diff = schema_differences(conn, only_ours=True)
    if diff:
        shown = "; ".join(str(d) for d in diff[:10])
        raise SchemaError(
            f"database {database_name(url)} was made before migrations and differs from this "
            f"edgeloop's schema in ways the upgrade does not repair (nothing was changed): {shown}"
        )
