"""Export one signed release as an offline bundle (``contract.bundle``) for air-gapped sites.

``edgeloop releases export LINE N DIR`` fetches, over the server's HTTP API, the pieces a
device needs and nothing else:

- the manifest envelope: ``GET /api/v1/model-lines/{line}/releases/{n}`` (viewer token),
- the root chain v1..vN: ``GET /api/v1/trust/roots`` (public),
- the artifact bytes: ``GET /api/v1/artifacts/{sha256}`` (public).

Before writing, ``check_release`` verifies the bundle as a device would, except for the device's
own facts (pinned root, targeting, release floor): the chain walks from the served root v1, the
newest root's release role signed the manifest, the manifest has not expired, and the artifact
has exactly the signed size and sha256 (checked while downloading). A broken bundle is caught
here, not at the site. The check is pure; the CLI (server/cli/main.py) does the HTTP.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from contract import ContractError, Manifest, SignedEnvelope
from contract.bundle import ENVELOPE_FILE, INDEX_FILE, BundleIndex, root_file
from contract.envelope import verify_envelope
from contract.manifest import format_time
from contract.trust import CLOCK_SKEW_S, is_expired, load_pinned_root, walk_root_chain


class ExportError(Exception):
    """The server's release, roots or artifact do not make a bundle a device would accept."""


def check_release(
    envelope: Mapping[str, Any],
    roots: Sequence[Mapping[str, Any]],
    *,
    line: str,
    release: int,
    now: datetime,
) -> Manifest:
    """Verify a release against the root chain the server serves. Returns its manifest.

    Raises:
        ExportError: no roots, a broken chain, a bad signature, another release, or expired.
    """
    if not roots:
        raise ExportError("the server serves no root metadata: devices pin a root v1")
    try:
        pinned = load_pinned_root(roots[0])
        newest, _ = walk_root_chain(pinned, list(roots[1:]))
        payload = verify_envelope(
            SignedEnvelope.from_dict(envelope),
            newest.role_keys("release"),
            threshold=newest.threshold("release"),
        )
        manifest = Manifest.from_payload(payload)
    except ContractError as exc:
        raise ExportError(f"release {line}@{release} does not verify: {exc}") from exc
    if (manifest.model_line, manifest.release) != (line, release):
        raise ExportError(
            f"the server's envelope is {manifest.model_line}@{manifest.release}, "
            f"not {line}@{release}"
        )
    for what, expires in (
        (f"root v{newest.version}", newest.expires_at),
        (f"release {line}@{release}", manifest.expires_at),
    ):
        if is_expired(expires, now, CLOCK_SKEW_S):
            raise ExportError(
                f"{what} expired at {format_time(expires)}: devices would refuse the bundle"
            )
    return manifest


def prepare_directory(directory: Path) -> None:
    """Create ``directory``; refuse one that already holds files (never mix two bundles)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ExportError(f"{directory} exists and is not an empty directory")
    (directory / "roots").mkdir(parents=True, exist_ok=True)


def write_artifact(directory: Path, manifest: Manifest, chunks: Iterable[bytes]) -> Path:
    """Write the artifact from ``chunks``, checking the signed size while writing and the
    sha256 at the end. Returns its path (named as the manifest names it)."""
    ref = manifest.artifact
    if ref.name in (ENVELOPE_FILE, INDEX_FILE):
        raise ExportError(f"the signed artifact name {ref.name!r} is a bundle file name")
    path = directory / ref.name
    tmp = path.with_name(f".{ref.name}.part")
    digest, written = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                written += len(chunk)
                if written > ref.size:
                    raise ExportError(f"the server sent more than the signed {ref.size} bytes")
                digest.update(chunk)
                fh.write(chunk)
        if written != ref.size:
            raise ExportError(f"the server sent {written} of the signed {ref.size} bytes")
        if digest.hexdigest() != ref.sha256:
            raise ExportError("the artifact's sha256 is not the signed one")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bundle(
    directory: Path,
    *,
    envelope: Mapping[str, Any],
    roots: Sequence[Mapping[str, Any]],
    manifest: Manifest,
    exported_at: datetime,
    exported_from: str,
) -> BundleIndex:
    """Write the envelope, the roots and, last, the index (its presence marks a complete
    bundle). The artifact must already be written (``write_artifact``)."""
    env = SignedEnvelope.from_dict(envelope)
    (directory / ENVELOPE_FILE).write_bytes(env.to_json())
    names = []
    for version, root in enumerate(roots, start=1):
        names.append(root_file(version))
        (directory / names[-1]).write_bytes(SignedEnvelope.from_dict(root).to_json())
    index = BundleIndex(
        model_line=manifest.model_line,
        release=manifest.release,
        model_version=manifest.model_version,
        envelope=ENVELOPE_FILE,
        artifact=manifest.artifact.name,
        roots=tuple(names),
        exported_at=format_time(exported_at),
        exported_from=exported_from,
    )
    (directory / INDEX_FILE).write_bytes(index.to_json())
    return index
