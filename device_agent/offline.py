"""Offline install: apply an exported release bundle with no server and no broker.

``edgeloop-agent install DIR`` (Mender's standalone mode). The bundle (``contract.bundle``:
index, manifest envelope, artifact, root chain) is read from DIR and turned into the same
``TargetMessage`` the server would send; the agent's own ``Updater`` then runs it through the
same state machine as an online update: root chain walk from the pinned root, manifest
signature, expiry, model line, targeting, release floor, artifact size (enforced while copying)
and sha256, ONNX Runtime load and self-test, and the same persistence (``state.json`` slots and
highest release, ``trust.json`` roots, ``models/``). A later ``edgeloop-agent run`` serves it.

Differences from an online update, and why:

- The only I/O is ``DirectoryFetcher``, a ``Fetcher`` that copies the artifact out of DIR with
  the HttpFetcher's bounds (signed size, ``max_artifact_bytes``), so no network is touched.
- The command returns once the release is persisted on probation (a device already serving a
  model) or committed (a first install): probation needs live traffic, so the next
  ``edgeloop-agent run`` judges it and commits, or rolls back to the ``previous`` slot.
- Refused while a job is on probation (finishing it needs live traffic: run the agent).
- The bundle's root v1 must be the device's pinned root (a bundle of another fleet is refused
  by name instead of by a signature count), and a job that fails transiently is not left for
  the online agent to retry, since it could not reach DIR.

Must not run while ``edgeloop-agent run`` runs on the same state directory (one writer).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from contract import MessageError, RootError, SignatureError
from contract.bundle import INDEX_FILE, MAX_INDEX_BYTES, BundleFormatError, BundleIndex
from contract.envelope import MAX_ENVELOPE_BYTES, SignedEnvelope
from contract.messages import DeviceState, StatusReport, TargetMessage
from contract.trust import as_envelope, load_pinned_root
from device_agent.config import AgentConfig
from device_agent.errors import (
    ContentError,
    LengthError,
    RootInvalidError,
    SignatureInvalidError,
)
from device_agent.fetcher import Fetcher
from device_agent.runtime import ModelRuntime
from device_agent.store import ModelStore
from device_agent.updater import Updater

log = logging.getLogger(__name__)
S = DeviceState
INSTALLED = frozenset({S.COMMITTED, S.PROBATION, S.SHADOW, S.ALREADY_INSTALLED})
MAX_STEPS = 64  # state machine steps one install may take (a handful in practice)


class BundleError(ContentError):
    """The bundle directory is incomplete or its index is malformed (nothing was verified)."""


@dataclass(frozen=True)
class InstallResult:
    """What ``install_bundle`` did. ``ok`` is True when the release now serves (or shadows)."""

    ok: bool
    state: DeviceState
    reason: str | None = None
    model_line: str | None = None
    release: int | None = None
    model_version: int | None = None
    sha256: str | None = None
    deployment: str | None = None
    highest_release: int = 0
    trust_root_version: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "state": self.state.value}


class DirectoryFetcher(Fetcher):
    """Copies an artifact out of a bundle directory, bounded like ``HttpFetcher``.

    ``url`` is a file name inside the directory (the bundle index's ``artifact``). The copy
    resumes from what ``dest`` holds, never writes past ``expected_size`` and stops at the first
    chunk that would cross it; a file of another size is wrong content (LengthError), not a
    transient failure.
    """

    def __init__(self, directory: Path, config: AgentConfig) -> None:
        self._dir = Path(directory)
        self._cap = config.max_artifact_bytes  # bytes
        self._chunk = config.download_chunk_bytes  # bytes per read

    def fetch(
        self,
        url: str,
        dest: Path,
        *,
        expected_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if expected_size > self._cap:
            raise LengthError(
                f"artifact of {expected_size} bytes exceeds the cap of {self._cap} bytes"
            )
        src = self._dir / url
        if Path(url).is_absolute() or ".." in Path(url).parts or not src.is_file():
            raise LengthError(f"bundle has no artifact file {url!r}")
        have = dest.stat().st_size if dest.exists() else 0
        if have > expected_size:
            dest.unlink()
            have = 0
        if have == expected_size:
            return  # complete from an earlier attempt; the updater checks the hash
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = have
        with open(src, "rb") as fin, open(dest, "ab" if have else "wb") as fout:
            fin.seek(have)
            while chunk := fin.read(self._chunk):
                if written + len(chunk) > expected_size:
                    fout.close()
                    dest.unlink(missing_ok=True)
                    raise LengthError(
                        f"bundle artifact {url} is larger than the signed size of "
                        f"{expected_size} bytes"
                    )
                fout.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written)
            fout.flush()
            os.fsync(fout.fileno())
        if written < expected_size:
            dest.unlink(missing_ok=True)
            raise LengthError(
                f"bundle artifact {url} ends after {written} of the signed {expected_size} bytes"
            )


def _read(path: Path, limit: int, what: str) -> bytes:
    """At most ``limit`` bytes of ``path``; BundleError when missing or larger."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path.name}: {exc.strerror or exc}") from exc
    if len(raw) > limit:
        raise BundleError(f"{what} {path.name} is over {limit} bytes")
    return raw


