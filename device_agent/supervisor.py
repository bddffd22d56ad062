"""A small supervisor for the agent's worker threads: a worker that dies is started again.

Every worker (update, upload, metrics, bootstrap) runs inside ``Supervisor``'s wrapper. The
workers already catch what they expect; an exception that escapes anyway (a bug, an input nobody
foresaw) is logged with its reason, counted, and the worker is run again after a capped backoff
in the same thread, so one bad message can never end the update flow for good. Between its
death and its restart a worker is *down*, and ``healthy`` is False (the agent's ``/healthz``
answers 503). A worker that returns normally is *done* (the bootstrap thread after registering
with a refused identity, every worker once the agent stops) and is not restarted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from device_agent.fetcher import backoff_delay

log = logging.getLogger(__name__)

RESTART_BASE_S = 1.0  # seconds before the first restart of a worker that died
RESTART_CAP_S = 30.0  # seconds, cap on the delay between restarts
STABLE_S = 60.0  # seconds a worker must run before its next death counts as a first one
MAX_ERROR_CHARS = 300  # characters of the last error kept per worker


@dataclass
class WorkerState:
    """What the supervisor knows about one worker (read by ``status``)."""

    name: str
    run: Callable[[], None]
    state: str = "new"  # new / running / down / done
    restarts: int = 0  # times the worker was started again after dying
    deaths: int = 0  # exceptions that escaped the worker
    last_error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)


class Supervisor:
    """Owns the agent's worker threads.

    Args:
        prefix: thread name prefix (``agent-<device_id>``); threads are named ``prefix-name``.
        stop: set when the agent stops; workers must return soon after.
        restart_base_s / restart_cap_s: backoff between restarts of a dying worker (seconds).
        monotonic: clock for the backoff reset.
    """

    def __init__(
        self,
        prefix: str,
        stop: threading.Event,
        *,
        restart_base_s: float = RESTART_BASE_S,
        restart_cap_s: float = RESTART_CAP_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = prefix
        self._stop = stop
        self._base = restart_base_s
        self._cap = restart_cap_s
        self._monotonic = monotonic
        self._workers: dict[str, WorkerState] = {}
        self._lock = threading.Lock()

    def start(self, name: str, run: Callable[[], None]) -> threading.Thread:
        """Run ``run`` in a supervised daemon thread named ``<prefix>-<name>``."""
        worker = WorkerState(name, run)
        t = threading.Thread(
            target=self._supervise, args=(worker,), name=f"{self._prefix}-{name}", daemon=True
        )
        worker.thread = t
        with self._lock:
            self._workers[name] = worker
        t.start()
        return t

    @property
    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return [w.thread for w in self._workers.values() if w.thread is not None]

    def join(self, timeout_s: float) -> None:
        for t in self.threads:
            t.join(timeout_s)

    @property
    def healthy(self) -> bool:
        """False while any worker is down (died and waits for its restart)."""
        with self._lock:
            return not any(w.state == "down" for w in self._workers.values())

    @property
    def restarts(self) -> int:
        with self._lock:
            return sum(w.restarts for w in self._workers.values())

    def status(self) -> dict[str, dict[str, Any]]:
        """JSON-ready: per worker, its state, restarts and last error."""
        with self._lock:
            return {
                w.name: {"state": w.state, "restarts": w.restarts, "last_error": w.last_error}
                for w in self._workers.values()
            }

    def _supervise(self, worker: WorkerState) -> None:
        streak = 0  # deaths in a row without a stable run in between
        while True:
            worker.state = "running"
            started = self._monotonic()
            try:
                worker.run()
            except BaseException as exc:  # noqa: BLE001 - whatever ends a worker, it restarts
                worker.deaths += 1
                worker.last_error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
                if self._stop.is_set():
                    worker.state = "done"
                    return
                worker.state = "down"
                if self._monotonic() - started >= STABLE_S:
                    streak = 0
                delay = backoff_delay(streak, self._base, self._cap)
                streak += 1
                log.error(
                    "worker %s died (%s); restarting in %.1f s (restart #%d)",
                    worker.name,
                    worker.last_error,
                    delay,
                    worker.restarts + 1,
                    exc_info=exc,
                )
                if self._stop.wait(delay):
                    worker.state = "done"
                    return
                worker.restarts += 1
                continue
            worker.state = "done"
            return


__all__ = ["Supervisor", "WorkerState"]
