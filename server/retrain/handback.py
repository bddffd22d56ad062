"""What crosses between a training worker and the servers: files through the artifact store.

Every artifact-store call of the training stages is here, so that the store's backends (a local
directory today, object storage next) meet the retrain stage in one place:

- the worker fetches the champion it warm-starts from (:func:`fetch`), and hands back the
  attempt's output (:func:`hand_back`): ``model.onnx``, ``weights.npz``, ``report.json``,
  ``dataset.json`` and the line's base pool, each stored under its sha256, which it verifies
  while storing;
- the registrar, on a server, reads them back (:func:`read_verified`, :func:`verify_stored`),
  checking that the bytes still hash to what the job recorded.

The store may be a directory every machine mounts or an object store (``server.release.
artifacts``); nothing here assumes a local path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from server.core.errors import ArtifactError, TrainingError
from server.release.artifacts import ArtifactStore

MAX_RESULT_JSON_BYTES = 64 * 1024 * 1024  # bytes of report.json or dataset.json read back
_CHUNK = 1024 * 1024  # bytes hashed per step


@dataclass(frozen=True)
class HandedBack:
    """The artifact store's sha256 of each file an attempt produced (None: it wrote none)."""

    model_sha256: str | None
    model_size: int | None  # bytes of model.onnx
    weights_sha256: str | None
    report_sha256: str
    dataset_sha256: str | None
    base_sha256: str | None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _put(store: ArtifactStore, path: Path) -> tuple[str, int]:
    """Store ``path``, refusing bytes that change between hashing and storing.

    Raises:
        ArtifactError: the stored bytes do not hash to the file's sha256.
    """
    return store.put_file(path, expected_sha256=sha256_file(path))


def hand_back(store: ArtifactStore, output_dir: Path, *, base_pool: Path | None) -> HandedBack:
    """Store the trainer's output; the worker then records the shas on the job.

    Raises:
        TrainingError: no report.json, or a pass reported without model.onnx.
        ArtifactError: a file could not be stored, or its bytes changed while being stored.
    """
    report = output_dir / "report.json"
    if not report.is_file():
        raise TrainingError("trainer left no report.json")
    model = output_dir / "model.onnx"
    weights = output_dir / "weights.npz"
    dataset = output_dir / "dataset.json"
    model_sha, model_size = _put(store, model) if model.is_file() else (None, None)
    return HandedBack(
        model_sha256=model_sha,
        model_size=model_size,
        weights_sha256=_put(store, weights)[0] if weights.is_file() else None,
        report_sha256=_put(store, report)[0],
        dataset_sha256=_put(store, dataset)[0] if dataset.is_file() else None,
        base_sha256=_put(store, base_pool)[0] if base_pool is not None else None,
    )


def read_verified(store: ArtifactStore, sha256: str, *, what: str, limit: int) -> bytes:
    """The bytes stored under ``sha256``, checked against it.

    Raises:
        ArtifactError: missing from the store, over ``limit`` bytes, or hashing to another sha.
        ArtifactStoreUnavailableError: the store's backend failed (transient).
    """
    if not store.exists(sha256):
        raise ArtifactError(f"{what} {sha256} is not in the artifact store")
    if store.size(sha256) > limit:
        raise ArtifactError(f"{what} {sha256} is over {limit} bytes")
    data = store.read_bytes(sha256)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ArtifactError(f"{what}: the store's bytes hash to {got}, the job recorded {sha256}")
    return data


def verify_stored(store: ArtifactStore, sha256: str, *, what: str) -> int:
    """Check that the store holds ``sha256`` whole (streamed, not kept); returns its size.

    Raises:
        ArtifactError: missing, or its bytes hash to another sha.
        ArtifactStoreUnavailableError: the store's backend failed (transient).
    """
    if not store.exists(sha256):
        raise ArtifactError(f"{what} {sha256} is not in the artifact store")
    digest = hashlib.sha256()
    size = 0
    for chunk in store.iter_range(sha256):
        digest.update(chunk)
        size += len(chunk)
    got = digest.hexdigest()
    if got != sha256:
        raise ArtifactError(f"{what}: the store's bytes hash to {got}, the job recorded {sha256}")
    return size


def fetch(store: ArtifactStore, sha256: str, dest: Path) -> Path | None:
    """A verified copy of an artifact at ``dest`` for the trainer (the champion it warm-starts
    from); None when the store lacks it.

    Raises:
        ArtifactError: the stored bytes do not hash to ``sha256``.
    """
    if not store.exists(sha256):
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(sha256, dest)
    return dest


__all__ = ["HandedBack", "fetch", "hand_back", "read_verified", "sha256_file", "verify_stored"]
