"""What the CLI's command groups share: the server and token the root options set, HTTP calls
with one error handling, tables, and the consoles.

Commands reach the server through ``base.call`` and ``base.stream``, looked up when called, so a
test can put a client of its own in their place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)
TIMEOUT_S = 30.0  # seconds per HTTP request


class _State:
    server: str = "http://127.0.0.1:8000"
    token: str = ""  # operator bearer token (--token / EDGELOOP_TOKEN)


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
        err_console.print(f"[red]error {resp.status_code}: {detail}[/red]")
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
    out = Table(title=title)
    for col in columns:
        out.add_column(col)
    for row in rows:
        out.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(out)
