"""On-disk state of one agent, written atomically (temp file + fsync + os.replace).

Layout under ``state_dir``::

    models/<sha256>.onnx      verified artifacts, content-addressed
    downloads/<sha256>.part   partial downloads (resumable)
    state.json                current + previous good install, highest release accepted
    spool/                    captured samples awaiting upload (see capture.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE_VERSION = 1
_HASH_CHUNK = 1024 * 1024  # bytes read per step while hashing


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class InstallRecord:
    """One accepted install: the signed envelope it came from and where its bytes live."""

    envelope: dict[str, Any]  # SignedEnvelope.to_dict(), re-verified on every start
    sha256: str
    model_version: int
    release: int
    rollout_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstallRecord:
        return cls(
            envelope=dict(d["envelope"]),
            sha256=str(d["sha256"]),
            model_version=int(d["model_version"]),
            release=int(d["release"]),
            rollout_id=d.get("rollout_id"),
        )


@dataclass(frozen=True)
class PersistedState:
    current: InstallRecord | None = None
    previous: InstallRecord | None = None  # the last good install before ``current``
    highest_release: int = 0  # highest release ever accepted (rollback protection)

    def to_json(self) -> bytes:
        d = {
            "state_version": STATE_VERSION,
            "current": asdict(self.current) if self.current else None,
            "previous": asdict(self.previous) if self.previous else None,
            "highest_release": self.highest_release,
        }
        return json.dumps(d, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> PersistedState:
        d = json.loads(raw)
        return cls(
            current=InstallRecord.from_dict(d["current"]) if d.get("current") else None,
            previous=InstallRecord.from_dict(d["previous"]) if d.get("previous") else None,
            highest_release=int(d.get("highest_release", 0)),
        )


class ModelStore:
    """Paths and atomic persistence for one agent's ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        self.state_path = self.root / "state.json"
        for d in (self.models_dir, self.downloads_dir):
            d.mkdir(parents=True, exist_ok=True)

    def model_path(self, sha256: str) -> Path:
        return self.models_dir / f"{sha256}.onnx"

    def part_path(self, sha256: str) -> Path:
        return self.downloads_dir / f"{sha256}.part"

    def has_model(self, sha256: str) -> bool:
        return self.model_path(sha256).is_file()

    def activate(self, part: Path, sha256: str) -> Path:
        """Move a verified download into ``models/`` atomically and return its path."""
        dest = self.model_path(sha256)
        os.replace(part, dest)
        fsync_dir(self.models_dir)
        return dest

    def load_state(self) -> PersistedState:
        """The persisted state; an unreadable file counts as empty (nothing is trusted)."""
        try:
            return PersistedState.from_json(self.state_path.read_bytes())
        except FileNotFoundError:
            return PersistedState()
        except (OSError, ValueError, KeyError, TypeError):
            corrupt = self.state_path.with_suffix(".corrupt")
            os.replace(self.state_path, corrupt)
            return PersistedState()

    def save_state(self, state: PersistedState) -> None:
        atomic_write(self.state_path, state.to_json())

    def collect_garbage(self, keep: set[str]) -> list[str]:
        """Delete artifacts and partial downloads whose sha is not in ``keep``; return them."""
        removed: list[str] = []
        for path in list(self.models_dir.glob("*.onnx")) + list(self.downloads_dir.glob("*.part")):
            if path.name.split(".", 1)[0] not in keep:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed
