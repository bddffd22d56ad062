"""Write the next schema migration from the models: Alembic's autogenerate diff between them and a
database at the current head, as ``server/db/migrations/versions/NNNN_<slug>.py``.

    .venv/bin/python scripts/new_migration.py "add monitoring tables"

The database is a fresh SQLite file upgraded to the head (``--database-url`` names another
scratch database to diff against, e.g. an empty PostgreSQL one). Read the revision before
committing it: autogenerate sees a rename as a drop and an add, and writes nothing for data,
triggers or server defaults. ``--empty`` writes a revision to fill in by hand (a data migration).
Then ``pytest tests/server/test_migrate.py`` checks that the models and the migrations agree.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.script import ScriptDirectory

from server.db import migrate
from server.db.engine import make_engine


class NothingToDo(Exception):
    """The models and the migrations already agree (and no empty revision was asked for)."""


def new_revision(message: str, database_url: str, *, empty: bool = False) -> Path:
    """Upgrade ``database_url`` to the head, then write the next revision (NNNN = head + 1).

    Raises:
        NothingToDo: no difference to write and ``empty`` is false.
    """
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            if not empty and not migrate.schema_differences(conn):
                raise NothingToDo("the models and the migrations agree: nothing to write")
            config = migrate.alembic_config(conn)
            head = ScriptDirectory.from_config(config).get_current_head()
            rev_id = f"{int(head or 0) + 1:04d}"
            script = command.revision(
                config, message=message, autogenerate=not empty, rev_id=rev_id
            )
    finally:
        engine.dispose()
    assert script is not None and not isinstance(script, list)
    return Path(str(script.path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("message", help="what the revision changes, e.g. 'add monitoring tables'")
    parser.add_argument("--database-url", help="a scratch database (default: a new SQLite file)")
    parser.add_argument("--empty", action="store_true", help="an empty revision to write by hand")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/head.db"
        try:
            path = new_revision(args.message, url, empty=args.empty)
        except NothingToDo as exc:
            sys.exit(str(exc))
    # The revision in the project's style (ruff is a dev dependency; skip it when absent).
    subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(path)], check=False)
    print(f"wrote {path}: read it, then run pytest tests/server/test_migrate.py")


if __name__ == "__main__":
    main()
