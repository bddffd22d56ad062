"""``edgeloop releases export``: a signed release as an offline bundle."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from server.cli import base
from server.cli.base import console, err_console
from server.release.export import (
    ExportError,
    check_release,
    prepare_directory,
    write_artifact,
    write_bundle,
)

app = typer.Typer(help="Signed releases.", no_args_is_help=True)


@app.command("export")
def releases_export(
    line: str,
    release: Annotated[int, typer.Argument(min=1)],
    directory: Path,
) -> None:
    """Write release N of LINE, its artifact and the root chain into DIRECTORY, for an offline
    install (`edgeloop-agent install --config agent.json DIRECTORY`). Layout:
    docs/bundle-format.md, section 8."""
    rel = base.call("GET", f"/api/v1/model-lines/{line}/releases/{release}")
    roots = base.call("GET", "/api/v1/trust/roots")["roots"]
    now = datetime.now(UTC)
    try:
        manifest = check_release(rel["envelope"], roots, line=line, release=release, now=now)
        prepare_directory(directory)
        with base.stream(f"/api/v1/artifacts/{manifest.artifact.sha256}") as resp:
            write_artifact(directory, manifest, resp.iter_bytes())
        index = write_bundle(
            directory,
            envelope=rel["envelope"],
            roots=roots,
            manifest=manifest,
            exported_at=now,
            exported_from=base.state.server,
        )
    except ExportError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(
        f"exported {line} release {release} (model version {manifest.model_version}, "
        f"{manifest.artifact.size} bytes, sha256 {manifest.artifact.sha256[:16]}) with root "
        f"v1..v{len(index.roots)} into {directory}"
    )
