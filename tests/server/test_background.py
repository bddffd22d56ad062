"""server.core.background.Worker: a failing step is reported and the loop keeps going."""

from __future__ import annotations

import threading

from server.core.background import Worker


def test_worker_survives_failing_steps_and_stops():
    calls: list[int] = []
    errors: list[Exception] = []
    done = threading.Event()

    def step() -> float:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError(f"blip {len(calls)}")
        if len(calls) >= 5:
            done.set()
        return 0.0

    w = Worker("t", step, error_wait_s=0.0, on_error=errors.append)
    w.start()
    assert done.wait(10), "the loop died after a failing step"
    w.stop()
    assert not w.running
    assert [str(e) for e in errors] == ["blip 1", "blip 2"]


def test_wake_cuts_a_long_wait_short():
    ticks = threading.Semaphore(0)

    def step() -> float:
        ticks.release()
        return 3600.0

    w = Worker("t", step)
    w.start()
    assert ticks.acquire(timeout=10)
    w.wake()
    assert ticks.acquire(timeout=10), "wake() did not end the wait"
    w.stop()
