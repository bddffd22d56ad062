"""``edgeloop models``: versions of a line, one version's report, aliases."""

from __future__ import annotations

from typing import Any

import typer

from server.cli import base
from server.cli.base import console, table

app = typer.Typer(help="Model lines and versions.", no_args_is_help=True)


@app.command("list")
def models_list(line: str) -> None:
    info = base.call("GET", f"/api/v1/model-lines/{line}")
    console.print(
        f"[bold]{line}[/bold] champion v{info['champion_version']} "
        f"release {info['current_release']} new samples "
        f"{info['new_samples']}/{info['retrain_threshold']}"
    )
    rows = base.call("GET", f"/api/v1/model-lines/{line}/versions")
    for r in rows:
        golden = ((r.get("metrics") or {}).get("challenger") or {}).get("golden_accuracy")
        r["golden_accuracy"] = golden
    table(
        "versions",
        rows,
        [
            "version",
            "status",
            "parent_version",
            "dataset_version",
            "golden_accuracy",
            "sample_count",
            "created_at",
        ],
    )


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def _print_report(r: dict[str, Any]) -> None:
    report = r.get("report") or {}
    metrics = report.get("metrics") or {}
    console.print(
        f"[bold]{r['line']} v{r['version']}[/bold] {r['status']}  trainer {r['trainer']}  "
        f"dataset {str(r.get('dataset_version'))[:16]}  sha256 {str(r.get('sha256'))[:16]}"
    )
    rows = []
    for who in ("challenger", "champion"):
        m = metrics.get(who) or {}
        if m:
            rows.append(
                {
                    "model": who,
                    **{
                        k: _num(m.get(k))
                        for k in (
                            "golden_accuracy",
                            "golden_macro_f1",
                            "golden_roc_auc",
                            "golden_ece",
                            "field_accuracy",
                            "field_macro_f1",
                        )
                    },
                }
            )
    if rows:
        table("metrics", rows, list(rows[0]))
    gate = report.get("gate") or {}
    console.print(f"gate: {gate.get('reason') or report.get('reason') or r.get('reason')}")
    failed = [c for c in gate.get("checks") or [] if not c.get("passed")]
    for c in failed:
        console.print(f"  [red]failed[/red] {c.get('check')}: {c.get('detail') or c}")
    repro = report.get("reproducibility")
    if repro:
        console.print(
            f"reproducibility: dataset {repro['dataset_version'][:16]} config "
            f"{repro['config_sha256'][:16]} seed {repro['seed']} -> metrics "
            f"{repro['metrics_sha256'][:16]}"
        )


@app.command("show")
def models_show(line: str, version: int) -> None:
    """One version: metrics (golden and field), the gate verdict and reproducibility."""
    _print_report(base.call("GET", f"/api/v1/model-lines/{line}/versions/{version}"))


@app.command("alias")
def models_alias(line: str, alias: str) -> None:
    """The version an alias (champion, candidate, latest) points at."""
    _print_report(base.call("GET", f"/api/v1/model-lines/{line}/aliases/{alias}"))
