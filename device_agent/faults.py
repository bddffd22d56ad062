"""Named crash points for fault-injection tests: ``EDGELOOP_AGENT_CRASH_AT=<point>:<n>``.

When armed, the agent SIGKILLs itself the ``n``-th time execution reaches ``point`` (no cleanup,
no flush: exactly what a power cut does to the process). Unarmed, ``crash_point`` costs one
attribute read. Points are named ``<area>:<what>``; see ``POINTS``.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "EDGELOOP_AGENT_CRASH_AT"
POINTS = (
    "state:<state>",  # right after an update state was persisted (e.g. state:downloading)
    "download:chunk",  # after a chunk of the artifact was written to the .part file
    "store:before_replace",  # inside an atomic write, temp file complete, before os.replace
    "store:before_activate",  # verified .part about to be moved into models/
    "staging:persisted",  # new slot pointer persisted, session not swapped in yet
    "staging:swapped",  # new session serving, INSTALLED not reported yet
    "probation:tick",  # each probation evaluation
    "spool:appended",  # a captured sample was made durable
)


class _Armed:
    def __init__(self) -> None:
        self.point: str | None = None
        self.n = 0
        self.hits = 0
        self.lock = threading.Lock()
        self.loaded = False


_armed = _Armed()


def arm(spec: str | None) -> None:
    """Arm (``"<point>:<n>"``) or disarm (None/empty) the crash hook for this process."""
    with _armed.lock:
        _armed.loaded = True
        _armed.hits = 0
        _armed.point = None
        if spec:
            point, _, n = spec.rpartition(":")
            if not point or not n.isdigit() or int(n) < 1:
                raise ValueError(f"{ENV} must be <point>:<n> with n >= 1, got {spec!r}")
            _armed.point, _armed.n = point, int(n)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed point and this is its n-th hit."""
    if not _armed.loaded:
        arm(os.environ.get(ENV))
    if _armed.point != name:
        return
    with _armed.lock:
        _armed.hits += 1
        fire = _armed.hits == _armed.n
    if fire:
        os.kill(os.getpid(), signal.SIGKILL)
