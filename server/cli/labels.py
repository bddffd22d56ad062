"""``edgeloop labels``: the labelling queue, its Label Studio export and the import of labels."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from server.cli import base
from server.cli.base import console, err_console, table

app = typer.Typer(
    help="The labelling queue: samples captured without a label, exported to Label Studio and "
    "labelled back.",
    no_args_is_help=True,
)

FORMATS = ("label-studio",)


def _format(value: str) -> str:
    if value not in FORMATS:
        raise typer.BadParameter(f"{value!r}: the formats are {', '.join(FORMATS)}")
    return value


@app.command("queue")
def labels_queue(
    line: str,
    limit: Annotated[int, typer.Option("--limit")] = 100,
    offset: Annotated[int, typer.Option("--offset")] = 0,
) -> None:
    """Samples of LINE waiting for a label, oldest first."""
    r = base.call(
        "GET",
        f"/api/v1/model-lines/{line}/labelling-queue",
        params={"limit": limit, "offset": offset},
    )
    if base.state.json:
        console.print_json(json.dumps(r, default=str))
        return
    console.print(f"{r['queued']} sample(s) of {line} wait for a label")
    table(
        "labelling queue",
        r["samples"],
        ["sample_id", "device_id", "model_version", "predicted_label", "confidence", "received_at"],
    )


@app.command("summary")
def labels_summary(line: str) -> None:
    """Where labelling stands on LINE: waiting, labelled by source, capture policies in force."""
    r = base.call("GET", f"/api/v1/model-lines/{line}/labelling-summary")
    if base.state.json:
        console.print_json(json.dumps(r, default=str))
        return
    by = ", ".join(f"{n} by {source}" for source, n in r["labelled"].items())
    console.print(f"{line}: {r['queued']} sample(s) wait for a label; labelled {by}")
    table(
        "capture policies in force",
        r["capture_policies"],
        ["group", "seq", "alert_id", "uncertain_below", "sample_rate", "expires_at"],
    )


@app.command("export")
def labels_export(
    line: str,
    fmt: Annotated[
        str, typer.Option("--format", callback=_format, help="Task format: label-studio.")
    ] = "label-studio",
    limit: Annotated[int, typer.Option("--limit", help="Tasks at most.")] = 1000,
    offset: Annotated[int, typer.Option("--offset")] = 0,
    config: Annotated[
        bool,
        typer.Option("--label-config", help="Print the Label Studio labelling config instead."),
    ] = False,
) -> None:
    """Print LINE's queue as Label Studio tasks (JSON) on stdout: `> tasks.json`."""
    if config:
        with base.stream(f"/api/v1/model-lines/{line}/labelling-queue/label-config") as resp:
            sys.stdout.write(resp.read().decode("utf-8"))
        return
    tasks = base.call(
        "GET",
        f"/api/v1/model-lines/{line}/labelling-queue/export",
        params={"format": fmt, "limit": limit, "offset": offset},
    )
    sys.stdout.write(json.dumps(tasks, indent=1) + "\n")
    err_console.print(f"{len(tasks)} task(s) exported", highlight=False)


@app.command("import")
def labels_import(
    file: Path,
    fmt: Annotated[
        str, typer.Option("--format", callback=_format, help="File format: label-studio.")
    ] = "label-studio",
) -> None:
    """Fill queued samples from FILE, Label Studio's JSON export (all or nothing; a repeated
    import changes nothing)."""
    try:
        data = json.loads(file.read_bytes())
    except OSError as exc:
        err_console.print(f"[red]cannot read {file}: {exc}[/red]")
        raise typer.Exit(1) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        err_console.print(f"[red]{file} is not a JSON file: {exc}[/red]", markup=True)
        raise typer.Exit(1) from exc
    r = base.call("POST", "/api/v1/labels/import", json=data, params={"format": fmt})
    if base.state.json:
        console.print_json(json.dumps(r))
        return
    console.print(
        f"{r['labelled']} sample(s) labelled by {r['labelled_by']}, {r['unchanged']} unchanged, "
        f"{r['skipped']} task(s) without an annotation, {len(r['conflicts'])} conflict(s)"
        + (f"; training job(s) {r['jobs_triggered']} queued" if r["jobs_triggered"] else "")
    )
    if r["conflicts"]:
        table("conflicts (the stored label was kept)", r["conflicts"], ["task", "reason"])


@app.command("policies")
def labels_policies(line: str, limit: Annotated[int, typer.Option("--limit")] = 20) -> None:
    """Capture policies issued to LINE's device groups, newest first."""
    rows = base.call("GET", f"/api/v1/model-lines/{line}/capture-policies", params={"limit": limit})
    table(
        "capture policies",
        [
            {
                **r,
                "rate": r["policy"].get("sample_rate"),
                "below": r["policy"].get("uncertain_below"),
            }
            for r in rows
        ],
        ["seq", "group", "raised", "current", "alert_id", "below", "rate", "expires_at"],
    )
