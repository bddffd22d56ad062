"""ORM models and the engine factory (SQLite with WAL, or PostgreSQL via psycopg 3).

SQLite transactions start with ``BEGIN IMMEDIATE`` so a read-then-write transaction cannot fail
with SQLITE_BUSY when it upgrades its lock; with ``busy_timeout`` writers queue instead.
PostgreSQL runs at READ COMMITTED; state transitions are guarded UPDATEs (``WHERE state = ...``)
and counters are atomic ``UPDATE ... RETURNING``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from server.core.errors import ConfigError

log = logging.getLogger(__name__)

# Autoincrement keys: BIGINT on PostgreSQL, the rowid alias on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


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


class Device(Base):
    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"), index=True)
    hardware: Mapped[str | None] = mapped_column(String(128))
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime)
    state: Mapped[str | None] = mapped_column(String(32))
    model_version: Mapped[int | None] = mapped_column(Integer)
    release: Mapped[int | None] = mapped_column(Integer)
    last_reason: Mapped[str | None] = mapped_column(Text)


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


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (
        Index("ix_samples_line", "model_line"),
        # The same input twice on a line is refused (content hash); this makes it race-proof.
        Index("uq_samples_line_content", "model_line", "content_sha256", unique=True),
        Index("ix_samples_device", "device_id"),
    )

    sample_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    model_line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"))
    model_version: Mapped[int] = mapped_column(Integer)
    input: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian
    true_label: Mapped[int] = mapped_column(Integer)
    predicted_label: Mapped[int] = mapped_column(Integer)
    confidence: Mapped[float] = mapped_column(Float)
    captured_at: Mapped[float] = mapped_column(Float)  # unix seconds, device clock
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    content_sha256: Mapped[str | None] = mapped_column(String(64))  # of the input bytes


# At most one queued or running job per line: the database, not the code, guarantees that one
# trigger gives one training, whatever number of server processes share it.
_ACTIVE_JOB = text("status IN ('queued', 'running')")


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
    status: Mapped[str] = mapped_column(String(16))  # queued/running/succeeded/failed/rejected
    trigger: Mapped[str] = mapped_column(String(16))  # threshold/manual/initial/schedule
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
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)  # retry backoff
    dataset_version: Mapped[str | None] = mapped_column(String(64))


class DatasetVersion(Base):
    """An immutable, content-addressed dataset manifest (see training.dataset)."""

    __tablename__ = "dataset_versions"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    base: Mapped[str] = mapped_column(Text)
    base_sha256: Mapped[str] = mapped_column(String(64))
    field_fraction: Mapped[float] = mapped_column(Float)
    sample_count: Mapped[int] = mapped_column(Integer)
    train_count: Mapped[int] = mapped_column(Integer)
    field_count: Mapped[int] = mapped_column(Integer)
    rejected_count: Mapped[int] = mapped_column(Integer)
    # The manifest without its id lists (those are the dataset_samples rows).
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_line: Mapped[str] = mapped_column(String(64))  # the line that first built it
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DatasetSample(Base):
    """Which accepted samples a dataset version holds, and on which side of the split."""

    __tablename__ = "dataset_samples"
    __table_args__ = (Index("ix_dataset_samples_sample", "sample_id"),)

    dataset_version: Mapped[str] = mapped_column(
        ForeignKey("dataset_versions.version"), primary_key=True
    )
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.sample_id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(8))  # train/field


class Rollout(Base):
    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_line_state", "model_line", "state"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_line: Mapped[str] = mapped_column(ForeignKey("model_lines.name"))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int] = mapped_column(Integer)
    release: Mapped[int | None] = mapped_column(Integer)
    rollback_release: Mapped[int | None] = mapped_column(Integer)
    # pending_approval/canary/rolling/full/awaiting_gate/paused/completed/rolled_back/aborted
    state: Mapped[str] = mapped_column(String(24))
    paused_state: Mapped[str | None] = mapped_column(String(24))  # what resume returns to
    stage: Mapped[int] = mapped_column(Integer, default=0)
    canary_percent: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(128))
    approved_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stage_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    full_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text)
    gates: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Waves and the hash cut-offs frozen at approval (server.rollout.plan.Plan); stage = wave.
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Who it is for (contract.Targeting.to_dict(), opset left to the model); None: any device.
    # Signed into the rollout's releases; devices outside it never become members.
    targeting: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RolloutDevice(Base):
    __tablename__ = "rollout_devices"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), primary_key=True)
    stage: Mapped[int] = mapped_column(Integer)  # the device's wave (0 = canary)
    state: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    installed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # server clock
    reason: Mapped[str | None] = mapped_column(Text)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # first sent the release
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # re-sends after a failure
    failures: Mapped[int] = mapped_column(Integer, default=0)  # failed attempts counted


class DeviceMetric(Base):
    __tablename__ = "device_metrics"
    __table_args__ = (Index("ix_metrics_line_version", "model_line", "model_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    model_line: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    rollout_id: Mapped[int | None] = mapped_column(BigInteger)
    ts: Mapped[float] = mapped_column(Float)  # device clock
    window_s: Mapped[float] = mapped_column(Float)
    inferences: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    labelled: Mapped[int] = mapped_column(BigInteger)
    correct: Mapped[int] = mapped_column(BigInteger)
    p50: Mapped[float] = mapped_column(Float)
    p95: Mapped[float] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeviceEvent(Base):
    """Status history: every StatusReport accepted, for operators chasing a stuck device."""

    __tablename__ = "device_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    ts: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[int | None] = mapped_column(Integer)
    release: Mapped[int | None] = mapped_column(Integer)
    rollout_id: Mapped[int | None] = mapped_column(BigInteger)
    target_release: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What the server left out of the report ("dropped rollout_id: out of range"); None: nothing.
    dropped: Mapped[list[str] | None] = mapped_column(JSON)


# Nullable columns added to tables after their first release: ``create_all`` adds them to an
# existing database (it creates missing tables, never missing columns).
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("device_events", "dropped"),
    ("device_credentials", "enroll_secret_hash"),
)


# Execution option marking a read-only session's connections (make_read_sessionmaker).
READ_ONLY_OPTION = "edgeloop_read_only"
# Connections to a SQLite file: one per request thread (AnyIO's default limit, 40) plus the
# background workers (ingest, rollouts, jobs, scheduler). They cost a file handle each.
SQLITE_POOL_SIZE = 48
POOL_TIMEOUT_S = 10.0  # seconds a thread waits for a pooled connection before failing


WRITER_WAIT_S = 30.0  # seconds a SQLite writer waits for its turn (SQLite's busy_timeout too)


class WriterQueue:
    """One SQLite write transaction at a time in this process, granted in arrival order.

    SQLite's own busy handler makes a blocked writer sleep and retry (up to 100 ms apart); it
    has no queue, so under steady write traffic (ingest batches, sample uploads, the rollout
    engine) an unlucky writer keeps missing the lock until its busy timeout expires: measured
    in the demo under load as 503s after a 30 s wait while no transaction was held for even
    5 s. Queueing writers here, FIFO, turns that into a short wait in turn. (Across processes
    SQLite still arbitrates; several server processes should share PostgreSQL instead.)
    """

    _KEY = "edgeloop_writer"

    def __init__(self, wait_s: float = WRITER_WAIT_S) -> None:
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._busy = False
        self._abandoned: set[int] = set()  # tickets whose waiter gave up: skipped in turn

    def acquire(self, holder: dict[Any, Any]) -> None:
        """Wait for this holder's turn. Raises OperationalError after ``wait_s``."""
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            ok = self._cond.wait_for(
                lambda: self._serving == ticket and not self._busy, timeout=self._wait_s
            )
            if not ok:
                # Give the turn away so the queue behind this ticket keeps moving.
                self._skip(ticket)
                raise OperationalError(
                    "BEGIN IMMEDIATE", None, Exception("database is locked (writer queue)")
                )
            self._busy = True
            holder[self._KEY] = ticket

    def release(self, holder: dict[Any, Any]) -> None:
        if holder.pop(self._KEY, None) is None:
            return
        with self._cond:
            self._busy = False
            self._serving += 1
            self._advance()
            self._cond.notify_all()

    def _skip(self, ticket: int) -> None:
        self._abandoned.add(ticket)
        self._advance()
        self._cond.notify_all()

    def _advance(self) -> None:
        while not self._busy and self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1


