"""`timeout(delay)`: `asyncio.timeout` with the timers of many requests shared.

Every attempt bounds its upstream POST (and every stream read and client write) with a timeout, and almost none
of them expire. `asyncio.timeout` arms one event-loop timer per use and cancels it on exit: on uvloop a libuv
timer start and stop, about 3 of its 5 microseconds, on every request. Here deadlines are rounded up to the next
`GRANULARITY` boundary and all deadlines of one boundary share one `loop.call_at`; entering and leaving is a set
insert and remove (the last to leave a slot cancels its timer). At a few hundred requests a second, one timer
serves several requests.

Semantics are those of `asyncio.timeout` (Python 3.11): the expired block's task is cancelled and the block
raises `TimeoutError` unless someone else cancelled the task too; a deadline already past expires at the next loop
iteration. The only difference: a timeout fires up to `GRANULARITY` late, which no limit of the gateway notices
(the shortest are tens of milliseconds).
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

#: Seconds: deadlines are rounded up to a multiple of this, so one timer serves all deadlines of the same slot.
GRANULARITY = 0.01
#: Seconds: a longer delay (an infinite one included) is this long: never, in practice, and a slot number exists.
NEVER = 1e9


class _Wheel:
    """The shared timers of one event loop: slot number -> the timeouts that expire with it, and its timer.

    A slot's timer is cancelled when its last timeout leaves: a request's total timeout is minutes away, and
    timers left pending would pile up by the ten thousand (one per slot) where in-flight requests are a few."""

    __slots__ = ("loop", "slots", "timers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, set[Timeout]] = {}
        self.timers: dict[int, asyncio.TimerHandle] = {}

    def add(self, t: Timeout, when: float) -> int:
        slot = math.ceil(when / GRANULARITY)
        members = self.slots.get(slot)
        if members is None:
            members = self.slots[slot] = set()
            self.timers[slot] = self.loop.call_at(slot * GRANULARITY, self.fire, slot)
        members.add(t)
        return slot

    def remove(self, t: Timeout, slot: int) -> None:
        members = self.slots.get(slot)
        if members is not None:
            members.discard(t)
            if not members:
                del self.slots[slot]
                self.timers.pop(slot).cancel()

    def fire(self, slot: int) -> None:
        del self.timers[slot]
        for t in self.slots.pop(slot):
            t.expire()


#: The wheel of the loop that used one last (a process serves on one loop; each Timeout keeps its own wheel, so
#: a test that runs loop after loop, or loops in two threads, only makes a new wheel now and then).
_last: _Wheel | None = None


def _wheel() -> _Wheel:
    global _last
    loop = asyncio.get_running_loop()
    w = _last
    if w is None or w.loop is not loop:
        w = _last = _Wheel(loop)
    return w


class Timeout:
    """One `async with timeout(delay):` block (use once)."""

    __slots__ = ("_cancelling", "_delay", "_slot", "_task", "_wheel", "expired")

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self.expired = False

    async def __aenter__(self) -> Timeout:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        w = self._wheel = _wheel()
        self._slot = w.add(self, w.loop.time() + min(self._delay, NEVER))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        if not self.expired:
            self._wheel.remove(self, self._slot)
        elif self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc_val  # the cancellation was ours: it is a timeout

    def expire(self) -> None:
        self.expired = True
        self._task.cancel()


def timeout(delay: float) -> Timeout:
    """Like `asyncio.timeout(delay)` (seconds, not None), on the loop's shared timers."""
    return Timeout(delay)
