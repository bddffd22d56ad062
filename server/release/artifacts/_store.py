"""What every artifact store offers, and the pieces its backends share.

An artifact is immutable and named by the sha256 of its bytes. A backend makes an object visible
under its name only once all of its bytes are stored and hash to that name, so a reader never
sees a partial or wrong object: a truncated or mismatched upload leaves nothing behind.
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from server.core.errors import ArtifactError, InvalidRequestError

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # whole string: fullmatch
CHUNK_BYTES = 8 * 1024 * 1024  # bytes read, hashed, sent or fetched per step


def check_sha256(sha: str) -> str:
    """Return ``sha`` if it is 64 lowercase hex characters. Raises InvalidRequestError."""
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
        raise InvalidRequestError("artifact id must be a sha256: 64 lowercase hex characters")
    return sha


@dataclass(frozen=True)
class StoredObject:
    """One object as the store lists it."""

    sha256: str
    size: int  # bytes
    stored_at: datetime  # when its bytes were stored (UTC): a file's mtime, an object's date


class ArtifactStore(abc.ABC):
    """Content-addressed, immutable model files: one local directory or one object-store prefix.

    Backends implement the primitives (``_write`` and the readers); the verified writes and the
    verified copy out are shared here. Every method that names an object raises
    InvalidRequestError for a malformed sha256, ArtifactNotFoundError when there is no such
    object, and ArtifactStoreUnavailableError (transient) when a remote backend fails.
    """

    url: str  # where the objects are (file:///dir or s3://bucket/prefix), without credentials

    def put_file(self, src: Path, *, expected_sha256: str | None = None) -> tuple[str, int]:
        """Store the bytes of ``src``; return (sha256, size).

        The file is hashed first (its name in the store), then hashed again while it is sent:
        bytes that changed in between are refused and nothing is stored.

        Raises:
            ArtifactError: src is empty or unreadable, or does not hash to ``expected_sha256``.
        """
        check_expected(expected_sha256)
        sha, size = hash_file(src)
        if expected_sha256 is not None and sha != expected_sha256:
            raise ArtifactError(f"artifact {src} hashes to {sha}, expected {expected_sha256}")
        if self.exists(sha):
            return sha, size
        what = f"artifact {src}"
        try:
            with open(src, "rb") as fh:
                self._write(sha, verified_chunks(read_chunks(fh, what), sha, what, size), size)
        except OSError as exc:
            raise ArtifactError(f"cannot read {what}: {exc}") from exc
        return sha, size

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        """Store ``data``; return (sha256, size). Raises ArtifactError when it is empty."""
        if not data:
            raise ArtifactError("artifact bytes are empty")
        sha = hashlib.sha256(data).hexdigest()
        if not self.exists(sha):
            self._write(sha, [bytes(data)], len(data))
        return sha, len(data)

    def put_stream(self, chunks: Iterable[bytes], *, expected_sha256: str) -> tuple[str, int]:
        """Store the bytes of ``chunks`` (an HTTP body, say) without a local copy.

        Raises:
            ArtifactError: the bytes do not hash to ``expected_sha256``, or there are none;
                nothing is stored. An exception raised by ``chunks`` propagates, and nothing is
                stored either.
        """
        check_sha256(expected_sha256)
        counted = _Counted(verified_chunks(chunks, expected_sha256, "artifact stream"))
        if self.exists(expected_sha256):
            for _ in counted:  # already stored: still refuse bytes that are not it
                pass
        else:
            self._write(expected_sha256, counted, None)
        return expected_sha256, counted.size

    def get_file(self, sha: str, dest: Path) -> int:
        """Copy the object to ``dest`` (temp file + ``os.replace``), checking its hash; return
        its size.

        Raises:
            ArtifactError: the stored bytes do not hash to ``sha`` (``dest`` is left untouched),
                or ``dest`` cannot be written.
        """
        return write_atomic(verified_chunks(self.iter_range(sha), sha, f"artifact {sha}"), dest)

    @abc.abstractmethod
    def _write(self, sha: str, chunks: Iterable[bytes], size: int | None) -> None:
        """Store ``chunks`` under ``sha`` so that the object appears whole or not at all.

        ``chunks`` is verified: it raises instead of ending when the bytes are not ``sha``'s,
        and the backend must then store nothing. ``size``: bytes to come, when known.
        """

    @abc.abstractmethod
    def exists(self, sha: str) -> bool: ...

    @abc.abstractmethod
    def size(self, sha: str) -> int:
        """Bytes of the object."""

    @abc.abstractmethod
    def read_bytes(self, sha: str) -> bytes: ...

    @abc.abstractmethod
    def iter_range(self, sha: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of the object (``end`` None: to its end), in chunks.

        The object's existence and the range are checked before this returns, so a caller can
        still answer an error before it starts a response.

        Raises:
            InvalidRequestError: the range is not inside the object.
        """

    @abc.abstractmethod
    def local_path(self, sha: str) -> Path:
        """A local file holding the object's bytes, for readers that need a path (the trainer):
        the object itself for a local directory, a verified cached copy for an object store."""

    @abc.abstractmethod
    def delete(self, sha: str) -> None:
        """Remove the object; no error when it is already gone."""

    @abc.abstractmethod
    def list_objects(self) -> Iterator[StoredObject]:
        """Every object in the store, in no order; names that are not a sha256 (a temp file of
        a write in progress, something else in the bucket) are skipped."""


