"""Sample upload limits: per device a rate limit (token bucket) and a daily quota; per server
process the uploads processed at once.

* Rate: ``SampleRateLimiter`` is an in-process token bucket per device, in samples: it holds up
  to ``burst`` samples and refills at ``per_min / 60`` samples a second. It lives in one server
  process: with N processes behind a load balancer a device may reach N times the rate (the
  quota below is the cross-process bound).
* Quota: :func:`charge_quota` counts accepted samples per device per UTC day in the database
  (``sample_upload_counts``) with one guarded ``UPDATE ... WHERE count + n <= quota``, so it
  holds across every server process sharing the database.

* In flight: ``UploadSlots`` lets at most ``slots`` uploads be processed at once in one server
  process; the others wait their turn in the event loop, holding no thread. Uploads are bulk
  traffic that can wait; an operator's approval or a device's report cannot. Unbounded, uploads
  took every request thread and queued there for the database's single writer (SQLite), so an
  approval, which passes that queue several times, waited behind forty of them each time
  (py-spy, ``firmware_sim.procfleet`` with 50 agents: over 30 s). Refused at once instead, the
  agents backed off so far that 4 samples arrived in 20 s of drift instead of about 1,800.

Over the rate or the quota the whole batch is refused with 429 and Retry-After, and after
``wait_s`` without a slot with 503, before anything is stored; the device agent keeps the batch
in its spool and retries later (429 and 503 are transient).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import anyio
from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from server.core.errors import RateLimitedError, UnavailableError
from server.db.sample_store import SampleUploadCount

_MAX_TRACKED = 100_000  # devices remembered by the bucket map before idle ones are forgotten


class SampleRateLimiter:
    """Token bucket per device, in samples (thread-safe)."""

    def __init__(
        self, *, per_min: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate_per_s = per_min / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at)

    def take(self, device_id: str, n: int) -> None:
        """Spend ``n`` samples of ``device_id``'s allowance.

        Raises:
            RateLimitedError: not enough allowance now (nothing is spent).
        """
        if self.rate_per_s <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(device_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
            if n > self.burst:
                raise RateLimitedError(
                    f"batch of {n} samples is over device burst limit {int(self.burst)}: "
                    "send smaller batches",
                    retry_after_s=60,
                )
            if tokens < n:
                wait = (n - tokens) / self.rate_per_s
                self._buckets[device_id] = (tokens, now)
                raise RateLimitedError(
                    f"device {device_id} is over its upload rate of "
                    f"{self.rate_per_s * 60:g} samples/min; retry in {wait:.0f} s",
                    retry_after_s=int(wait) + 1,
                )
            if len(self._buckets) >= _MAX_TRACKED and device_id not in self._buckets:
                self._buckets.clear()  # forgetting a bucket only refills it
            self._buckets[device_id] = (tokens - n, now)


class UploadSlots:
    """At most ``slots`` sample uploads processed at once; the others wait their turn in order,
    holding no thread, for up to ``wait_s`` seconds each (see the module doc)."""

    def __init__(self, slots: int, *, wait_s: float) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        self.slots = slots
        self.wait_s = wait_s
        self._limiter = anyio.CapacityLimiter(slots)

    @property
    def busy(self) -> int:
        """Uploads being processed now."""
        return int(self._limiter.borrowed_tokens)

    @property
    def waiting(self) -> int:
        """Uploads waiting for a slot now."""
        return self._limiter.statistics().tasks_waiting

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold a slot for the block, waiting up to ``wait_s`` for one.

        Raises:
            UnavailableError: no slot came free in time.
        """
        try:
            self._limiter.acquire_nowait()
        except anyio.WouldBlock:
            with anyio.move_on_after(self.wait_s) as waited:
                await self._limiter.acquire()
            if waited.cancelled_caught:
                raise UnavailableError(
                    f"sample intake is busy: no upload slot (of {self.slots}) came free within "
                    f"{self.wait_s:g} s; retry later"
                ) from None
        try:
            yield
        finally:
            self._limiter.release()


def charge_quota(session: Session, *, device_id: str, n: int, quota: int, now: datetime) -> None:
    """Add ``n`` accepted samples to the device's count for today, in the caller's transaction.

    Raises:
        RateLimitedError: today's count would pass ``quota`` (nothing is added).
    """
    if quota <= 0 or n <= 0:
        return
    day = now.date().isoformat()
    dialect = session.get_bind().dialect.name
    ins = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        ins(SampleUploadCount)
        .values(device_id=device_id, day=day, count=0)
        .on_conflict_do_nothing(index_elements=["device_id", "day"])
    )
    charged = session.execute(
        update(SampleUploadCount)
        .where(
            SampleUploadCount.device_id == device_id,
            SampleUploadCount.day == day,
            SampleUploadCount.count + n <= quota,
        )
        .values(count=SampleUploadCount.count + n)
        .returning(SampleUploadCount.count)
        .execution_options(synchronize_session=False)
    ).first()
    if charged is None:
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), now.tzinfo)
        raise RateLimitedError(
            f"device {device_id} is over its daily quota of {quota} samples "
            f"(this batch adds {n}); the quota resets at 00:00 UTC",
            retry_after_s=int((midnight - now).total_seconds()) + 1,
        )
