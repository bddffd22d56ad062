"""Model lines, their versions and signed releases, and the training-job table; their queries.

Functions take the session and keyword-only arguments; the ones named as units of work commit,
the rest only flush so the caller can compose them into one transaction. The job queue's
operations are in ``server.db.job_queue``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.core.errors import ConflictError, InvalidRequestError, NotFoundError
from server.db.base import Base, BigId, UTCDateTime, utcnow


class ModelLine(Base):
    __tablename__ = "model_lines"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    trainer: Mapped[str] = mapped_column(String(32))
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    input_spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    labels: Mapped[list[str]] = mapped_column(JSON)
    retrain_threshold: Mapped[int] = mapped_column(Integer)
    champion_version: Mapped[int | None] = mapped_column(Integer)
    current_release: Mapped[int | None] = mapped_column(Integer)
    last_release: Mapped[int] = mapped_column(Integer, default=0)
    new_samples: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The resolved training config (training.config.LineConfig.to_dict()); trainer and
    # hyperparams above mirror it.
    training_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    schedule_s: Mapped[float | None] = mapped_column(Float)  # seconds; None: no schedule
    last_job_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last enqueue
    # The line's base training pool in the artifact store (npz of X, y), as the last registered
    # job's worker exported it: label screening's trusted neighbours (server.intake.screening).
    base_pool_sha256: Mapped[str | None] = mapped_column(String(64))


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("line", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # champion/candidate/rejected/retired
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    dataset_version: Mapped[str | None] = mapped_column(String(128))
    trainer: Mapped[str] = mapped_column(String(32))
    hyperparams: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sample_count: Mapped[int] = mapped_column(Integer, default=0)
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))  # framework weights (npz)
    # The alert whose training made this version (lineage; server.db.monitoring.Alert), if any.
    alert_id: Mapped[int | None] = mapped_column(BigInteger)


class Release(Base):
    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("line", "release"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"))
    release: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    envelope: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# At most one queued or running job per line: the database, not the code, guarantees that one
# trigger gives one training, whatever number of server processes share it.
# A trained job counts until a server registered it: the next training of the line starts from
# the version it makes.
_ACTIVE_JOB = text("status IN ('queued', 'running', 'trained')")


class TrainingJob(Base):
    __tablename__ = "training_jobs"
    __table_args__ = (
        Index("ix_jobs_line_status", "model_line", "status"),
        Index(
            "uq_jobs_one_active_per_line",
            "model_line",
            unique=True,
            postgresql_where=_ACTIVE_JOB,
            sqlite_where=_ACTIVE_JOB,
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"))
    # queued -> running (a worker's lease) -> trained (results in the artifact store, shas
    # below) -> succeeded/rejected (a server registered the version); or failed.
    status: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16))  # threshold/manual/initial/schedule/alert
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    result_version: Mapped[int | None] = mapped_column(Integer)
    sample_count: Mapped[int | None] = mapped_column(Integer)
    # Durable queue: a claim takes an attempt; the runner heartbeats while the trainer runs; a
    # job whose heartbeat stops (server killed) is queued again until max_attempts.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # host:pid:nonce of the runner
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Retry backoff: no worker claims a queued job, and no registrar registers a trained one,
    # before this time.
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dataset_version: Mapped[str | None] = mapped_column(String(64))
    alert_id: Mapped[int | None] = mapped_column(BigInteger)  # trigger "alert": which alert
    # What the worker handed back (written with status trained, read by the registrar): the
    # artifact store's sha256 of each file of the attempt's output.
    trained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result_sha256: Mapped[str | None] = mapped_column(String(64))  # model.onnx (None: none)
    result_size: Mapped[int | None] = mapped_column(BigInteger)  # bytes of model.onnx
    result_weights_sha256: Mapped[str | None] = mapped_column(String(64))  # weights.npz
    result_report_sha256: Mapped[str | None] = mapped_column(String(64))  # report.json
    result_dataset_sha256: Mapped[str | None] = mapped_column(String(64))  # dataset.json
    # The line's base training pool (npz of X, y) for label screening on servers without the
    # training libraries; None when the base is not one the worker can export.
    result_base_sha256: Mapped[str | None] = mapped_column(String(64))
    # Registrations of this job that failed for a reason of the server's (signing, database);
    # at Settings.register_attempts the registrar fails the job (server.retrain.registrar).
    register_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


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


def artifact_references(session: Session) -> set[str]:
    """Every artifact sha256 the database refers to: each model version's model and weights,
    each release's model, each line's base pool, and every result of a job not finished yet
    (queued, running or trained: ``_ACTIVE_JOB``). What else is in the store is garbage."""
    job = TrainingJob
    columns = (
        (ModelVersion.sha256, None),
        (ModelVersion.weights_sha256, None),
        (Release.sha256, None),
        (ModelLine.base_pool_sha256, None),
        *(
            (column, _ACTIVE_JOB)
            for column in (
                job.result_sha256,
                job.result_weights_sha256,
                job.result_report_sha256,
                job.result_dataset_sha256,
                job.result_base_sha256,
            )
        ),
    )
    refs: set[str] = set()
    for column, where in columns:
        stmt = select(column).where(column.is_not(None)).distinct()
        refs.update(session.scalars(stmt if where is None else stmt.where(where)))
    return refs


# ---------------------------------------------------------------- aliases and config

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
