"""PostgreSQL LISTEN/NOTIFY: a wake-up call between processes that share the database.

A writer calls :func:`notify` inside its transaction; PostgreSQL delivers the notification to
every connection listening on the channel when, and only if, that transaction commits. A
:class:`Listener` is a daemon thread holding one connection of its own (outside the pool) that
listens on a channel and hands each payload to a callback.

A notification is a hint, never the record: one sent while a listener was disconnected is lost.
So a listener calls ``on_connect`` after every (re)connection, and its owner looks at the
database then (and keeps polling as the fallback). The thread never dies of a database error: a
dropped connection is closed and opened again after a backoff (``RECONNECT_MIN_S`` doubling up
to ``RECONNECT_MAX_S``), and a connection that stays quiet is checked every ``CHECK_S``. On SQLite
:func:`notify` does nothing and there is nothing to listen to.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

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
    """LISTENs on ``channel`` in a thread of its own; ``on_notify(payload)`` per notification,
    ``on_connect()`` after each (re)connection. Callbacks run on the listener's thread and must
    be quick (wake something up); one that raises is logged, never fatal.

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None  # the driver's connection (psycopg), while connected
        self.connects = 0
        self.received = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (within ``WAIT_S``, or a connection attempt)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stop.is_set():
            try:
                driver = self._connect()
                delay = RECONNECT_MIN_S
                self._call(self._on_connect)
                self._listen(driver)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, never die
                log.warning(
                    "%s: LISTEN %s lost (%s: %s); reconnecting in %.1f s",
                    self.name,
                    self.channel,
                    type(exc).__name__,
                    " ".join(str(exc).split())[:300],
                    delay,
                )
            finally:
                self._close()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _connect(self) -> Any:
        """A connection of the listener's own (detached from the pool), listening."""
        # The engine's URL and driver, but not its pool: the connection lives as long as the
        # listener keeps it, and a broken one is simply closed.
        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        driver = self._conn = self.engine.dialect.connect(*args, **kwargs)
        driver.autocommit = True
        driver.execute(f"SET application_name = '{self.name[:60]}'")
        driver.execute(f"LISTEN {self.channel}")
        self.connects += 1
        log.info("%s: listening on %s", self.name, self.channel)
        return driver

    def _listen(self, driver: Any) -> None:
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            for note in driver.notifies(timeout=WAIT_S):
                quiet_since = time.monotonic()
                self.received += 1
                self._call(self._on_notify, note.payload)
            if time.monotonic() - quiet_since >= CHECK_S:
                driver.execute("SELECT 1")  # a dead connection raises here, not silently
                quiet_since = time.monotonic()

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
