"""The durable training-job queue: add, claim, heartbeat, recover (rows of ``training_jobs``).

One queued or running job per line is guaranteed by the database (the partial unique index on
``TrainingJob``); claims are one guarded ``UPDATE ... RETURNING``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.core.errors import ConflictError, NotFoundError
from server.db.notify import notify
from server.db.registry import ModelLine, TrainingJob, lock_model_line

ACTIVE_JOB_STATES = ("queued", "running", "trained")  # see registry._ACTIVE_JOB
# PostgreSQL channel on which a worker's hand-back announces a trained job (payload: its id) to
# every server's registrar (server.db.notify); the registrar's poll stays the fallback.
TRAINED_CHANNEL = "edgeloop_job_trained"


def announce_trained(session: Session, *, job_id: int) -> None:
    """Tell the registrars, when the caller's transaction commits, that ``job_id`` is trained."""
    notify(session, TRAINED_CHANNEL, str(job_id))


def active_job(session: Session, *, line: str) -> TrainingJob | None:
    return session.scalar(
        select(TrainingJob)
        .where(TrainingJob.model_line == line, TrainingJob.status.in_(ACTIVE_JOB_STATES))
        .limit(1)
    )


def last_job_finished_at(session: Session, *, line: str) -> datetime | None:
    """When the line's most recent training job ended (any outcome); None if none has."""
    return session.scalar(
        select(func.max(TrainingJob.finished_at)).where(TrainingJob.model_line == line)
    )


def add_job(
    session: Session,
    *,
    line: str,
    trigger: str,
    now: datetime,
    not_before: datetime | None = None,
    alert_id: int | None = None,
) -> TrainingJob | None:
    """Queue a job for ``line`` unless one is queued or running; flushes, does not commit.
    ``not_before``: no runner claims it earlier (a cooldown). ``alert_id``: the alert that
    triggered it (trigger ``alert``), recorded on the job and on the version it makes.

    The partial unique index ``uq_jobs_one_active_per_line`` is the real guard: an insert that
    races another process's fails inside a savepoint and returns None. The line's counter of
    new samples restarts, and ``last_job_at`` (the schedule's clock) is set.
    """
    if active_job(session, line=line) is not None:
        return None
    job = TrainingJob(
        model_line=line,
        status="queued",
        trigger=trigger,
        created_at=now,
        not_before=not_before,
        alert_id=alert_id,
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        return None
    session.execute(
        update(ModelLine)
        .where(ModelLine.name == line)
        .values(new_samples=0, last_job_at=now)
        .execution_options(synchronize_session=False)
    )
    return job


def enqueue_job(session: Session, *, line: str, trigger: str, now: datetime) -> TrainingJob:
    """Queue a training job for ``line`` under the line's row lock; commits.

    Raises:
        NotFoundError: unknown line.
        ConflictError: a job for the line is already queued or running.
    """
    lock_model_line(session, name=line)
    job = add_job(session, line=line, trigger=trigger, now=now)
    if job is None:
        existing = active_job(session, line=line)
        session.rollback()
        what = f"training job {existing.id}" if existing else "a training job"
        state = existing.status if existing else "queued"
        raise ConflictError(f"{what} for {line!r} is already {state}")
    session.commit()
    return job


def list_jobs(session: Session, *, model_line: str | None = None) -> Sequence[TrainingJob]:
    stmt = select(TrainingJob).order_by(TrainingJob.id.desc())
    if model_line is not None:
        stmt = stmt.where(TrainingJob.model_line == model_line)
    return session.scalars(stmt).all()


def get_job(session: Session, *, job_id: int) -> TrainingJob:
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise NotFoundError(f"unknown training job {job_id}")
    return job


def claim_job(
    session: Session, *, now: datetime, runner: str = "runner", max_attempts: int = 3
) -> TrainingJob | None:
    """Atomically move the oldest due queued job to running for ``runner``; commits.

    One statement: ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) AND
    status = 'queued' RETURNING id``. On PostgreSQL two runners never wait on or take the same
    row; on SQLite ``BEGIN IMMEDIATE`` serialises the claim. Returns None when nothing is due.
    """
    due = (
        select(TrainingJob.id)
        .where(
            TrainingJob.status == "queued",
            or_(TrainingJob.not_before.is_(None), TrainingJob.not_before <= now),
        )
        .order_by(TrainingJob.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    job_id = session.scalar(
        update(TrainingJob)
        .where(TrainingJob.id == due, TrainingJob.status == "queued")
        .values(
            status="running",
            started_at=now,
            heartbeat_at=now,
            claimed_by=runner,
            attempts=TrainingJob.attempts + 1,
            max_attempts=max_attempts,
            not_before=None,
        )
        .returning(TrainingJob.id)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if job_id is None:
        return None
    return session.get(TrainingJob, job_id, populate_existing=True)


def heartbeat_job(session: Session, *, job_id: int, runner: str, now: datetime) -> bool:
    """Renew ``runner``'s lease on a running job; commits. False: the job is no longer ours."""
    res = session.execute(
        update(TrainingJob)
        .where(
            TrainingJob.id == job_id,
            TrainingJob.status == "running",
            TrainingJob.claimed_by == runner,
        )
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def recover_stale_jobs(
    session: Session,
    *,
    now: datetime,
    lease_s: float,
    is_dead: Callable[[str], bool] = lambda _runner: False,
) -> tuple[list[int], list[int]]:
    """Queue again (or fail, after ``max_attempts``) running jobs whose runner is gone; commits.

    A runner is gone when its heartbeat is older than ``lease_s`` or ``is_dead(claimed_by)``
    says so (a runner on this host whose process no longer exists). Returns the ids
    (requeued, failed).
    """
    cutoff = now - timedelta(seconds=lease_s)
    rows = session.execute(
        select(TrainingJob.id, TrainingJob.claimed_by, TrainingJob.heartbeat_at).where(
            TrainingJob.status == "running"
        )
    ).all()
    stale = [
        (r.id, r.claimed_by)
        for r in rows
        if r.heartbeat_at is None or r.heartbeat_at < cutoff or is_dead(r.claimed_by or "")
    ]
    requeued: list[int] = []
    failed: list[int] = []
    for job_id, runner in stale:
        job = session.get(TrainingJob, job_id, populate_existing=True)
        if job is None or job.status != "running" or job.claimed_by != runner:
            continue
        lost = f"attempt {job.attempts} lost: runner {runner} stopped (server died or was killed)"
        retry = job.attempts < job.max_attempts
        res = session.execute(
            update(TrainingJob)
            .where(
                TrainingJob.id == job_id,
                TrainingJob.status == "running",
                TrainingJob.claimed_by == runner,
            )
            .values(
                status="queued" if retry else "failed",
                claimed_by=None,
                error=lost if retry else f"{lost}; gave up after {job.attempts} attempt(s)",
                finished_at=None if retry else now,
            )
            .execution_options(synchronize_session=False)
        )
        if res.rowcount:  # type: ignore[attr-defined]
            (requeued if retry else failed).append(job_id)
    session.commit()
    return requeued, failed