SLOW_TRANSACTION_S = 5.0  # seconds: a write transaction held this long is logged with its origin


def _origin(depth: int = 40) -> str:
    """Where the transaction began: the innermost edgeloop frames outside this module."""
    frame = sys._getframe(2)
    out: list[str] = []
    while frame is not None and depth > 0 and len(out) < 4:
        name = frame.f_code.co_filename
        if "/server/" in name and not name.endswith("/db/engine.py"):
            out.append(f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back  # type: ignore[assignment]
        depth -= 1
    return " < ".join(out) or "?"


def _warn_slow_transactions(engine: Engine) -> None:
    """Log write transactions that hold their connection for SLOW_TRANSACTION_S or more, naming
    the code that began them: on SQLite one such transaction stalls every other writer."""

    @event.listens_for(engine, "begin")
    def _began(conn: Any) -> None:
        if not conn.get_execution_options().get(READ_ONLY_OPTION):
            conn.info["edgeloop_tx"] = (time.monotonic(), _origin())

    def _ended(conn: Any) -> None:
        began = conn.info.pop("edgeloop_tx", None)
        if began is not None and (held := time.monotonic() - began[0]) >= SLOW_TRANSACTION_S:
            log.warning("write transaction held %.1f s, begun at %s", held, began[1])

    event.listen(engine, "commit", _ended)
    event.listen(engine, "rollback", _ended)


def make_engine(url: str) -> Engine:
    """Build an engine for ``url``: SQLite (WAL, busy_timeout, BEGIN IMMEDIATE) or PostgreSQL.

    Raises:
        ConfigError: the URL names another backend.
    """
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # A file database gets enough connections for every request thread plus the background
        # workers: a request must never wait for a connection that a blocked request holds.
        pool: dict[str, Any] = (
            {"pool_size": SQLITE_POOL_SIZE, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT_S}
            if parsed.database and parsed.database != ":memory:"
            else {}
        )
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        writers = WriterQueue()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Readers begin deferred, which in WAL mode takes no lock at all, so a read never
            # queues behind a writer (see make_read_sessionmaker). Writers queue in this
            # process first, then take SQLite's write lock up front (no lock-upgrade failure
            # mid-transaction).
            if conn.get_execution_options().get(READ_ONLY_OPTION):
                conn.exec_driver_sql("BEGIN")
                return
            writers.acquire(conn.info)
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                writers.release(conn.info)
                raise

        def _on_end(conn: Any) -> None:
            writers.release(conn.info)

        def _on_return(_dbapi: Any, record: Any, *_args: Any) -> None:
            writers.release(record.info)  # a connection reset without a rollback event

        event.listen(engine, "commit", _on_end)
        event.listen(engine, "rollback", _on_end)
        event.listen(engine.pool, "reset", _on_return)
        event.listen(engine.pool, "invalidate", _on_return)
        _warn_slow_transactions(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        engine = create_engine(
            url, pool_pre_ping=True, pool_size=10, max_overflow=40, pool_timeout=POOL_TIMEOUT_S
        )
        _warn_slow_transactions(engine)
        return engine
    raise ConfigError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


SessionFactory = Callable[[], Session]


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for requests that only read (GET, HEAD, authentication).

    On SQLite their transactions begin deferred: a WAL reader sees a snapshot and takes no
    lock, so reads never wait for the ingest writer, the rollout engine or a training
    registration. On PostgreSQL (MVCC) they are ordinary sessions.
    """
    return sessionmaker(
        engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False
    )


def create_all(engine: Engine) -> None:
    # Tables in their own modules: identity; refused reports; per-class and shadow metrics.
    from server.db import identity, quality, reports, samples  # noqa: F401

    Base.metadata.create_all(engine)
    _add_columns(engine, ADDED_COLUMNS)


def _add_columns(engine: Engine, columns: tuple[tuple[str, str], ...]) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each nullable (table, column) the database lacks.

    Two servers starting together may both try: PostgreSQL says ``IF NOT EXISTS``; on SQLite
    the write lock (BEGIN IMMEDIATE) orders them and the second sees the column.
    """
    for table_name, column_name in columns:
        column = Base.metadata.tables[table_name].c[column_name]
        assert column.nullable, f"{table_name}.{column_name}: only nullable columns are added"
        with engine.begin() as conn:
            present = {c["name"] for c in inspect(conn).get_columns(table_name)}
            if column_name in present:
                continue
            ddl = column.type.compile(dialect=engine.dialect)
            guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""
            sql = f"ALTER TABLE {table_name} ADD COLUMN {guard}{column_name} {ddl}"
            conn.exec_driver_sql(sql)
