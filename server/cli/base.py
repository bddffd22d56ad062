"""What the CLI's command groups share: the server and token the root options set, HTTP calls
with one error handling, tables, and the consoles.

Commands reach the server through ``base.call`` and ``base.stream``, looked up when called, so a
test can put a client of its own in their place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from server.core.config import Settings

# Commands that read the server's database directly (audit, db) name it like the server does.
DEFAULT_DB_URL: str = Settings.model_fields["database_url"].default
DbUrl = Annotated[
    str,
    typer.Option("--database-url", envvar="EDGELOOP_DATABASE_URL", help="The server's database."),
]

console = Console()
err_console = Console(stderr=True)
TIMEOUT_S = 30.0  # seconds per HTTP request


# Where output is not a terminal (a pipe, a file, a script), tables keep their full width
# instead of rich's 80 columns; --json prints listings as JSON instead of tables.
PIPE_WIDTH = 1000  # columns

AUTH_HINT = (
    "pass an operator token: edgeloop --token TOKEN ... or EDGELOOP_TOKEN=TOKEN "
    "(an admin makes one with `edgeloop tokens create --name NAME --role operator`; "
    "in development the server's admin token is edgeloop-dev-admin-token)"
)


class _State:
    server: str = "http://127.0.0.1:8000"
    token: str = ""  # operator bearer token (--token / EDGELOOP_TOKEN)
    json: bool = False  # --json: listings as JSON


state = _State()


def call(method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
    """One request to the server; exits 2 when it cannot be reached, 1 on an error status."""
    try:
        headers = {"Authorization": f"Bearer {state.token}"} if state.token else {}
        resp = httpx.request(
            method,
            state.server + path,
            json=json,
            params=params,
            headers=headers,
            timeout=TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach {state.server}: {exc}[/red]")
        raise typer.Exit(2) from exc
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        err_console.print(f"[red]error {resp.status_code}: {detail}[/red]", markup=True)
        if resp.status_code == 401:
            err_console.print(AUTH_HINT, markup=False, highlight=False)
        elif resp.status_code == 403:
            err_console.print(
                "the token is valid but its role may not do this (`edgeloop whoami` shows it)",
                markup=False,
                highlight=False,
            )
        raise typer.Exit(1)
    return resp.json()


@contextmanager
def stream(path: str) -> Iterator[httpx.Response]:
    """A streamed GET on the server (same token and error handling as ``call``)."""
    headers = {"Authorization": f"Bearer {state.token}"} if state.token else {}
    try:
        with httpx.stream("GET", state.server + path, headers=headers, timeout=TIMEOUT_S) as resp:
            if resp.status_code >= 400:
                resp.read()
                err_console.print(f"[red]error {resp.status_code}: {resp.text[:500]}[/red]")
                raise typer.Exit(1)
            yield resp
    except httpx.HTTPError as exc:
        err_console.print(f"[red]cannot reach {state.server}: {exc}[/red]")
        raise typer.Exit(2) from exc


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as a table, or as a JSON list of objects with ``columns`` under ``--json``."""
    if state.json:
        print(json.dumps([{c: row.get(c) for c in columns} for row in rows], default=str))
        return
    out = Table(title=title)
    for col in columns:
        out.add_column(col, overflow="fold")
    for row in rows:
        out.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(out, width=None if console.is_terminal else PIPE_WIDTH)
