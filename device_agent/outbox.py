"""Status, metrics and monitoring reports held on disk while the broker is unreachable.

Bounded by ``max_records``; when full the oldest record is dropped and counted. Records are
appended as JSON lines; ``drain`` publishes them in order once the broker is back and then
truncates the file. Delivery is at-least-once: a crash in the middle of a drain resends the
records of that drain (reports carry their timestamp, so a resend is recognisable).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from device_agent.store import atomic_write

log = logging.getLogger(__name__)
Publish = Callable[[str, bytes, int], bool]  # topic, payload, qos -> accepted by the client


class Outbox:
    """A bounded, disk-backed FIFO of (topic, payload, qos)."""

    def __init__(self, path: Path, *, max_records: int = 10_000) -> None:
        self.path = path
        self._max = max_records
        self._lock = threading.Lock()
        self._items: deque[tuple[str, bytes, int]] = deque()
        self.dropped = 0
        self.sent = 0
        self._load()

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in raw.splitlines():
            try:
                d = json.loads(line)
                self._items.append((d["t"], base64.b64decode(d["p"]), int(d["q"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        while len(self._items) > self._max:
            self._items.popleft()
            self.dropped += 1

    def __len__(self) -> int:
        return len(self._items)

    def add(self, topic: str, payload: bytes, qos: int) -> None:
        line = json.dumps(
            {"t": topic, "p": base64.b64encode(payload).decode("ascii"), "q": qos},
            separators=(",", ":"),
        ).encode()
        with self._lock:
            self._items.append((topic, payload, qos))
            if len(self._items) > self._max:
                self._items.popleft()
                self.dropped += 1
                self._rewrite()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as fh:
                    fh.write(line + b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())

    def _rewrite(self) -> None:
        atomic_write(
            self.path,
            b"".join(
                json.dumps(
                    {"t": t, "p": base64.b64encode(p).decode("ascii"), "q": q},
                    separators=(",", ":"),
                ).encode()
                + b"\n"
                for t, p, q in self._items
            ),
        )

    def drain(self, publish: Publish) -> int:
        """Publish held records in order; stops at the first one the client does not accept.
        Returns how many were handed over."""
        with self._lock:
            n = 0
            while self._items:
                topic, payload, qos = self._items[0]
                if not publish(topic, payload, max(qos, 1)):
                    break
                self._items.popleft()
                n += 1
            if n:
                self.sent += n
                if self._items:
                    self._rewrite()
                else:
                    self.path.unlink(missing_ok=True)
            return n