def read_bundle(directory: Path, config: AgentConfig) -> TargetMessage:
    """The target message a bundle directory stands for (parsed, not yet verified).

    Raises:
        BundleError: no readable index, a file it names is missing, or a limit is crossed.
        SignatureInvalidError: the envelope file is not a DSSE envelope.
        RootInvalidError: a root file is not an envelope, or root v1 is not the pinned root.
    """
    directory = Path(directory)
    try:
        index = BundleIndex.from_json(_read(directory / INDEX_FILE, MAX_INDEX_BYTES, "index"))
    except BundleFormatError as exc:
        raise BundleError(str(exc)) from exc
    try:
        envelope = SignedEnvelope.from_json(
            _read(directory / index.envelope, MAX_ENVELOPE_BYTES, "envelope")
        )
    except SignatureError as exc:
        raise SignatureInvalidError(f"{index.envelope}: {exc}") from exc
    roots: list[dict[str, Any]] = []
    for name in index.roots:
        try:
            roots.append(as_envelope(_read(directory / name, MAX_ENVELOPE_BYTES, "root")).to_dict())
        except RootError as exc:
            raise RootInvalidError(f"{name}: {exc}") from exc
    _check_pinned(roots[0], index.roots[0], config)
    if not (directory / index.artifact).is_file():
        raise BundleError(f"bundle has no artifact file {index.artifact!r}")
    target = TargetMessage(
        model_line=index.model_line,
        envelope=envelope.to_dict(),
        artifact_url=index.artifact,
        rollout_id=None,
        roots=tuple(roots[1:]),  # v1 is pinned; the updater applies the newer ones in order
    )
    try:  # the updater re-parses the persisted target: it must pass the message schema
        return TargetMessage.from_dict(target.to_dict())
    except MessageError as exc:
        raise BundleError(f"bundle index: {exc}") from exc


def _check_pinned(first: dict[str, Any], name: str, config: AgentConfig) -> None:
    """The bundle's first root must be this device's pinned root v1 (legacy mode: skipped)."""
    if config.trusted_root is None:
        return
    try:
        pinned = load_pinned_root(config.trusted_root)
        offered = load_pinned_root(first)
    except RootError as exc:
        raise RootInvalidError(f"{name}: {exc}") from exc
    if offered.to_payload() != pinned.to_payload():
        raise RootInvalidError(
            f"{name} is not this device's pinned root v{pinned.version}: "
            "the bundle was exported for another fleet"
        )


def install_bundle(
    config: AgentConfig,
    directory: Path,
    *,
    clock: Callable[[], float] = time.time,
    runtime: ModelRuntime | None = None,
    report: Callable[[StatusReport], None] | None = None,
) -> InstallResult:
    """Verify and install the bundle in ``directory`` into ``config.state_dir``.

    Runs the updater's state machine until the release is installed (committed at once on a
    device with no serving model; otherwise persisted on probation, which the next
    ``edgeloop-agent run`` judges on live traffic, as online) or refused.

    Never raises for bad content: a refusal is an ``InstallResult`` with ``ok`` False and the
    reason (error class name first, as a device reports it).
    """
    store = ModelStore(config.state_dir)
    runtime = runtime or ModelRuntime(
        intra_op_num_threads=config.intra_op_num_threads,
        graph_optimization=config.graph_optimization,
        min_free_memory_bytes=config.min_free_memory_bytes,
        load_headroom_factor=config.load_headroom_factor,
    )
    updater = Updater(
        config,
        store=store,
        runtime=runtime,
        fetcher=DirectoryFetcher(directory, config),
        report=report or _log_report,
        clock=clock,
    )
    before = updater.job
    if before is not None and before.state == S.PROBATION:
        return _result(
            updater,
            S.REFUSED,
            f"release {before.release} is on probation: run the agent until it commits or "
            "rolls back, then install",
        )
    try:
        target = read_bundle(directory, config)
    except ContentError as exc:
        return _result(updater, S.REFUSED, f"{type(exc).__name__}: {exc}")
    updater.resume()  # serve the current slot, as at an agent start: a swap goes on probation
    wanted = target.to_dict()
    state = updater.last_state
    try:
        updater.offer(target)
        for _ in range(MAX_STEPS):
            state = updater.step()
            job = updater.job
            if job is None or job.target != wanted:
                continue  # an earlier job settling first; ours is pending
            if state in (S.FAILED, S.PROBATION) or not updater.busy:
                break
    finally:
        updater.drop_shadow()  # a shadow release is resumed by the next `run`
    job = updater.job
    if state == S.FAILED and job is not None:
        # Nothing moved (slots move only after a load succeeds); do not leave a job whose
        # artifact lives in DIR for the online agent to retry.
        updater.persist(replace(updater.state, update=before))
    return _result(updater, state, job.reason if job is not None else None)


def _log_report(report: StatusReport) -> None:
    log.info("install: %s", report.state.value, extra={"report": report.to_dict()})


def _result(updater: Updater, state: DeviceState, reason: str | None) -> InstallResult:
    job = updater.job
    ok = state in INSTALLED and job is not None and job.release > 0
    return InstallResult(
        ok=ok,
        state=state,
        reason=None if ok else reason,
        model_line=updater.config.model_line,
        release=job.release if ok and job else None,
        model_version=job.model_version if ok and job else None,
        sha256=job.sha256 if ok and job else None,
        deployment=("shadow" if state == S.SHADOW else "serve") if ok else None,
        highest_release=updater.highest_release,
        trust_root_version=updater.root_version,
    )
