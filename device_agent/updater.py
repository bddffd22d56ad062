"""The update coordinator: runs the state machine of ``states.py`` and owns its side channels.

The updater persists each next state before its handler acts, reports every state it enters,
resumes whatever state the agent died in, and maps errors: ``ContentError`` -> REFUSED (final),
``TransportError`` / ``ModelLoadError`` / ``OSError`` -> FAILED (retried with backoff). Whatever
goes wrong, a verified model keeps serving: a new session is built and warmed off the serving
path and swapped in only after the slot pointer moved to a complete, verified file.

Threading: exactly one worker thread calls ``offer``/``step``/``handle_target``; readers use the
properties, which read immutable snapshots.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from contract import MessageError
from contract.manifest import Manifest
from contract.messages import (
    MAX_REASON_CHARS,
    DeviceState,
    StatusReport,
    TargetMessage,
    bounded_id,
    clean_text,
)
from device_agent import states
from device_agent.config import AgentConfig
from device_agent.errors import (
    AgentError,
    ContentError,
    LengthError,
    ModelLoadError,
    RootInvalidError,
    SignatureInvalidError,
    TransportError,
)
from device_agent.faults import crash_point
from device_agent.fetcher import Fetcher, backoff_delay
from device_agent.probation import LiveTracker
from device_agent.runtime import Loaded, ModelRuntime, runtime_version
from device_agent.shadow import ShadowRunner
from device_agent.store import InstallRecord, ModelStore, PersistedState, UpdateJob
from device_agent.verify import (
    DeviceFacts,
    ReleaseTrust,
    verify_artifact,
    verify_installed,
    verify_target,
)

log = logging.getLogger(__name__)
S = DeviceState
Reporter = Callable[[StatusReport], None]
SETTLED = frozenset({S.COMMITTED, S.ROLLED_BACK, S.REFUSED, S.ALREADY_INSTALLED, S.IDLE, S.SHADOW})


class Updater:
    """Applies signed targets to one agent's runtime and store through the state machine."""

    probation_tick_s = 0.05  # seconds between probation evaluations

    def __init__(
        self,
        config: AgentConfig,
        *,
        store: ModelStore,
        runtime: ModelRuntime,
        fetcher: Fetcher,
        report: Reporter,
        clock: Callable[[], float],
        live: LiveTracker | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.fetcher = fetcher
        self.live = live or LiveTracker()
        self.policy = config.probation_policy()
        self._report_fn = report
        self._clock = clock
        self._monotonic = monotonic
        self._stop = stop or threading.Event()
        self._trusted, self._roots = self._load_trust(config, store)
        self._device = DeviceFacts(
            device_id=config.device_id,
            groups=tuple(config.groups),
            hardware_class=config.hardware,
            max_opset=config.max_opset,
            runtime_version=runtime_version(),
        )
        self.state: PersistedState = store.load_state()
        self._manifest_cache: tuple[str, Manifest] | None = None
        self._old: Loaded | None = None  # the previous session, kept warm during probation
        self._probation_t0 = monotonic()
        self._finalized = False  # the settled state's handler ran in this process
        self._retry_at = 0.0
        self._pending: TargetMessage | None = None  # arrived during probation
        self.last_state: DeviceState = S.IDLE
        self.last_error: str | None = None
        self.shadow: ShadowRunner | None = None  # a shadow release's challenger, if any

    @staticmethod
    def _load_trust(
        config: AgentConfig, store: ModelStore
    ) -> tuple[ReleaseTrust, list[dict[str, Any]]]:
        """Pinned root + the persisted chain, re-verified (legacy: the pinned release keys)."""
        if config.trusted_root is None:
            return ReleaseTrust.legacy(config.trusted_keys, config.signature_threshold), []
        learned = store.load_roots()
        trust, kept, problem = ReleaseTrust.pinned(config.trusted_root, learned)
        if problem is not None:
            log.error("persisted root chain cut at a bad entry: %s", problem)
            store.save_roots([dict(e) for e in kept])
        return trust, [dict(e) for e in kept]

    def learn_roots(self, envelopes: list[dict[str, Any]]) -> int:
        """Apply root metadata newer than the trusted root: persisted first, then trusted.

        Returns the trusted root version (0 in legacy mode). Raises RootInvalidError.
        """
        trust, applied = self._trusted.with_roots(envelopes)
        if applied:
            roots = self._roots + [dict(e) for e in applied]
            self.store.save_roots(roots)
            self._roots, self._trusted = roots, trust
            log.info("trusted root is now version %d", self.root_version)
        return self.root_version

    # ---- read-only views -------------------------------------------------------------------
    @property
    def trusted(self) -> ReleaseTrust:
        """The keys that may sign now (release role of the newest trusted root; also what a
        capture policy must be signed by)."""
        return self._trusted

    @property
    def root_version(self) -> int:
        root = self._trusted.root
        return root.version if root is not None else 0

    @property
    def persisted(self) -> PersistedState:
        return self.state

    @property
    def highest_release(self) -> int:
        return self.state.highest_release

    @property
    def current(self) -> InstallRecord | None:
        return self.state.current

    @property
    def job(self) -> UpdateJob | None:
        return self.state.update

    @property
    def busy(self) -> bool:
        """True while a step is due: an active state, an unfinished settle, or a due retry."""
        job = self.state.update
        if job is None:
            return self._pending is not None
        if job.state in states.ACTIVE:
            return True
        if job.state == S.FAILED:
            return self._monotonic() >= self._retry_at
        return not self._finalized or self._pending is not None

    def probation_elapsed(self) -> float:
        return self._monotonic() - self._probation_t0

    # ---- start-up ----------------------------------------------------------------------------
    def resume(self) -> Loaded | None:
        """Serve the active slot after re-verifying it; fall back to the previous slot.

        A job found on probation counts a boot; past ``probation_max_boots`` it is rolled back
        here, before the suspect model is even loaded (a model that crashes the agent cannot
        crash-loop it). Never raises for bad persisted state: it is logged and skipped.
        """
        for tmp in self.store.stray_temp_files():
            tmp.unlink(missing_ok=True)
        job = self.state.update
        rolled_back = False
        if job is not None and job.state == S.PROBATION:
            job = replace(job, boots=job.boots + 1)
            if job.boots > self.config.probation_max_boots:
                reason = f"agent restarted {job.boots - 1} times during probation"
                self.persist(states.rollback(self, job, reason))
                rolled_back = True
            else:
                self.persist(replace(self.state, update=job))
        if job is not None and job.state == S.FAILED:
            self._retry_at = self._monotonic() + self._retry_delay(job.attempts)
        st = self.state
        for which, rec in (("current", st.current), ("previous", st.previous)):
            if rec is None:
                continue
            try:
                loaded = self._load_record(rec)
            except (AgentError, OSError) as exc:
                log.error("persisted %s model rejected: %s", which, exc)
                self.last_error = f"persisted {which} model rejected: {exc}"
                continue
            self.runtime.swap(loaded)
            if which == "previous":
                self.persist(replace(st, current=rec, previous=None))
            log.info("resumed model version %d release %d", rec.model_version, rec.release)
            job = self.state.update
            if job is not None:
                self.last_state = job.state
                if rolled_back:
                    self.report(S.ROLLED_BACK, job, job.reason)
            return loaded
        return None

    def _load_record(self, rec: InstallRecord) -> Loaded:
        manifest = verify_installed(
            rec.envelope,
            self._trusted,
            model_line=self.config.model_line,
            sha256=rec.sha256,
            threshold=self.config.signature_threshold,
        )
        path = self.store.model_path(rec.sha256)
        if not path.is_file():
            raise LengthError(f"artifact {path.name} is missing")
        verify_artifact(path, manifest.artifact)
        return self.runtime.load(path, manifest)

    # ---- driving the machine -----------------------------------------------------------------
    def offer(self, target: TargetMessage) -> None:
        """A target arrived. Starts a job unless one is mid-way on the same target; a target
        arriving during probation waits until the probation settles."""
        job = self.state.update
        if job is not None and job.state == S.PROBATION:
            self._pending = target
            return
        if (
            job is not None
            and (job.state in states.PRE_SWAP or job.state == S.FAILED)
            and job.target == target.to_dict()
        ):
            return  # already working on (or waiting to retry) exactly this target
        if job is not None and job.state in (S.COMMITTED, S.ROLLED_BACK) and not self._finalized:
            self._pending = target  # finish the settle first
            return
        log.info(
            "target received (rollout %s, artifact %s)", target.rollout_id, target.artifact_url
        )
        new = UpdateJob(
            state=S.NOTIFIED, target=target.to_dict(), sha256="", release=0, model_version=0
        )
        self._manifest_cache = None
        self.persist(replace(self.state, update=new))

    def step(self) -> DeviceState:
        """Run the handler of the current state once; persist and report the next state."""
        job = self.state.update
        if job is None or (job.state in SETTLED and self._finalized):
            if self._pending is not None:
                target, self._pending = self._pending, None
                self.offer(target)
            job = self.state.update
            if job is None or (job.state in SETTLED and self._finalized):
                return self.last_state
        if job.state == S.FAILED:
            if self._monotonic() < self._retry_at:
                return S.FAILED
            job = replace(job, state=S.NOTIFIED)
            self.persist(replace(self.state, update=job))
        handler = states.HANDLERS.get(job.state)
        if handler is None:  # settled states without side effects (REFUSED, ...)
            self._finalized = True
            return job.state
        try:
            nxt = handler(self, job)
        except ContentError as exc:
            return self._settle_error(S.REFUSED, job, exc)
        except (TransportError, ModelLoadError, OSError) as exc:
            return self._settle_error(S.FAILED, job, exc)
        if job.state in SETTLED:
            self._finalized = True
        new_job = nxt.update
        if nxt is not self.state:
            self.persist(nxt)
        if new_job is not None and new_job.state != job.state:
            self._enter(new_job)
        return self.state.update.state if self.state.update else S.IDLE

    def _enter(self, job: UpdateJob) -> None:
        """Bookkeeping and the report for a state just persisted."""
        self._finalized = False
        if job.state == S.PROBATION:
            self._probation_t0 = self._monotonic()
        elif job.state == S.ROLLED_BACK:
            self.finish_rollback()  # revert at once, so the report names the model serving
        self.report(job.state, job, job.reason)
        crash_point(f"state:{job.state.value}")

    def handle_target(self, target: TargetMessage) -> DeviceState:
        """Apply one target synchronously and return the state it settled in (FAILED returns
        at once, without waiting for the retry)."""
        self.offer(target)
        while not self._stop.is_set():
            state = self.step()
            job = self.state.update
            if state == S.FAILED:
                return state
            if job is not None and job.state in SETTLED and self._finalized and not self._pending:
                return state
        return self.state.update.state if self.state.update else S.IDLE

    # ---- services for the state handlers -----------------------------------------------------
    def manifest_for(self, job: UpdateJob) -> Manifest:
        """The job's target, verified (cached per job). Raises a ContentError."""
        key = repr(sorted(job.target["envelope"].items()))
        if self._manifest_cache is not None and self._manifest_cache[0] == key:
            return self._manifest_cache[1]
        # Anything but the agent's own errors from untrusted bytes is a bug in a parser, and
        # still a refusal of these bytes: translated here, so the job settles and is reported.
        try:
            target = TargetMessage.from_dict(job.target)
        except MessageError as exc:
            raise SignatureInvalidError(f"target message: {exc}") from exc
        except Exception as exc:
            raise SignatureInvalidError(f"target message: {type(exc).__name__}: {exc}") from exc
        try:
            self.learn_roots(list(target.roots))
        except (AgentError, OSError):
            raise
        except Exception as exc:
            raise RootInvalidError(f"root metadata: {type(exc).__name__}: {exc}") from exc
        try:
            manifest = verify_target(
                target,
                self._trusted,
                model_line=self.config.model_line,
                highest_release=self.state.highest_release,
                now=datetime.fromtimestamp(self._clock(), tz=UTC),
                device=self._device,
                skew_s=self.config.clock_skew_s,
            )
        except AgentError:
            raise
        except Exception as exc:
            raise SignatureInvalidError(f"envelope: {type(exc).__name__}: {exc}") from exc
        self._manifest_cache = (key, manifest)
        return manifest

    def record_for(self, job: UpdateJob, manifest: Manifest) -> InstallRecord:
        return InstallRecord(
            envelope=dict(job.target["envelope"]),
            sha256=manifest.artifact.sha256,
            model_version=manifest.model_version,
            release=manifest.release,
            rollout_id=bounded_id(job.target.get("rollout_id")),
        )

    def swap_in(self, loaded: Loaded, *, keep_old: bool) -> None:
        """Serve ``loaded``; keep the old session warm for a rollback, or release it."""
        self.live.reset(loaded.sha256)
        old = self.runtime.swap(loaded, retire=not keep_old)
        if keep_old:
            self._old = old
        del old
        if not keep_old:
            self.runtime.release_retired(self.config.release_wait_s)

    def finish_commit(self) -> None:
        if self._old is not None:
            self.runtime.retire(self._old)
            self._old = None
        self.runtime.release_retired(self.config.release_wait_s)
        keep = {r.sha256 for r in (self.state.current, self.state.previous) if r is not None}
        self.live.forget_except(keep)
        removed = self.store.collect_garbage(keep)
        if removed:
            log.info("garbage-collected %s", ", ".join(removed))

    def finish_rollback(self) -> None:
        cur = self.state.current
        serving = self.runtime.current
        if cur is not None and (serving is None or serving.sha256 != cur.sha256):
            old, self._old = self._old, None
            if old is None or old.sha256 != cur.sha256:
                old = self._load_record(cur)  # after a restart: load the previous slot again
            self.runtime.swap(old, retire=True)
            del old
        elif self._old is not None:
            self.runtime.retire(self._old)
            self._old = None
        self.runtime.release_retired(self.config.release_wait_s)

    # ---- shadow releases (see device_agent.shadow) ------------------------------------------
    def start_shadow(self, loaded: Loaded) -> None:
        """Run ``loaded`` beside the serving model (replacing any earlier challenger)."""
        old, self.shadow = self.shadow, ShadowRunner(loaded).start()
        if old is not None:
            old.stop()
        log.info("shadow: model version %d runs beside the champion", loaded.model_version)

    def drop_shadow(self) -> None:
        """Stop running the challenger (a serve target arrived, or the shadow was withdrawn)."""
        old, self.shadow = self.shadow, None
        if old is not None:
            old.stop()
            log.info("shadow: model version %d dropped", old.model_version)

    def resume_shadow(self) -> None:
        """After a restart in state SHADOW: verify and load the challenger again."""
        job = self.state.update
        if job is None or job.state != S.SHADOW or self.shadow is not None:
            return
        rec = InstallRecord(
            envelope=dict(job.target["envelope"]),
            sha256=job.sha256,
            model_version=job.model_version,
            release=job.release,
        )
        try:
            self.start_shadow(self._load_record(rec))
        except (AgentError, OSError) as exc:
            log.error("persisted shadow model rejected: %s", exc)
            self.last_error = f"persisted shadow model rejected: {exc}"

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def persist(self, state: PersistedState) -> None:
        self.store.save_state(state)
        self.state = state
        if state.update is not None:
            self.last_state = state.update.state

    def refuse_message(self, reason: str) -> None:
        """Report a target message that could not even be parsed (no field of it is copied)."""
        self.last_error = clean_text(reason)
        self.report(S.REFUSED, None, self.last_error)

    # ---- helpers -----------------------------------------------------------------------------
    def _retry_delay(self, attempts: int) -> float:
        base = self.config.update_retry_s
        return backoff_delay(max(0, attempts - 1), base, base * 8)

    def _settle_error(self, state: DeviceState, job: UpdateJob, exc: BaseException) -> DeviceState:
        reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
        log.warning("update %s: %s", state.value, reason)
        self.last_error = reason
        attempts = job.attempts + 1 if state == S.FAILED else job.attempts
        failed = replace(job, state=state, reason=reason, attempts=attempts)
        try:
            self.persist(replace(self.state, update=failed))
        except OSError:  # disk trouble: remember in memory, the old model keeps serving
            self.state = replace(self.state, update=failed)
            self.last_state = state
        if state == S.FAILED:
            self._retry_at = self._monotonic() + self._retry_delay(attempts)
        self._finalized = True
        report_job = failed if job.release else None
        self.report(state, report_job, reason, target=job.target)
        return state

    def report(
        self,
        state: DeviceState,
        job: UpdateJob | None,
        reason: str | None = None,
        *,
        target: dict | None = None,  # type: ignore[type-arg]
    ) -> None:
        serving = self.runtime.current
        self.last_state = state
        tgt = job.target if job is not None else target
        report = StatusReport(
            device_id=self.config.device_id,
            ts=self._clock(),
            state=state,
            model_line=self.config.model_line,
            model_version=serving.model_version if serving else None,
            release=self.state.highest_release or None,
            # Not covered by the signature: copied only when the server can store it.
            rollout_id=bounded_id(tgt.get("rollout_id")) if isinstance(tgt, dict) else None,
            target_release=job.release if job is not None and job.release else None,
            reason=clean_text(reason) if reason else None,
        )
        try:
            self._report_fn(report)
        except Exception:  # reporting must never break the update flow
            log.exception("status report failed")
