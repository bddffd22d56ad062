"""On-disk state of one agent, written atomically (temp file + fsync + os.replace + dir fsync).

Layout under ``state_dir``::

    models/<sha256>.onnx      verified artifacts, content-addressed (the A/B slots' bytes)
    downloads/<sha256>.part   partial downloads (resumable); never loaded from here
    state.json                slot pointers + update job + refused versions + release floor
    trust.json                root metadata envelopes newer than the pinned root (see below)
    spool/                    captured samples awaiting upload (see capture.py)
    outbox.jsonl              status/metrics reports held while the broker is unreachable

A/B slots: ``current`` is the slot that serves (on probation while the update job says so) and
``previous`` the last good install, kept until the new one is committed and beyond (it is the
fallback at start). Both point at fully verified files in ``models/``; a pointer only ever moves
to a file that is complete, fsynced and hash-checked. Because the pointers and the update job
live in one file, a crash can never separate "which model serves" from "where the update was".

Trust: ``highest_release`` (the release floor) lives in ``state.json`` and the learned root chain
in ``trust.json``; both are written only by this module with ``atomic_write``, never by a
download (downloads only ever write ``downloads/<sha256>.part``, and a sha256 is 64 hex chars, so
no download name can reach another file). ``trust.json`` is re-verified from the pinned root at
every start, so a corrupted or edited file can only lose roots (re-learned from the server),
never add trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contract.messages import DeviceState
from device_agent.faults import crash_point

STATE_VERSION = 2
REFUSED_MAX = 100  # refused versions remembered (oldest forgotten first)
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
        crash_point("store:before_replace")
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
class UpdateJob:
    """The update in progress (or the state it settled in): persisted before each step acts."""

    state: DeviceState
    target: dict[str, Any]  # TargetMessage.to_dict(); re-verified whenever a step needs it
    sha256: str
    release: int
    model_version: int
    attempts: int = 0  # transient failures so far (drives the retry backoff)
    boots: int = 0  # agent starts that found this job on probation (crash-loop guard)
    baseline: dict[str, Any] | None = None  # LiveSummary of the previous model at the swap
    reason: str | None = None  # why it failed, was refused or rolled back

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpdateJob:
        return cls(
            state=DeviceState(d["state"]),
            target=dict(d["target"]),
            sha256=str(d["sha256"]),
            release=int(d["release"]),
            model_version=int(d["model_version"]),
            attempts=int(d.get("attempts", 0)),
            boots=int(d.get("boots", 0)),
            baseline=d.get("baseline"),
            reason=d.get("reason"),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d


@dataclass(frozen=True)
class RefusedVersion:
    """A release this device rolled back (or whose bundle failed its self-test): never again."""

    sha256: str
    release: int
    model_version: int
    reason: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefusedVersion:
        return cls(
            sha256=str(d["sha256"]),
            release=int(d["release"]),
            model_version=int(d["model_version"]),
            reason=str(d.get("reason", "")),
        )


@dataclass(frozen=True)
class PersistedState:
    current: InstallRecord | None = None  # the active slot: serves at start
    previous: InstallRecord | None = None  # the last good install before ``current``
    highest_release: int = 0  # highest release ever committed (rollback protection)
    update: UpdateJob | None = None  # the update in progress or the last one settled
    refused: tuple[RefusedVersion, ...] = field(default=())

    def refuses(self, sha256: str, release: int) -> RefusedVersion | None:
        for r in self.refused:
            if r.sha256 == sha256 or r.release == release:
                return r
        return None

    def to_json(self) -> bytes:
        d = {
            "state_version": STATE_VERSION,
            "current": asdict(self.current) if self.current else None,
            "previous": asdict(self.previous) if self.previous else None,
            "highest_release": self.highest_release,
            "update": self.update.to_dict() if self.update else None,
            "refused": [asdict(r) for r in self.refused[-REFUSED_MAX:]],
        }
        return json.dumps(d, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> PersistedState:
        d = json.loads(raw)
        return cls(
            current=InstallRecord.from_dict(d["current"]) if d.get("current") else None,
            previous=InstallRecord.from_dict(d["previous"]) if d.get("previous") else None,
            highest_release=int(d.get("highest_release", 0)),
            update=UpdateJob.from_dict(d["update"]) if d.get("update") else None,
            refused=tuple(RefusedVersion.from_dict(r) for r in d.get("refused") or ()),
        )


class ModelStore:
    """Paths and atomic persistence for one agent's ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.downloads_dir = self.root / "downloads"
        self.state_path = self.root / "state.json"
        self.trust_path = self.root / "trust.json"
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
        crash_point("store:before_activate")
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

    def load_roots(self) -> list[dict[str, Any]]:
        """Root envelopes learned so far (unverified: the caller walks them from the pin)."""
        try:
            data = json.loads(self.trust_path.read_bytes())
            roots = data["roots"]
            if not isinstance(roots, list) or not all(isinstance(r, dict) for r in roots):
                raise ValueError("roots must be a list of objects")
            return roots
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError):
            os.replace(self.trust_path, self.trust_path.with_suffix(".corrupt"))
            return []

    def save_roots(self, roots: list[dict[str, Any]]) -> None:
        body = {"trust_version": 1, "roots": roots}
        atomic_write(self.trust_path, json.dumps(body, indent=1, sort_keys=True).encode("utf-8"))

    def stray_temp_files(self) -> list[Path]:
        """Leftovers of atomic writes a crash interrupted (never loaded; removed at start)."""
        return [p for d in (self.root, self.models_dir) for p in d.glob(".*.tmp")]

    def collect_garbage(self, keep: set[str]) -> list[str]:
        """Delete artifacts and partial downloads whose sha is not in ``keep``; return them."""
        removed: list[str] = []
        for path in list(self.models_dir.glob("*.onnx")) + list(self.downloads_dir.glob("*.part")):
            if path.name.split(".", 1)[0] not in keep:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed
