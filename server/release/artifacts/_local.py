"""The local-directory backend: ``<root>/<sha256>``, written atomically, verified on ingest.

The default, and enough for one server process; several processes share it only through a
network file system (the object-store backend, ``_object.py``, needs none).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from server.core.errors import ArtifactError, ArtifactNotFoundError
from server.release.artifacts._store import (
    CHUNK_BYTES,
    SHA256_RE,
    ArtifactStore,
    StoredObject,
    check_range,
    check_sha256,
    write_atomic,
)


class LocalArtifactStore(ArtifactStore):
    """Model files by their sha256 in one directory. A write goes to a temp file in the same
    directory, then ``os.replace``: an object appears whole under its name or not at all."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.resolve().as_uri()

    def _existing(self, sha: str) -> Path:
        path = self.root / check_sha256(sha)
        if not path.is_file():
            raise ArtifactNotFoundError(f"no artifact {sha} in {self.url}")
        return path

    def _write(self, sha: str, chunks: Iterable[bytes], size: int | None) -> None:
        write_atomic(chunks, self.root / sha)

    def exists(self, sha: str) -> bool:
        return (self.root / check_sha256(sha)).is_file()

    def size(self, sha: str) -> int:
        try:
            return self._existing(sha).stat().st_size
        except FileNotFoundError as exc:  # deleted between the check and the stat
            raise ArtifactNotFoundError(f"no artifact {sha} in {self.url}") from exc

    def read_bytes(self, sha: str) -> bytes:
        try:
            return self._existing(sha).read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(f"no artifact {sha} in {self.url}") from exc

    def iter_range(self, sha: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._existing(sha)
        try:
            fh = open(path, "rb")  # noqa: SIM115 (the generator closes it)
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(f"no artifact {sha} in {self.url}") from exc
        try:
            first, stop = check_range(sha, start, end, os.fstat(fh.fileno()).st_size)
        except BaseException:
            fh.close()
            raise
        return _file_range(fh, first, stop)

    def local_path(self, sha: str) -> Path:
        return self._existing(sha)

    def delete(self, sha: str) -> None:
        (self.root / check_sha256(sha)).unlink(missing_ok=True)

    def list_objects(self) -> Iterator[StoredObject]:
        for entry in os.scandir(self.root):
            if not SHA256_RE.fullmatch(entry.name):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:  # deleted while listing
                continue
            if entry.is_file():
                yield StoredObject(entry.name, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))


def _file_range(fh: BinaryIO, start: int, stop: int) -> Iterator[bytes]:
    """Bytes ``[start, stop)`` of an open file, in chunks; closes it."""
    with fh:
        fh.seek(start)
        left = stop - start
        while left > 0:
            chunk = fh.read(min(CHUNK_BYTES, left))
            if not chunk:
                raise ArtifactError(f"artifact file {fh.name} ended {left} bytes early")
            left -= len(chunk)
            yield chunk
