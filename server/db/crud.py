"""Database operations for devices, model lines, versions, releases and training jobs.

Functions take the session and keyword-only arguments; the ones named as units of work commit,
the rest only flush so the caller can compose them into one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contract.topics import valid_device_id
from server.core.errors import ConflictError, InvalidRequestError, NotFoundError
from server.db.engine import Device, ModelLine, ModelVersion, Release, Sample, TrainingJob

ACTIVE_JOB_STATES = ("queued", "running")

# ---------------------------------------------------------------- model lines


def get_model_line(session: Session, *, name: str) -> ModelLine:
    line = session.get(ModelLine, name)
    if line is None:
        raise NotFoundError(f"unknown model line {name!r}")
    return line


def list_model_lines(session: Session) -> Sequence[ModelLine]:
    return session.scalars(select(ModelLine).order_by(ModelLine.name)).all()


def create_model_line(
    session: Session,
    *,
    name: str,
    trainer: str,
    hyperparams: dict[str, Any],
    input_spec: dict[str, Any],
    labels: list[str],
    retrain_threshold: int,
    initial_training: bool,
    now: datetime,
    training_config: dict[str, Any] | None = None,
    schedule_s: float | None = None,
) -> ModelLine:
    """Create a model line (and its initial training job); commits.

    Args:
        training_config: the resolved line config (``LineConfig.to_dict()``); ``trainer`` and
            ``hyperparams`` must agree with it.

    Raises:
        ConflictError: the line exists.
    """
    if session.get(ModelLine, name) is not None:
        raise ConflictError(f"model line {name!r} already exists")
    line = ModelLine(
        name=name,
        trainer=trainer,
        hyperparams=hyperparams,
        input_spec=input_spec,
        labels=labels,
        retrain_threshold=retrain_threshold,
        last_release=0,
        new_samples=0,
        created_at=now,
        training_config=training_config or {"trainer": trainer, "hyperparams": hyperparams},
        schedule_s=schedule_s,
        last_job_at=now if initial_training else None,
    )
    session.add(line)
    try:
        session.flush()
    except IntegrityError as exc:  # created concurrently by another process
        session.rollback()
        raise ConflictError(f"model line {name!r} already exists") from exc
    if initial_training:
        session.add(
            TrainingJob(model_line=name, status="queued", trigger="initial", created_at=now)
        )
    session.commit()
    return line


def lock_model_line(session: Session, *, name: str) -> ModelLine:
    """Take the line's row lock for the rest of the transaction (serialises job triggers)."""
    line = session.scalar(
        select(ModelLine)
        .where(ModelLine.name == name)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if line is None:
        raise NotFoundError(f"unknown model line {name!r}")
    return line


# ---------------------------------------------------------------- devices


def register_device(
    session: Session,
    *,
    device_id: str,
    model_line: str,
    hardware: str | None,
    groups: list[str],
    agent_version: str | None,
    now: datetime,
    commit: bool = True,
) -> Device:
    """Idempotent upsert of a device; commits (or only flushes with ``commit=False``).

    Raises:
        InvalidRequestError: invalid device id.
        NotFoundError: unknown model line.
    """
    if not valid_device_id(device_id):
        raise InvalidRequestError(
            "device_id must be 1-128 of [A-Za-z0-9._:-] starting with a letter or digit"
        )
    get_model_line(session, name=model_line)
    device = session.get(Device, device_id)
    if device is None:
        device = Device(device_id=device_id, registered_at=now, groups=[])
        session.add(device)
    device.model_line = model_line
    device.hardware = hardware
    device.groups = list(groups)
    device.agent_version = agent_version
    device.last_seen = now
    if commit:
        session.commit()
    else:
        session.flush()
    return device


def get_device(session: Session, *, device_id: str) -> Device:
    device = session.get(Device, device_id) if valid_device_id(device_id) else None
    if device is None:
        raise NotFoundError(f"unknown device {device_id!r}")
    return device


def list_devices(session: Session, *, model_line: str | None = None) -> Sequence[Device]:
    stmt = select(Device).order_by(Device.device_id)
    if model_line is not None:
        stmt = stmt.where(Device.model_line == model_line)
    return session.scalars(stmt).all()


def device_ids_of_line(session: Session, *, model_line: str) -> list[str]:
    return list(
        session.scalars(select(Device.device_id).where(Device.model_line == model_line)).all()
    )


# ---------------------------------------------------------------- versions and releases


def list_versions(session: Session, *, line: str) -> Sequence[ModelVersion]:
    get_model_line(session, name=line)
    return session.scalars(
        select(ModelVersion).where(ModelVersion.line == line).order_by(ModelVersion.version)
    ).all()


def get_version(session: Session, *, line: str, version: int) -> ModelVersion:
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.line == line, ModelVersion.version == version)
    )
    if row is None:
        get_model_line(session, name=line)
        raise NotFoundError(f"model line {line!r} has no version {version}")
    return row


