"""The update flow: verify a target, obtain its artifact, swap it in, persist, report.

The updater coordinates; decisions live in ``verify.py`` (pure) and I/O goes through the injected
fetcher, store, runtime, reporter and clock. Every step reports a StatusReport. Whatever goes
wrong, the model that was serving keeps serving, untouched: the new session is built and warmed
up off the serving path and only swapped in once everything checked out.

Flow (one Mender-style step per method)::

    NOTIFIED -> [ALREADY_INSTALLED] | DOWNLOADING -> VERIFYING -> INSTALLING -> INSTALLED
             -> COMMITTED (probation hook: ``_commit``)
    any ContentError -> REFUSED       any TransportError / ModelLoadError -> FAILED
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from contract.manifest import Manifest
from contract.messages import MAX_REASON_CHARS, DeviceState, StatusReport, TargetMessage
from device_agent.config import AgentConfig
from device_agent.errors import (
    AgentError,
    ContentError,
    HashMismatchError,
    LengthError,
    ModelLoadError,
    TransportError,
)
from device_agent.fetcher import Fetcher
from device_agent.runtime import Loaded, ModelRuntime
from device_agent.store import InstallRecord, ModelStore, PersistedState
from device_agent.verify import load_trusted_keys, verify_artifact, verify_installed, verify_target

log = logging.getLogger(__name__)

Reporter = Callable[[StatusReport], None]


class Updater:
    """Applies signed targets to one agent's runtime and store. Not thread-safe by design:
    exactly one worker thread calls ``handle_target``; readers use the properties."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        store: ModelStore,
        runtime: ModelRuntime,
        fetcher: Fetcher,
        report: Reporter,
        clock: Callable[[], float],
    ) -> None:
        self._cfg = config
        self._store = store
        self._runtime = runtime
        self._fetcher = fetcher
        self._report_fn = report
        self._clock = clock
        self._trusted = load_trusted_keys(config.trusted_keys)
        self._state = store.load_state()
        self._lock = threading.Lock()  # guards the read-mostly fields below
        self.last_state: DeviceState = DeviceState.IDLE
        self.last_error: str | None = None

    # ---- read-only views -------------------------------------------------------------------
    @property
    def persisted(self) -> PersistedState:
        return self._state

    @property
    def highest_release(self) -> int:
        return self._state.highest_release

    @property
    def current(self) -> InstallRecord | None:
        return self._state.current

    # ---- start-up ----------------------------------------------------------------------------
    def resume(self) -> Loaded | None:
        """Serve the persisted model after re-verifying its signature and sha256.

        Falls back to the previous good install; with neither, nothing serves until a target
        arrives. Never raises for bad persisted state: it is logged and skipped.
        """
        state = self._state
        for which, rec in (("current", state.current), ("previous", state.previous)):
            if rec is None:
                continue
            try:
                manifest = verify_installed(
                    rec.envelope,
                    self._trusted,
                    model_line=self._cfg.model_line,
                    sha256=rec.sha256,
                    threshold=self._cfg.signature_threshold,
                )
                path = self._store.model_path(rec.sha256)
                if not path.is_file():
                    raise LengthError(f"artifact {path.name} is missing")
                verify_artifact(path, manifest.artifact)
                loaded = self._runtime.load(path, manifest)
            except (AgentError, OSError) as exc:
                log.error("persisted %s model rejected: %s", which, exc)
                self.last_error = f"persisted {which} model rejected: {exc}"
                continue
            self._runtime.swap(loaded)
            if which == "previous":
                self._persist(replace(state, current=rec, previous=None))
            log.info("resumed model version %d release %d", rec.model_version, rec.release)
            return loaded
        return None

    # ---- the update flow ---------------------------------------------------------------------
    def handle_target(self, target: TargetMessage) -> DeviceState:
        """Apply one target and return the state it settled in (see module docstring)."""
        release: int | None = None
        try:
            log.info(
                "target received (rollout %s, artifact %s)", target.rollout_id, target.artifact_url
            )
            manifest = self._verify(target)
            release = manifest.release
            self._report(DeviceState.NOTIFIED, target, release)
            cur = self._state.current
            serving = self._runtime.current
            if (
                cur is not None
                and serving is not None
                and serving.sha256 == manifest.artifact.sha256
            ):
                return self._already_installed(target, manifest, cur)
            path = self._obtain(target, manifest)
            self._report(DeviceState.INSTALLING, target, release)
            loaded = self._runtime.load(path, manifest)
            self._install(target, manifest, loaded)
            self._report(DeviceState.INSTALLED, target, release)
            self._commit(target, manifest)
            log.info("release %d (model version %d) committed", release, manifest.model_version)
            return DeviceState.COMMITTED
        except ContentError as exc:
            return self._fail(DeviceState.REFUSED, target, release, exc)
        except (TransportError, ModelLoadError) as exc:
            return self._fail(DeviceState.FAILED, target, release, exc)
        except OSError as exc:  # disk full, permissions: the old model keeps serving
            return self._fail(DeviceState.FAILED, target, release, exc)

    def _verify(self, target: TargetMessage) -> Manifest:
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        return verify_target(
            target,
            self._trusted,
            model_line=self._cfg.model_line,
            highest_release=self._state.highest_release,
            now=now,
            threshold=self._cfg.signature_threshold,
        )

    def _already_installed(
        self, target: TargetMessage, manifest: Manifest, cur: InstallRecord
    ) -> DeviceState:
        """Same bytes already serve: adopt the newer signed envelope and release, no download."""
        if manifest.release > cur.release or target.rollout_id != cur.rollout_id:
            rec = self._record(target, manifest)
            self._persist(
                replace(
                    self._state,
                    current=rec,
                    highest_release=max(self._state.highest_release, manifest.release),
                )
            )
        self._report(DeviceState.ALREADY_INSTALLED, target, manifest.release)
        return DeviceState.ALREADY_INSTALLED

    def _obtain(self, target: TargetMessage, manifest: Manifest) -> Path:
        """A verified artifact in ``models/``: reused if held (e.g. an operator rollback),
        otherwise downloaded to ``downloads/<sha>.part`` and activated only after checks."""
        ref = manifest.artifact
        if self._store.has_model(ref.sha256):
            path = self._store.model_path(ref.sha256)
            self._report(DeviceState.VERIFYING, target, manifest.release)
            try:
                verify_artifact(path, ref)
            except ContentError:
                path.unlink(missing_ok=True)  # corrupted on disk: fall through to a download
            else:
                return path
        if ref.size > self._cfg.max_artifact_bytes:
            raise LengthError(
                f"artifact of {ref.size} bytes exceeds the cap of {self._cfg.max_artifact_bytes}"
            )
        part = self._store.part_path(ref.sha256)
        self._report(DeviceState.DOWNLOADING, target, manifest.release)
        self._fetcher.fetch(target.artifact_url, part, expected_size=ref.size)
        self._report(DeviceState.VERIFYING, target, manifest.release)
        try:
            verify_artifact(part, ref)
        except (HashMismatchError, LengthError):
            part.unlink(missing_ok=True)  # never resume from bytes that failed the check
            raise
        return self._store.activate(part, ref.sha256)

    def _install(self, target: TargetMessage, manifest: Manifest, loaded: Loaded) -> None:
        """Swap the warmed-up session in, then persist (before INSTALLED is reported)."""
        old_loaded = self._runtime.swap(loaded)
        old = self._state.current
        rec = self._record(target, manifest)
        previous = old if old is not None and old.sha256 != rec.sha256 else self._state.previous
        try:
            self._persist(
                PersistedState(
                    current=rec,
                    previous=previous,
                    highest_release=max(self._state.highest_release, manifest.release),
                )
            )
        except OSError:
            if old_loaded is not None:  # could not record it: keep serving what is recorded
                self._runtime.swap(old_loaded)
            raise

    def _commit(self, target: TargetMessage, manifest: Manifest) -> None:
        """Probation hook: today a model is committed as soon as it serves. A future version
        watches accuracy/latency for a window here and rolls back to ``previous`` instead."""
        self._report(DeviceState.COMMITTED, target, manifest.release)
        keep = {r.sha256 for r in (self._state.current, self._state.previous) if r is not None}
        removed = self._store.collect_garbage(keep)
        if removed:
            log.info("garbage-collected %s", ", ".join(removed))

    def refuse_message(self, reason: str) -> None:
        """Report a target message that could not even be parsed."""
        self.last_error = reason[:MAX_REASON_CHARS]
        self._report(DeviceState.REFUSED, None, None, self.last_error)

    # ---- helpers -----------------------------------------------------------------------------
    def _record(self, target: TargetMessage, manifest: Manifest) -> InstallRecord:
        return InstallRecord(
            envelope=dict(target.envelope),
            sha256=manifest.artifact.sha256,
            model_version=manifest.model_version,
            release=manifest.release,
            rollout_id=target.rollout_id,
        )

    def _persist(self, state: PersistedState) -> None:
        self._store.save_state(state)
        with self._lock:
            self._state = state

    def _fail(
        self, state: DeviceState, target: TargetMessage, release: int | None, exc: BaseException
    ) -> DeviceState:
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
        log.warning("target %s: %s", state.value, reason)
        self.last_error = reason
        self._report(state, target, release, reason)
        return state

    def _report(
        self,
        state: DeviceState,
        target: TargetMessage | None,
        target_release: int | None,
        reason: str | None = None,
    ) -> None:
        serving = self._runtime.current
        self.last_state = state
        report = StatusReport(
            device_id=self._cfg.device_id,
            ts=self._clock(),
            state=state,
            model_line=self._cfg.model_line,
            model_version=serving.model_version if serving else None,
            release=self._state.highest_release or None,
            rollout_id=target.rollout_id if target else None,
            target_release=target_release,
            reason=reason,
        )
        try:
            self._report_fn(report)
        except Exception:  # reporting must never break the update flow
            log.exception("status report failed")
