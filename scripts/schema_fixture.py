"""Write the schema a released edgeloop made, per dialect, as SQL the migration tests load.

    .venv/bin/python scripts/schema_fixture.py 7ee107e

writes ``tests/server/fixtures/schema-7ee107e.sqlite.sql`` and ``...postgresql.sql``: the DDL that
commit's own ``create_all`` executes on an empty database, taken from that commit's code (``git
archive`` into a temporary folder, imported in a child interpreter) through a mock engine that
records each statement instead of running it. ``tests/server/test_migrate.py`` loads the files,
fills every table and upgrades them. 7ee107e is the last release made without migrations.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "server" / "fixtures"
DIALECTS = {"sqlite": "sqlite://", "postgresql": "postgresql+psycopg://"}

# Runs in the child, on the released code: prints the statements create_all executes.
DUMP = r"""
import sys
from sqlalchemy import create_mock_engine
from server.db import engine as engine_module  # registers every table on Base
from server.db.base import Base

statements = []
def record(sql, *args, **kwargs):
    text = str(sql.compile(dialect=mock.dialect)).strip().rstrip(";")
    statements.append("\n".join(line.rstrip() for line in text.splitlines()))
mock = create_mock_engine(sys.argv[1], record)
Base.metadata.create_all(mock, checkfirst=False)
sys.stdout.write(";\n\n".join(statements) + ";\n")
"""


def released_tree(ref: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref, "server", "contract"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def ddl(tree: Path, url: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", DUMP, url],
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the released commit (e.g. 7ee107e)")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", args.ref],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        released_tree(commit, tree)
        for dialect, url in DIALECTS.items():
            path = FIXTURES / f"schema-{commit}.{dialect}.sql"
            header = (
                f"-- The schema edgeloop {commit} made on an empty {dialect} database: the DDL\n"
                "-- its create_all executed. Generated, do not edit:\n"
                f"--   .venv/bin/python scripts/schema_fixture.py {commit}\n\n"
            )
            path.write_text(header + ddl(tree, url))
            print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
