"""One way to run a background loop in the server: a named daemon thread that survives bad steps.

The ingest writer, the rollout engine and the training job runner are each a ``Worker`` whose
``step`` does one unit of work and says how long to wait before the next. A step that raises is
logged and handed to ``on_error``; the loop goes on, because a database blip must not silently end
ingest, rollouts or training for the life of the process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Worker:
    """Calls ``step()`` until stopped; ``step`` returns the seconds to wait before calling again."""

    def __init__(
        self,
        name: str,
        step: Callable[[], float],
        *,
        error_wait_s: float = 1.0,  # seconds to wait after a failed step
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.name = name
        self._step = step
        self._error_wait_s = error_wait_s
        self._on_error = on_error
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Cut the current wait short (new work arrived)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._step()
            except Exception as exc:  # see the module docstring: log, report, keep going
                log.exception("%s: step failed", self.name)
                if self._on_error is not None:
                    self._on_error(exc)
                wait = self._error_wait_s
            if wait > 0 and not self._stop.is_set():
                self._wake.wait(wait)
                self._wake.clear()
