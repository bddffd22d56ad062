"""The target inbox: what the network hands the update worker, bounded before anyone parses it.

Both channels that carry targets (the MQTT target topic and the HTTP target poll) put an
``Inbound`` here; the update worker takes the newest and parses it with ``parse_target``. The
inbox holds at most ``MAX_PENDING`` items (a flood drops the oldest: only the newest target
matters), and a payload over ``MAX_TARGET_BYTES`` is never kept: its size is, so the worker can
report the refusal. Nothing here runs business logic, so paho's network thread may call ``put``.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from contract import MessageError
from contract.messages import MAX_TARGET_BYTES, TargetMessage

MAX_PENDING = 16  # items held for the update worker; older ones are dropped (latest wins)


@dataclass(frozen=True)
class Inbound:
    """One message from the network. ``payload`` is None when it was too large to keep."""

    source: str  # "mqtt" or "http": named in the refusal's reason
    payload: bytes | None
    size: int  # bytes the sender sent

    @classmethod
    def of(
        cls, source: str, payload: bytes | bytearray, *, limit: int = MAX_TARGET_BYTES
    ) -> Inbound:
        """Keep ``payload`` only if it is within ``limit`` bytes."""
        size = len(payload)
        return cls(source, bytes(payload) if size <= limit else None, size)

    @classmethod
    def too_large(cls, source: str, size: int) -> Inbound:
        return cls(source, None, size)


class TargetInbox:
    """A small thread-safe queue of ``Inbound`` items where the newest wins."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self._items: deque[Inbound] = deque(maxlen=max_pending)
        self._cond = threading.Condition()
        self.dropped = 0  # items pushed out by newer ones before the worker looked

    def put(self, item: Inbound | bytes) -> None:
        """Add an item (bare bytes count as an MQTT payload). Never blocks, never raises."""
        if not isinstance(item, Inbound):
            item = Inbound.of("mqtt", item)
        with self._cond:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def take_newest(self, timeout: float) -> tuple[Inbound | None, int]:
        """Wait up to ``timeout`` seconds; return the newest item and how many older ones it
        replaced (all are removed), or (None, 0)."""
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            if not self._items:
                return None, 0
            newest = self._items.pop()
            skipped = len(self._items)
            self._items.clear()
            return newest, skipped

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def parse_target(item: Inbound) -> TargetMessage | None:
    """The target ``item`` carries; None when it clears the retained target (empty payload).

    Raises:
        MessageError: too large, not UTF-8 JSON, too deep, or not a valid target message.
    """
    if item.payload is None:
        raise MessageError(f"{item.size} bytes, limit {MAX_TARGET_BYTES}")
    if not item.payload:
        return None
    return TargetMessage.from_dict(item.payload)


__all__ = ["MAX_PENDING", "Inbound", "TargetInbox", "parse_target"]
