"""``edgeloop lineage``: which data made which model, and back."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from server.cli import base
from server.cli.base import console, table

app = typer.Typer(help="Which data made which model, and back.", no_args_is_help=True)


def _print_lineage_models(models: list[dict[str, Any]]) -> None:
    table(
        "model versions",
        [{**m, "dataset_version": str(m.get("dataset_version"))[:16]} for m in models],
        ["line", "version", "status", "trainer", "dataset_version", "job_id", "gate_reason"],
    )


@app.command("model")
def lineage_model(
    line: str,
    version: int,
    samples: Annotated[int, typer.Option("--samples", help="Sample ids to list.")] = 20,
) -> None:
    """Model version -> dataset version -> samples -> contributing devices."""
    r = base.call(
        "GET",
        f"/api/v1/model-lines/{line}/versions/{version}/lineage",
        params={"sample_limit": samples},
    )
    m, ds = r["model"], r.get("dataset")
    console.print(
        f"[bold]{m['line']} v{m['version']}[/bold] ({m['status']}) trained by job "
        f"{m['job_id']} with {m['trainer']}"
    )
    if ds is None:
        console.print("no stored dataset version for this model")
        return
    console.print(
        f"dataset {ds['version']}\n  base {ds['base']} ({ds['base_sha256'][:16]}), "
        f"{ds['sample_count']} samples: {r['sample_counts']['train']} train, "
        f"{r['sample_counts']['field']} field (field fraction {ds['field_fraction']:g}), "
        f"{ds['rejected_count']} rejected"
    )
    sources = ds.get("label_sources") or {}
    if sources:
        console.print("  labels from: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())))
    table("devices", r["devices"], ["device_id", "samples"])
    table(f"samples (first {samples})", r["samples"], ["sample_id", "role", "device_id"])


@app.command("sample")
def lineage_sample(sample_id: str) -> None:
    """Sample -> dataset versions holding it -> model versions trained on them."""
    r = base.call("GET", f"/api/v1/samples/{sample_id}/lineage")
    s = r["sample"]
    console.print(
        f"[bold]sample {s['sample_id']}[/bold] from device {s['device_id']} "
        f"({s['model_line']}), label {s['true_label']} from {s.get('provenance')}"
        + (f" by {s['labelled_by']}" if s.get("labelled_by") else "")
        + f", received {s['received_at']}"
    )
    table("dataset versions", r["datasets"], ["version", "role", "created_at"])
    _print_lineage_models(r["models"])


@app.command("device")
def lineage_device(device_id: str) -> None:
    """Device -> its samples -> dataset versions -> model versions."""
    r = base.call("GET", f"/api/v1/devices/{device_id}/lineage")
    console.print(f"[bold]device {device_id}[/bold]: {r['samples']} accepted samples")
    table("dataset versions", r["datasets"], ["version", "samples"])
    _print_lineage_models(r["models"])


@app.command("dataset")
def lineage_dataset(version: str) -> None:
    """Dataset version -> its manifest, models, devices."""
    r = base.call("GET", f"/api/v1/datasets/{version}", params={"sample_limit": 0})
    ds = r["dataset"]
    console.print(
        f"[bold]dataset {ds['version']}[/bold]: base {ds['base']}, {ds['sample_count']} "
        f"samples ({r['sample_counts']['train']} train, {r['sample_counts']['field']} field)"
    )
    table("devices", r["devices"], ["device_id", "samples"])
    _print_lineage_models(r["models"])
