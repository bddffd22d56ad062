"""A server's part in training: the registrar, and on one machine an embedded worker.

A job lives ``queued -> running -> trained -> succeeded | rejected`` (or ``failed``):

- queued: written by the triggers (threshold, manual, schedule, alert), on a server;
- running: a worker's claim and lease (``server.retrain.worker``), on any machine; a dead
  worker's job is queued again by whoever notices first (guarded by the lease);
- trained: the worker's hand-back (its results' shas on the row, the files in the store);
- succeeded / rejected: a server's registration (``server.retrain.registration``, called by
  the registrar): version, lineage, signature, rollout, in one transaction;
- out of trained otherwise: the registrar alone (``registrar._leave_trained``): a result it
  refuses goes back to queued (or failed, out of training attempts); a registration that fails
  for a reason of the server's is counted and retried after a backoff, and fails the job at
  ``register_attempts``.

Each transition has one writer, every write guarded by the state it leaves (and, while running,
by the lease). The one move with two callers is running -> queued/failed: the worker gives up
its own attempt, or, once its lease has expired, whoever notices re-queues it
(``server.db.job_queue.recover_stale_jobs``); the guard on ``claimed_by`` lets only one win.

:class:`JobRunner` is what a server runs: its registrar loop always, and a worker thread of its
own when ``Settings.runs_embedded_worker`` (development, the demo); in production workers are
separate processes (``edgeloop worker``) and the server never imports the training libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from server.core.config import Settings
from server.db.base import utcnow
from server.release.artifacts import ArtifactStore
from server.retrain.registrar import Registrar
from server.retrain.registration import RegisteredVersion
from server.retrain.worker import TrainingWorker, recover


class JobRunner:
    """The registrar plus, optionally, an embedded worker; ``run_once`` does one whole job."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        on_registered: Callable[[Session, RegisteredVersion], None],
        clock: Callable[[], datetime] = utcnow,
        embedded_worker: bool | None = None,
    ) -> None:
        self.settings = settings
        self.registrar = Registrar(
            settings=settings,
            sessions=sessions,
            store=store,
            on_registered=on_registered,
            clock=clock,
        )
        embedded = settings.runs_embedded_worker if embedded_worker is None else embedded_worker
        self.worker: TrainingWorker | None = None
        if embedded:
            self.worker = TrainingWorker(
                settings=settings,
                sessions=sessions,
                store=store,
                clock=clock,
                on_trained=lambda _job_id: self.registrar.wake(),
            )

    @property
    def identity(self) -> str | None:
        """The embedded worker's lease name (None: this server trains nothing)."""
        return self.worker.identity if self.worker is not None else None

    def wake(self) -> None:
        """New work: a job was queued."""
        if self.worker is not None:
            self.worker.wake()
        self.registrar.wake()

    def recover(self) -> tuple[list[int], list[int]]:
        """Re-queue (or fail) jobs whose runner died; returns (requeued, failed) ids."""
        return recover(self.registrar.sessions, self.settings, self.registrar.clock())

    def run_once(self) -> int | None:
        """Register what is trained, then (with an embedded worker) train the oldest due job and
        register it. Returns the id of the job trained or registered; None: nothing was due."""
        self.registrar.chores()
        registered = self.registrar.run_once()
        if self.worker is None:
            return registered
        trained = self.worker.run_once()
        if trained is None:
            return registered
        self.registrar.run_once()
        return trained

    def start(self) -> None:
        self.registrar.start()
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()  # a running trainer is stopped and its job queued again
        self.registrar.stop()


__all__ = ["JobRunner"]
