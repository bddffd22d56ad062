"""The update state machine: one small handler per state, each returning the next state.

The updater persists the returned ``PersistedState`` (slot pointers + job, one atomic file)
*before* the next handler acts, so an agent killed anywhere resumes from the state it died in and
repeats at most one idempotent step. Handlers raise the agent's errors; the updater maps
``ContentError`` to REFUSED and transport/load/disk errors to FAILED (retried with backoff).

::

    NOTIFIED ──verify──▶ DOWNLOADING ──▶ VERIFYING ──▶ INSTALLING ──persist, swap──▶ PROBATION
       │                     ▲              │ (hash bad once: fresh download)            │
       │                     └──────────────┘                      live metrics hold ──┤
       ├─▶ ALREADY_INSTALLED (same bytes serve)                   COMMITTED ◀───────────┤
       └─▶ REFUSED (signature, expiry, line, release, refused)   ROLLED_BACK ◀─ degraded ┘
    any step: ContentError ─▶ REFUSED; TransportError / ModelLoadError / OSError ─▶ FAILED
    first install (nothing to roll back to): INSTALLING ─▶ COMMITTED
    shadow release (manifest deployment "shadow"): INSTALLING ─▶ SHADOW (no swap: the model
    runs beside the serving one, see device_agent.shadow); the next serving target drops it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from contract.messages import DeviceState
from device_agent.errors import ContentError, LengthError, VersionRefusedError
from device_agent.faults import crash_point
from device_agent.probation import Action, LiveSummary, judge
from device_agent.store import PersistedState, RefusedVersion, UpdateJob
from device_agent.verify import verify_artifact

if TYPE_CHECKING:
    from device_agent.updater import Updater

Handler = Callable[["Updater", UpdateJob], PersistedState]
S = DeviceState


def _to(u: Updater, job: UpdateJob, state: DeviceState, **changes: object) -> PersistedState:
    return replace(u.state, update=replace(job, state=state, **changes))  # type: ignore[arg-type]


def on_notified(u: Updater, job: UpdateJob) -> PersistedState:
    """Verify the signed target; decide whether bytes are needed at all."""
    manifest = u.manifest_for(job)
    ref = manifest.artifact
    job = replace(
        job, sha256=ref.sha256, release=manifest.release, model_version=manifest.model_version
    )
    refused = u.state.refuses(ref.sha256, manifest.release)
    if refused is not None:
        raise VersionRefusedError(
            f"release {refused.release} (model version {refused.model_version}) was rolled back "
            f"on this device: {refused.reason}"
        )
    u.report(S.NOTIFIED, job)
    cur = u.state.current
    serving = u.runtime.current
    if manifest.deployment == "shadow":
        shadow = u.shadow
        if shadow is not None and shadow.sha256 == ref.sha256:  # e.g. the target re-delivered
            return replace(
                u.state,
                highest_release=max(u.state.highest_release, manifest.release),
                update=replace(job, state=S.SHADOW, reason="already running in shadow"),
            )
    else:
        u.drop_shadow()  # any serving target ends a shadow run
    if cur is not None and serving is not None and serving.sha256 == ref.sha256 == cur.sha256:
        rec = u.record_for(job, manifest)
        if manifest.release > cur.release or rec.rollout_id != cur.rollout_id:
            return replace(
                u.state,
                current=rec,
                highest_release=max(u.state.highest_release, manifest.release),
                update=replace(job, state=S.ALREADY_INSTALLED),
            )
        return _to(u, job, S.ALREADY_INSTALLED)
    if u.store.has_model(ref.sha256):
        return _to(u, job, S.VERIFYING)  # e.g. an operator rollback to bytes still held
    if ref.size > u.config.max_artifact_bytes:
        raise LengthError(
            f"artifact of {ref.size} bytes exceeds the cap of {u.config.max_artifact_bytes}"
        )
    return _to(u, job, S.DOWNLOADING)


def on_downloading(u: Updater, job: UpdateJob) -> PersistedState:
    """Complete ``downloads/<sha>.part`` (resuming from the bytes already held)."""
    manifest = u.manifest_for(job)
    part = u.store.part_path(job.sha256)
    u.fetcher.fetch(job.target["artifact_url"], part, expected_size=manifest.artifact.size)
    return _to(u, job, S.VERIFYING)


def on_verifying(u: Updater, job: UpdateJob) -> PersistedState:
    """Check size and sha256, then move the file into ``models/`` (atomic rename)."""
    ref = u.manifest_for(job).artifact
    if u.store.has_model(ref.sha256):
        path = u.store.model_path(ref.sha256)
        try:
            verify_artifact(path, ref)
        except ContentError:
            path.unlink(missing_ok=True)  # damaged on disk: fetch it again
            return _to(u, job, S.DOWNLOADING)
        return _to(u, job, S.INSTALLING)
    part = u.store.part_path(ref.sha256)
    if not part.is_file():
        return _to(u, job, S.DOWNLOADING)
    try:
        verify_artifact(part, ref)
    except ContentError:
        part.unlink(missing_ok=True)  # never resume from bytes that failed the check
        if job.attempts == 0:
            # Once, start over from byte 0: a resumed file may hold bytes a power cut garbled.
            return _to(u, job, S.DOWNLOADING, attempts=1)
        raise
    u.store.activate(part, ref.sha256)
    return _to(u, job, S.INSTALLING)


def on_installing(u: Updater, job: UpdateJob) -> PersistedState:
    """Build and warm the new session off the serving path; persist the slots; swap it in."""
    manifest = u.manifest_for(job)
    path = u.store.model_path(job.sha256)
    verify_artifact(path, manifest.artifact)  # the hash is checked right before activation
    loaded = u.runtime.load(path, manifest)
    if manifest.deployment == "shadow":  # run beside the champion; never swap it in
        u.start_shadow(loaded)
        return replace(
            u.state,
            highest_release=max(u.state.highest_release, job.release),
            update=replace(job, state=S.SHADOW, reason="running beside the serving model"),
        )
    old = u.state.current
    rec = u.record_for(job, manifest)
    serving = u.runtime.current
    if old is None or serving is None or old.sha256 == rec.sha256:
        nxt = replace(
            u.state,
            current=rec,
            previous=old if old is not None and old.sha256 != rec.sha256 else u.state.previous,
            highest_release=max(u.state.highest_release, job.release),
            update=replace(job, state=S.COMMITTED, reason="first install: nothing to compare"),
        )
        baseline = None
    else:
        baseline = u.live.summary(serving.sha256)
        nxt = replace(
            u.state,
            current=rec,
            previous=old,
            update=replace(job, state=S.PROBATION, boots=0, baseline=baseline.to_dict()),
        )
    u.persist(nxt)  # the pointer moves only now: the file is complete, verified and loads
    crash_point("staging:persisted")
    u.swap_in(loaded, keep_old=baseline is not None)
    del loaded
    crash_point("staging:swapped")
    u.report(S.INSTALLED, job)
    return nxt


def on_probation(u: Updater, job: UpdateJob) -> PersistedState:
    """Watch live traffic; commit, roll back, or keep watching (returns the same state)."""
    serving = u.runtime.current
    if serving is None or serving.sha256 != job.sha256:
        return rollback(u, job, "the new model was not serving after a restart")
    if job.boots > u.config.probation_max_boots:
        return rollback(u, job, f"agent restarted {job.boots} times during probation")
    baseline = LiveSummary.from_dict(job.baseline) if job.baseline else None
    verdict = judge(u.live.summary(job.sha256), baseline, u.probation_elapsed(), u.policy)
    crash_point("probation:tick")
    if verdict.action == Action.ROLLBACK:
        return rollback(u, job, verdict.reason)
    if verdict.action == Action.COMMIT:
        return replace(
            u.state,
            highest_release=max(u.state.highest_release, job.release),
            update=replace(job, state=S.COMMITTED, reason=verdict.reason),
        )
    u.wait(u.probation_tick_s)
    return u.state


def rollback(u: Updater, job: UpdateJob, reason: str) -> PersistedState:
    """The next state after a failed probation: previous slot active, version refused."""
    refused = RefusedVersion(job.sha256, job.release, job.model_version, reason)
    return replace(
        u.state,
        current=u.state.previous,
        previous=None,
        refused=(*u.state.refused, refused),
        update=replace(job, state=S.ROLLED_BACK, reason=reason),
    )


def on_committed(u: Updater, job: UpdateJob) -> PersistedState:
    """Release the previous session and artifacts no slot points at (idempotent)."""
    u.finish_commit()
    return u.state


def on_rolled_back(u: Updater, job: UpdateJob) -> PersistedState:
    """Serve the previous slot again (at once: its session was kept warm) and free the trial."""
    u.finish_rollback()
    return u.state


HANDLERS: dict[DeviceState, Handler] = {
    S.NOTIFIED: on_notified,
    S.DOWNLOADING: on_downloading,
    S.VERIFYING: on_verifying,
    S.INSTALLING: on_installing,
    S.PROBATION: on_probation,
    S.COMMITTED: on_committed,
    S.ROLLED_BACK: on_rolled_back,
}
ACTIVE = frozenset({S.NOTIFIED, S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.PROBATION})
PRE_SWAP = frozenset({S.NOTIFIED, S.DOWNLOADING, S.VERIFYING, S.INSTALLING})
