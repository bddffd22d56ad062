"""``edgeloop jobs``: training jobs, list and trigger."""

from __future__ import annotations

from typing import Annotated

import typer

from server.cli import base
from server.cli.base import console, table

app = typer.Typer(help="Training jobs.", no_args_is_help=True)


@app.command("list")
def jobs_list(line: Annotated[str | None, typer.Option("--line")] = None) -> None:
    rows = base.call("GET", "/api/v1/training-jobs", params={"model_line": line} if line else None)
    table(
        "training jobs",
        rows,
        [
            "id",
            "model_line",
            "status",
            "trigger",
            "attempts",
            "sample_count",
            "result_version",
            "created_at",
            "error",
        ],
    )


@app.command("trigger")
def jobs_trigger(line: str) -> None:
    job = base.call("POST", "/api/v1/training-jobs", json={"model_line": line})
    console.print(f"queued training job {job['id']} for {line}")
