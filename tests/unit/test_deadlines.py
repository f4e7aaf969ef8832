"""The shared-timer timeout behaves like asyncio.timeout: expiry raises TimeoutError in the block's task, a block
left in time is never cancelled, a cancellation from elsewhere stays a cancellation; deadlines of one slot share a
timer. No sleeps: a deadline already past expires at the next loop iteration."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.reliability import deadlines


async def test_expired_block_raises_timeout_and_the_task_goes_on() -> None:
    with pytest.raises(TimeoutError):
        async with deadlines.timeout(0) as t:
            await asyncio.Event().wait()
    assert t.expired
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancellation was taken back
    await asyncio.sleep(0)  # not cancelled any more


async def test_block_left_in_time_is_not_cancelled_later() -> None:
    async with deadlines.timeout(0) as t:
        pass  # left before the loop ran the slot's timer: the last to leave cancels it
    wheel = deadlines._wheel()
    assert not wheel.slots and not wheel.timers
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not t.expired


async def test_cancellation_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    entered: list[deadlines.Timeout] = []

    async def victim() -> None:
        async with deadlines.timeout(60) as t:
            entered.append(t)
            await asyncio.Event().wait()

    task = asyncio.create_task(victim())
    await asyncio.sleep(0)
    entered[0].expire()  # the deadline passes and the caller cancels in the same loop iteration
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_deadlines_of_one_slot_share_one_timer() -> None:
    loop = asyncio.get_running_loop()
    when = (int(loop.time() / deadlines.GRANULARITY) + 1000) * deadlines.GRANULARITY
    async with deadlines.timeout(when - loop.time()) as a, deadlines.timeout(when - loop.time()) as b:
        wheel = deadlines._wheel()
        assert a._slot == b._slot
        assert wheel.slots[a._slot] == {a, b} and len(wheel.timers) == 1
    assert not wheel.slots and not wheel.timers


async def test_an_infinite_delay_never_expires_and_leaves_no_timer() -> None:
    async with deadlines.timeout(math.inf) as t:
        await asyncio.sleep(0)
    assert not t.expired and not deadlines._wheel().timers
