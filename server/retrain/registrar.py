"""Registrar: on a server, a ``trained`` job becomes a model version, signed and rolled out.

Workers train and hand their results back through the artifact store (``server.retrain.worker``);
registration needs the signing key, which lives with the servers. Every server runs a registrar
loop; whichever gets a trained job first registers it, exactly once:

- the job is read with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL), so a second server skips it while
  the first holds it, and the whole registration (version, lineage, signature, rollout, the job's
  ``trained -> succeeded/rejected``) is one transaction: a server that dies half-way leaves the
  job ``trained`` for the next one;
- the job's move out of ``trained`` is guarded by its state (``register_version``), so on SQLite
  too, where the row lock does not exist, a second registration writes nothing.

A result the registrar cannot use (an artifact missing from the store or whose bytes do not hash
to the sha the worker recorded, a malformed report or dataset manifest) is refused: the job goes
back to the queue for another attempt, or fails once out of attempts, with the reason on the job.
A registration that fails for a reason of the server's (a signing error, the database, the artifact
store down) is counted on the job (``register_attempts``) and tried again after a backoff
(``register_retry_backoff_s``, doubled per failure, kept in ``not_before``); the
``register_attempts``-th failure fails the job, with the reason on it and in the audit log
(``training.registration_failed``), so the line, which holds one active job at a time, can train
again.

Each server's registrar polls for trained jobs (``registrar_poll_s``). On PostgreSQL it is also
woken at once: a worker's hand-back sends ``NOTIFY`` on ``job_queue.TRAINED_CHANNEL`` in the
transaction that sets the job trained, and the registrar LISTENs on a connection of its own
(``server.db.notify.Listener``, which reconnects when that connection drops and wakes the
registrar after each reconnection, in case it missed one). The poll stays as the fallback, and is
all there is on SQLite.

The loop also runs the queue's server-side chores: it queues scheduled trainings
(``enqueue_due``) and re-queues the jobs of dead workers.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.core.background import Worker
from server.core.config import Settings
from server.core.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    EdgeloopError,
    TrainingError,
)
from server.db import audit, registry
from server.db.base import utcnow
from server.db.job_queue import TRAINED_CHANNEL
from server.db.notify import Listener, listens
from server.db.registry import TrainingJob
from server.release.artifacts import ArtifactStore
from server.retrain import handback
from server.retrain.registration import (
    RegisteredVersion,
    TrainerOutputs,
    register_version,
    trained,
)
from server.retrain.scheduler import enqueue_due
from server.retrain.worker import recover

log = logging.getLogger(__name__)

MAX_REGISTER_BACKOFF_S = 3600.0  # seconds: the longest wait before a registration is tried again
NOTIFIED_KEPT = 100  # job ids of recent hand-back notifications kept (Registrar.notified)


def read_outputs(store: ArtifactStore, job: TrainingJob) -> tuple[dict[str, Any], TrainerOutputs]:
    """The report and the outputs a worker recorded on ``job``, verified against the store.

    Raises:
        ArtifactError: an artifact is missing or its bytes do not hash to the recorded sha.
        ArtifactNotFoundError: an artifact vanished while being read.
        TrainingError: the report or the manifest is not what a trainer writes.
        UnavailableError: the store's backend failed (transient: the job stays trained).
    """
    if not job.result_report_sha256:
        raise TrainingError("the worker recorded no report.json")
    raw = handback.read_verified(
        store,
        job.result_report_sha256,
        what="report.json",
        limit=handback.MAX_RESULT_JSON_BYTES,
    )
    try:
        report = json.loads(raw)
    except ValueError as exc:
        raise TrainingError(f"report.json is not JSON: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("passed"), bool):
        raise TrainingError("report.json needs a boolean 'passed'")
    if report["passed"] and not job.result_sha256:
        raise TrainingError("the trainer reported a pass but handed back no model.onnx")
    size = None
    if job.result_sha256:
        size = handback.verify_stored(store, job.result_sha256, what="model.onnx")
        if job.result_size is not None and size != job.result_size:
            raise ArtifactError(
                f"model.onnx {job.result_sha256}: {size} bytes stored, the job recorded "
                f"{job.result_size}"
            )
    others = ((job.result_weights_sha256, "weights.npz"), (job.result_base_sha256, "base pool"))
    for sha, what in others:
        if sha:
            handback.verify_stored(store, sha, what=what)
    manifest: Any = None
    if job.result_dataset_sha256:
        raw = handback.read_verified(
            store,
            job.result_dataset_sha256,
            what="dataset.json",
            limit=handback.MAX_RESULT_JSON_BYTES,
        )
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise TrainingError(f"dataset.json is not JSON: {exc}") from exc
    return report, TrainerOutputs(
        job.result_sha256, size, job.result_weights_sha256, manifest, job.result_base_sha256
    )


class Registrar:
    """Registers trained jobs; ``run_once`` is what the thread calls (tests call it too).

    Args:
        on_registered: what follows a registration (release, rollout), in its transaction.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        on_registered: Callable[[Session, RegisteredVersion], None],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.on_registered = on_registered
        self.clock = clock
        self._worker = Worker("registrar", self._step, error_wait_s=settings.registrar_poll_s)
        # Ids of the jobs whose hand-back notification woke this registrar, the latest last.
        self.notified: deque[int] = deque(maxlen=NOTIFIED_KEPT)
        engine = sessions.kw.get("bind")  # the engine the sessions are bound to
        self.listener: Listener | None = None
        if listens(engine):
            self.listener = Listener(
                engine,
                TRAINED_CHANNEL,
                on_notify=self._on_trained,
                on_connect=self.wake,
                name="registrar-listener",
            )

    def wake(self) -> None:
        self._worker.wake()

    def _on_trained(self, payload: str) -> None:
        """A worker's hand-back notification (on the listener's thread): register it now."""
        if payload.isdigit():
            self.notified.append(int(payload))
        self.wake()

    def chores(self) -> None:
        """Re-queue dead workers' jobs and queue the scheduled trainings that are due."""
        recover(self.sessions, self.settings, self.clock())
        with self.sessions() as session:
            enqueue_due(session, now=self.clock())

    def run_once(self) -> int | None:
        """Register the oldest due trained job, if any; returns its id (None: none was waiting,
        or another server holds it). A result refused or a failed registration is recorded on
        the job (see the module docstring) and its id returned too.

        Raises:
            Exception: recording a failed registration failed too (the database is down).
        """
        now = self.clock()
        with self.sessions() as session:
            job = session.scalar(
                select(TrainingJob)
                .where(
                    TrainingJob.status == "trained",
                    or_(TrainingJob.not_before.is_(None), TrainingJob.not_before <= now),
                )
                .order_by(TrainingJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if job is None:
                session.rollback()
                return None
            job_id = job.id
            try:
                report, outputs = read_outputs(self.store, job)
            except (ArtifactError, ArtifactNotFoundError, TrainingError) as exc:
                self._refuse(session, job, exc.message)
                return job_id
            except Exception as exc:  # the store is down (the result may be fine), ...
                session.rollback()
                self._registration_failed(job_id, exc)
                return job_id
            try:
                line = registry.get_model_line(session, name=job.model_line)
                version = register_version(
                    session,
                    job=job,
                    line=line,
                    report=report,
                    outputs=outputs,
                    now=self.clock(),
                )
                if version is None:  # another server registered it
                    session.rollback()
                    return None
                self.on_registered(session, version)
                session.commit()
            except TrainingError as exc:  # the manifest is malformed: the worker's fault
                session.rollback()
                self._refuse(session, job, exc.message)
                return job_id
            except Exception as exc:  # ours (signing, the database, ...): counted, retried
                session.rollback()
                self._registration_failed(job_id, exc)
                return job_id
        log.info("training job %s: version %s %s", version.job_id, version.version, version.status)
        return version.job_id

    def _refuse(self, session: Session, job: TrainingJob, why: str) -> None:
        """trained -> queued (another training attempt) or failed, with the reason; commits."""
        now = self.clock()
        attempt = f"attempt {job.attempts}: result refused by the server: {why}"
        retry = job.attempts < job.max_attempts
        values: dict[str, Any]
        if retry:
            wait_s = self.settings.training_retry_backoff_s * 2 ** (job.attempts - 1)
            values = {
                "status": "queued",
                "claimed_by": None,
                "not_before": now + timedelta(seconds=wait_s),
                "error": f"{attempt} (will retry)"[:8000],
            }
        else:
            values = {"status": "failed", "finished_at": now, "error": attempt[:8000]}
        _leave_trained(session, job.id, values)
        session.commit()
        log.warning("training job %s: %s", job.id, attempt)

    def _registration_failed(self, job_id: int, exc: Exception) -> None:
        """Count a registration of ``job_id`` that failed for a reason of the server's: the job
        stays trained until a backoff has passed, or fails (audited) at ``register_attempts``;
        commits. Writes nothing when another server holds the job (its outcome counts)."""
        if isinstance(exc, EdgeloopError):
            why = exc.message
        else:  # not one of ours: a bug or the database; keep the traceback in the log
            log.error("training job %s: registration failed", job_id, exc_info=exc)
            why = f"{type(exc).__name__}: {exc}"
        now = self.clock()
        limit = self.settings.register_attempts
        with self.sessions() as session:
            audit.lock(session)  # before the job's row lock (server.db.audit: lock order)
            job = session.scalar(
                select(TrainingJob).where(trained(job_id)).with_for_update(skip_locked=True)
            )
            if job is None:  # registered, or being registered by another server
                session.rollback()
                return
            tried = job.register_attempts + 1
            if tried >= limit:
                error = f"registration failed {tried} time(s), gave up: {why}"
                values: dict[str, Any] = {"status": "failed", "finished_at": now}
                audit.record(
                    session,
                    actor="registrar",
                    action="training.registration_failed",
                    subject=f"job:{job_id}",
                    details={"model_line": job.model_line, "attempts": tried, "reason": why},
                    now=now,
                )
            else:
                wait_s = min(
                    self.settings.register_retry_backoff_s * 2 ** (tried - 1),
                    MAX_REGISTER_BACKOFF_S,
                )
                error = (
                    f"registration failed ({tried} of {limit}), will retry in {wait_s:g} s: {why}"
                )
                values = {"not_before": now + timedelta(seconds=wait_s)}
            _leave_trained(session, job_id, {**values, "register_attempts": tried, "error": error})
            session.commit()
        log.warning("training job %s: %s", job_id, error[:500])

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        self._worker.start()
        if self.listener is not None:
            self.listener.start()

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        self._worker.stop(timeout=30)

    def _step(self) -> float:
        self.chores()
        registered = self.run_once()
        return 0.0 if registered is not None else self.settings.registrar_poll_s


def _leave_trained(session: Session, job_id: int, values: dict[str, Any]) -> None:
    """The one write of a trained job other than its registration (``register_version``): a
    refused result, a failed registration counted, or the job failed; guarded by the state."""
    session.execute(
        update(TrainingJob)
        .where(trained(job_id))
        .values(**{k: (v[:8000] if k == "error" else v) for k, v in values.items()})
        .execution_options(synchronize_session=False)
    )


__all__ = ["Registrar", "read_outputs"]