class _Counted:
    """Iterates ``chunks`` once, counting their bytes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.size += len(chunk)
            yield chunk


def read_chunks(src: BinaryIO, what: str) -> Iterator[bytes]:
    """``src``'s bytes in CHUNK_BYTES pieces; a read error becomes ArtifactError."""
    while True:
        try:
            chunk = src.read(CHUNK_BYTES)
        except OSError as exc:
            raise ArtifactError(f"cannot read {what}: {exc}") from exc
        if not chunk:
            return
        yield chunk


def hash_file(src: Path) -> tuple[str, int]:
    """(sha256, size) of a local file. Raises ArtifactError when it is unreadable or empty."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fh:
            for chunk in read_chunks(fh, str(src)):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {src}: {exc}") from exc
    if size == 0:
        raise ArtifactError(f"artifact {src} is empty")
    return digest.hexdigest(), size


def check_expected(expected_sha256: str | None) -> None:
    """Refuse a malformed expected hash before any byte moves (InvalidRequestError)."""
    if expected_sha256 is not None:
        check_sha256(expected_sha256)


def verified_chunks(
    chunks: Iterable[bytes], expected_sha256: str, what: str, size: int | None = None
) -> Iterator[bytes]:
    """Pass ``chunks`` through, hashing them; at their end, raise ArtifactError instead of
    finishing when they do not hash to ``expected_sha256`` (or are not ``size`` bytes long).

    A backend completes a write only once its input is exhausted (``os.replace`` after the last
    chunk, a multipart upload's completion, a single PUT of the whole body), so bytes that fail
    this check are never stored.
    """
    digest = hashlib.sha256()
    total = 0
    for chunk in chunks:
        digest.update(chunk)
        total += len(chunk)
        yield chunk
    if total == 0:
        raise ArtifactError(f"{what} is empty")
    sha = digest.hexdigest()
    if sha != expected_sha256:
        raise ArtifactError(f"{what} hashes to {sha}, expected {expected_sha256}")
    if size is not None and total != size:
        raise ArtifactError(f"{what} is {total} bytes, expected {size}")


def write_atomic(chunks: Iterable[bytes], dest: Path) -> int:
    """Write ``chunks`` to ``dest`` atomically (temp file beside it, fsync, ``os.replace``);
    return the size. If ``chunks`` raises, that exception propagates, ``dest`` is untouched and
    the temp file removed.

    Raises:
        ArtifactError: dest cannot be written.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".incoming-")
    except OSError as exc:
        raise ArtifactError(f"cannot write {dest}: {exc}") from exc
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:  # the source's own errors pass through untranslated
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise ArtifactError(f"cannot write {dest}: {exc}") from exc
                size += len(chunk)
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise ArtifactError(f"cannot write {dest}: {exc}") from exc
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            raise ArtifactError(f"cannot write {dest}: {exc}") from exc
        return size
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_range(sha: str, start: int, end: int | None, size: int) -> tuple[int, int]:
    """``(start, end)`` with ``end`` filled in, if ``0 <= start <= end <= size``.

    Raises:
        InvalidRequestError: the range is not inside the object.
    """
    stop = size if end is None else end
    if not 0 <= start <= stop <= size:
        raise InvalidRequestError(
            f"range [{start}, {stop}) is outside artifact {sha} of {size} bytes"
        )
    return start, stop