def next_version_number(session: Session, *, line: str) -> int:
    top = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.line == line))
    return int(top or 0) + 1


def get_release(session: Session, *, line: str, release: int) -> Release:
    row = session.scalar(select(Release).where(Release.line == line, Release.release == release))
    if row is None:
        get_model_line(session, name=line)
        raise NotFoundError(f"model line {line!r} has no release {release}")
    return row


def artifact_known(session: Session, *, sha256: str) -> bool:
    return (
        session.scalar(select(ModelVersion.id).where(ModelVersion.sha256 == sha256).limit(1))
        is not None
    )


# ---------------------------------------------------------------- training jobs


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
) -> TrainingJob | None:
    """Queue a job for ``line`` unless one is queued or running; flushes, does not commit.
    ``not_before``: no runner claims it earlier (a cooldown).

    The partial unique index ``uq_jobs_one_active_per_line`` is the real guard: an insert that
    races another process's fails inside a savepoint and returns None. The line's counter of
    new samples restarts, and ``last_job_at`` (the schedule's clock) is set.
    """
    if active_job(session, line=line) is not None:
        return None
    job = TrainingJob(
        model_line=line, status="queued", trigger=trigger, created_at=now, not_before=not_before
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


def samples_of_line(session: Session, *, line: str) -> Sequence[Any]:
    """The line's samples a dataset version may include: quarantined ones are left out."""
    from server.intake.screening import quarantined_ids

    return session.execute(
        select(Sample.sample_id, Sample.device_id, Sample.input, Sample.true_label)
        .where(Sample.model_line == line, Sample.sample_id.not_in(quarantined_ids(line=line)))
        .order_by(Sample.received_at, Sample.sample_id)
    ).all()


# ---------------------------------------------------------------- registry: aliases and config

ALIASES = ("champion", "candidate", "latest")


def resolve_alias(session: Session, *, line: str, alias: str) -> ModelVersion:
    """The version an alias names: ``champion`` (serving), ``candidate`` (the newest version that
    passed its gate and awaits rollout), ``latest`` (the newest version, whatever its status).

    Raises:
        InvalidRequestError: unknown alias.
        NotFoundError: unknown line, or nothing carries the alias yet.
    """
    if alias not in ALIASES:
        raise InvalidRequestError(f"unknown alias {alias!r}; known: {list(ALIASES)}")
    ml = get_model_line(session, name=line)
    stmt = select(ModelVersion).where(ModelVersion.line == line)
    if alias == "champion":
        if ml.champion_version is None:
            raise NotFoundError(f"model line {line!r} has no champion yet")
        return get_version(session, line=line, version=ml.champion_version)
    if alias == "candidate":
        stmt = stmt.where(
            ModelVersion.status == "candidate",
            ModelVersion.version > (ml.champion_version or 0),
        )
    row = session.scalar(stmt.order_by(ModelVersion.version.desc()).limit(1))
    if row is None:
        raise NotFoundError(f"model line {line!r} has no {alias} version")
    return row


def update_line_config(
    session: Session, *, line: str, config: dict[str, Any], retrain_threshold: int | None
) -> ModelLine:
    """Replace the line's training config (``LineConfig.to_dict()``); commits."""
    ml = lock_model_line(session, name=line)
    ml.training_config = config
    ml.trainer = str(config["trainer"])
    ml.hyperparams = dict(config.get("hyperparams") or {})
    ml.schedule_s = config.get("schedule_s")
    if retrain_threshold is not None:
        ml.retrain_threshold = retrain_threshold
    session.commit()
    return ml
