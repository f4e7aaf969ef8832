"""Background loops stop even when a tick swallows the cancellation (as a library's read path can)."""

from __future__ import annotations

import asyncio

from gateway.periodic import Periodic


async def test_stop_ends_a_loop_whose_tick_swallows_the_cancel():
    ticks = 0
    entered = asyncio.Event()

    async def stubborn() -> None:
        nonlocal ticks
        ticks += 1
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise TimeoutError("a cancel that raced a socket timeout") from None

    loop = Periodic("stubborn", 0.01, stubborn, immediate=True)
    loop.start()
    await entered.wait()
    await asyncio.wait_for(loop.stop(), 5)
    assert not loop.running and ticks == 1


async def test_stop_cancels_a_plain_loop_and_restart_works():
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        ticks += 1

    loop = Periodic("plain", 0.01, tick, immediate=True)
    loop.start()
    await asyncio.sleep(0.05)
    await loop.stop()
    seen = ticks
    assert seen >= 1 and not loop.running
    await asyncio.sleep(0.03)
    assert ticks == seen
    loop.start()
    await asyncio.sleep(0.03)
    await loop.stop()
    assert ticks > seen
