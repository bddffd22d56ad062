"""Content-addressed artifact store: ``<root>/<sha256>``, written atomically, verified on ingest."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from server.core.errors import ArtifactError, InvalidRequestError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024  # bytes read per step while hashing/copying


def check_sha256(sha: str) -> str:
    """Return ``sha`` if it is 64 lowercase hex characters. Raises InvalidRequestError."""
    if not SHA256_RE.match(sha):
        raise InvalidRequestError("artifact id must be a sha256: 64 lowercase hex characters")
    return sha


class ArtifactStore:
    """Stores model files by their sha256. Writes go to a temp file, then ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / check_sha256(sha)

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def put_file(self, src: Path, *, expected_sha256: str | None = None) -> tuple[str, int]:
        """Copy ``src`` into the store and return (sha256, size).

        Raises:
            ArtifactError: the bytes do not hash to ``expected_sha256``, or src is unreadable.
        """
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while chunk := inp.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256:
                raise ArtifactError(f"artifact hashes to {sha}, expected {expected_sha256}")
            if size == 0:
                raise ArtifactError(f"artifact {src} is empty")
            os.replace(tmp, self.root / sha)
            return sha, size
        except OSError as exc:
            raise ArtifactError(f"cannot store artifact {src}: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".bytes-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return self.put_file(Path(tmp), expected_sha256=hashlib.sha256(data).hexdigest())
        finally:
            os.unlink(tmp)
