"""Audit and quarantine commands: ``edgeloop audit verify|list``, ``edgeloop samples quarantine``.

``audit verify`` and ``audit list`` read the database directly (``--database-url`` or
``EDGELOOP_DATABASE_URL``), not the API: an auditor checks the chain without trusting the server
process that wrote it. ``verify`` exits 1 and names the first bad record; keep the head hash it
prints somewhere else and pass it back as ``--expect-head`` to detect a truncated tail.
``samples quarantine`` asks the server's API (operator token) which samples screening held back.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from sqlalchemy import inspect

from server.cli import base
from server.cli.base import DEFAULT_DB_URL, DbUrl, console, err_console
from server.db import audit
from server.db.engine import make_engine, make_sessionmaker


def _open(url: str) -> Any:
    engine = make_engine(url)
    if not inspect(engine).has_table("audit_log"):
        raise typer.BadParameter(f"{url}: no audit_log table (not an edgeloop database?)")
    return make_sessionmaker(engine)


audit_app = typer.Typer(help="Hash-chained audit log.", no_args_is_help=True)
samples_app = typer.Typer(help="Uploaded samples and screening.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    database_url: DbUrl = DEFAULT_DB_URL,
    expect_head: Annotated[
        str | None,
        typer.Option("--expect-head", help="A head hash recorded earlier (detects truncation)."),
    ] = None,
) -> None:
    """Recompute every record's hash and link; exit 1 naming the first bad record."""
    sessions = _open(database_url)
    with sessions() as session:
        result = audit.verify(session, expect_head=expect_head)
    if not result.ok:
        err_console.print(
            f"[red]audit log BROKEN at seq {result.first_bad_seq}: {result.problem}[/red]",
            soft_wrap=True,
        )
        err_console.print(f"records before it verify up to seq {result.head_seq}")
        raise typer.Exit(1)
    console.print(
        f"audit log OK: {result.count} records, head seq {result.head_seq}, "
        f"head hash {result.head_hash}",
        soft_wrap=True,
    )


@audit_app.command("list")
def audit_list(
    database_url: DbUrl = DEFAULT_DB_URL,
    after: Annotated[int, typer.Option("--after", min=0, help="Records after this seq.")] = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    action: Annotated[str | None, typer.Option("--action")] = None,
) -> None:
    """List audit records, oldest first."""
    sessions = _open(database_url)
    with sessions() as session:
        entries = audit.list_entries(session, after_seq=after, limit=limit, action=action)
    # One record a line (seq ts actor action subject details-JSON): greppable, never wrapped.
    for e in entries:
        console.print(
            f"{e.seq}\t{e.ts.isoformat()}\t{e.actor}\t{e.action}\t{e.subject}\t"
            f"{json.dumps(e.details, sort_keys=True)}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )


@samples_app.command("quarantine")
def samples_quarantine(
    line: Annotated[str, typer.Option("--line", help="Model line.")],
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
) -> None:
    """Samples screening kept out of dataset versions, with the reason."""
    rows = base.call(
        "GET", "/api/v1/samples/quarantine", params={"model_line": line, "limit": limit}
    )
    if base.state.json:  # --json: the listing as JSON, like every other listing
        print(json.dumps(rows, default=str))
        return
    # One sample a line (sample_id device check created_at released_by reason): greppable.
    for r in rows:
        console.print(
            f"{r['sample_id']}\t{r['device_id']}\t{r['check']}\t{r['created_at']}\t"
            f"{r.get('released_by') or '-'}\t{r['reason']}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    if not rows:
        console.print(f"no quarantined samples on {line}")
