"""PostgreSQL LISTEN/NOTIFY: a wake-up call between processes that share the database.

A writer calls :func:`notify` inside its transaction; PostgreSQL delivers the notification to
every connection listening on the channel when, and only if, that transaction commits. A
:class:`Listener` is a background ``Worker`` (``server.core.background``) holding one connection of
its own (outside the pool) that listens on a channel and hands each payload to a callback.

A notification is a hint, never the record: one sent while a listener was disconnected is lost.
So a listener calls ``on_connect`` after every (re)connection, and its owner looks at the
database then (and keeps polling as the fallback). The thread never dies of a database error: a
dropped connection is closed and opened again after a backoff (``RECONNECT_MIN_S`` doubling up
to ``RECONNECT_MAX_S``), and a connection that stays quiet is checked every ``CHECK_S``. On SQLite
:func:`notify` does nothing and there is nothing to listen to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from server.core.background import Worker

log = logging.getLogger(__name__)

WAIT_S = 0.5  # seconds of one wait for notifications (a stop is noticed between waits)
CHECK_S = 5.0  # seconds without a notification before the connection is checked (SELECT 1)
RECONNECT_MIN_S = 0.5  # seconds before the first reconnection
RECONNECT_MAX_S = 30.0  # seconds: the longest wait between reconnections


def notify(session: Session, channel: str, payload: str) -> None:
    """Send ``payload`` on ``channel`` when the session's transaction commits (PostgreSQL; a
    no-op on SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})


def listens(engine: object) -> TypeGuard[Engine]:
    """Whether ``engine`` is an engine whose database delivers notifications (PostgreSQL)."""
    return isinstance(engine, Engine) and engine.dialect.name == "postgresql"


class Listener:
    """LISTENs on ``channel`` in a background ``Worker`` of its own; ``on_notify(payload)`` per
    notification, ``on_connect()`` after each (re)connection. Callbacks run on the listener's
    thread and must be quick (wake something up); one that raises is logged, never fatal.

    ``connects`` counts the connections made, ``received`` the notifications handed over.
    """

    def __init__(
        self,
        engine: Engine,
        channel: str,
        *,
        on_notify: Callable[[str], None],
        on_connect: Callable[[], None] = lambda: None,
        name: str = "listener",
    ) -> None:
        if not channel.isidentifier():
            raise ValueError(f"channel {channel!r} is not a plain identifier")
        self.engine = engine
        self.channel = channel
        self.name = name
        self._on_notify = on_notify
        self._on_connect = on_connect
        self._worker = Worker(name, self._step)
        self._conn: Any = None  # the driver's connection (psycopg), while connected
        self._quiet_since = 0.0
        self._delay = RECONNECT_MIN_S  # the wait before the next reconnection
        self.connects = 0
        self.received = 0

    @property
    def running(self) -> bool:
        return self._worker.running

    def start(self) -> None:
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (within ``WAIT_S``, or a connection attempt)."""
        self._worker.stop(timeout)
        self._close()

    def _step(self) -> float:
        """Connect if need be, then wait ``WAIT_S`` for notifications; on any failure close the
        connection and wait ``_delay`` (doubling) before the next attempt."""
        try:
            if self._conn is None:
                self._connect()
                self._delay = RECONNECT_MIN_S
                self._call(self._on_connect)
            self._listen_once()
            return 0.0
        except Exception as exc:  # noqa: BLE001 - any failure: reconnect, never die
            log.warning(
                "%s: LISTEN %s lost (%s: %s); reconnecting in %.1f s",
                self.name,
                self.channel,
                type(exc).__name__,
                " ".join(str(exc).split())[:300],
                self._delay,
            )
            self._close()
            delay, self._delay = self._delay, min(self._delay * 2, RECONNECT_MAX_S)
            return delay

    def _connect(self) -> None:
        """A connection of the listener's own (detached from the pool), listening."""
        # The engine's URL and driver, but not its pool: the connection lives as long as the
        # listener keeps it, and a broken one is simply closed.
        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        driver = self._conn = self.engine.dialect.connect(*args, **kwargs)
        driver.autocommit = True
        driver.execute(f"SET application_name = '{self.name[:60]}'")
        driver.execute(f"LISTEN {self.channel}")
        self._quiet_since = time.monotonic()
        self.connects += 1
        log.info("%s: listening on %s", self.name, self.channel)

    def _listen_once(self) -> None:
        for note in self._conn.notifies(timeout=WAIT_S):
            self._quiet_since = time.monotonic()
            self.received += 1
            self._call(self._on_notify, note.payload)
        if time.monotonic() - self._quiet_since >= CHECK_S:
            self._conn.execute("SELECT 1")  # a dead connection raises here, not silently
            self._quiet_since = time.monotonic()

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # a callback's bug must not end the listener
            log.exception("%s: callback failed", self.name)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already broken: nothing more to do
                log.debug("%s: closing a broken connection failed", self.name, exc_info=True)


__all__ = ["CHECK_S", "Listener", "listens", "notify"]
