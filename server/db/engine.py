"""The engine factory and sessions (SQLite with WAL, or PostgreSQL via psycopg 3).

SQLite transactions start with ``BEGIN IMMEDIATE`` so a read-then-write transaction cannot fail
with SQLITE_BUSY when it upgrades its lock; with ``busy_timeout`` writers queue instead.
PostgreSQL runs at READ COMMITTED; state transitions are guarded UPDATEs (``WHERE state = ...``)
and counters are atomic ``UPDATE ... RETURNING``. The tables live in one module per area
(``server.db.registry``, ``fleet``, ``sample_store``, ...), all on ``server.db.base.Base``; the
schema is made and changed only by the migrations (``server.db.migrate``, ``edgeloop db upgrade``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.core.errors import ConfigError
from server.db import (  # noqa: F401 - every table module registers its tables on Base.metadata
    # (server.db.migrate compares the migrations with Base.metadata)
    audit,
    capture,
    datasets,
    fleet,
    identity,
    monitoring,
    quality,
    registry,
    reports,
    rollouts,
    sample_store,
)

log = logging.getLogger(__name__)

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
