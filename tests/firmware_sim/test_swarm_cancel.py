"""A cancelled simulated device stops even when ``asyncio.wait_for`` swallows the cancellation.

Python 3.11's ``wait_for`` returns its awaitable's result when that awaitable completes in the
same loop iteration as the cancellation (CPython gh-86296): a device task cancelled by a mode
switch in the middle of a publish then ran on, and the switch of 10,000 devices waited for it.
"""

from __future__ import annotations

import asyncio

import pytest

from firmware_sim.swarm_device import _raise_if_cancelled


def test_a_cancellation_wait_for_swallowed_is_raised_again() -> None:
    async def scenario() -> None:
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        went_on = asyncio.Event()

        async def publish_then_wait() -> None:
            await asyncio.wait_for(acked, 60)  # the PUBACK, as aiomqtt waits for it
            _raise_if_cancelled()
            went_on.set()
            await asyncio.Event().wait()  # the next report, which never comes

        task = asyncio.ensure_future(publish_then_wait())
        await asyncio.sleep(0)  # the task now waits for its acknowledgement
        acked.set_result(1)  # the acknowledgement and the cancellation in one iteration
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert not went_on.is_set()

    asyncio.run(scenario())
