"""Database operations for devices, model lines, versions, releases and training jobs.

Functions take the session and keyword-only arguments; the ones named as units of work commit,
the rest only flush so the caller can compose them into one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from contract.topics import valid_device_id
from server.db import Device, ModelLine, ModelVersion, Release, Sample, TrainingJob
from server.errors import ConflictError, InvalidRequestError, NotFoundError

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
) -> ModelLine:
    """Create a model line (and its initial training job); commits.

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
    )
    session.add(line)
    session.flush()
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
) -> Device:
    """Idempotent upsert of a device; commits.

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
    session.commit()
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


def enqueue_job(session: Session, *, line: str, trigger: str, now: datetime) -> TrainingJob:
    """Queue a training job for ``line`` under the line's row lock; commits.

    Raises:
        NotFoundError: unknown line.
        ConflictError: a job for the line is already queued or running.
    """
    lock_model_line(session, name=line)
    existing = active_job(session, line=line)
    if existing is not None:
        session.rollback()
        raise ConflictError(f"training job {existing.id} for {line!r} is already {existing.status}")
    job = TrainingJob(model_line=line, status="queued", trigger=trigger, created_at=now)
    session.add(job)
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


def claim_job(session: Session, *, now: datetime) -> TrainingJob | None:
    """Atomically move the oldest queued job to running; commits. None when nothing is queued."""
    for job_id in session.scalars(
        select(TrainingJob.id).where(TrainingJob.status == "queued").order_by(TrainingJob.id)
    ).all():
        claimed = session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id, TrainingJob.status == "queued")
            .values(status="running", started_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if claimed.rowcount == 1:  # type: ignore[attr-defined]
            return session.get(TrainingJob, job_id, populate_existing=True)
    session.commit()
    return None


def fail_orphaned_jobs(session: Session, *, now: datetime) -> int:
    """Jobs left running by a dead server cannot finish; mark them failed. Commits."""
    res = session.execute(
        update(TrainingJob)
        .where(TrainingJob.status == "running")
        .values(status="failed", finished_at=now, error="server restarted while the job ran")
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return int(res.rowcount)  # type: ignore[attr-defined]


def samples_of_line(session: Session, *, line: str) -> Sequence[Any]:
    return session.execute(
        select(Sample.sample_id, Sample.device_id, Sample.input, Sample.true_label)
        .where(Sample.model_line == line)
        .order_by(Sample.received_at, Sample.sample_id)
    ).all()
