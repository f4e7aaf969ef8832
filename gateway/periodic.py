"""Background loops: the one way to run something every few seconds and stop it cleanly.

`stop` does not trust a single cancel: a library that catches CancelledError at the wrong moment (redis-py's
read path disconnects on BaseException, and a cancel that races a socket timeout can come back as TimeoutError)
would otherwise leave the loop ticking and the caller awaiting it forever. So the loop also checks a stop flag,
and `stop` repeats the cancel until the task is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

log = logging.getLogger("gateway.periodic")

#: Seconds `cancel_and_wait` gives a cancelled task before cancelling it again.
RECANCEL_AFTER = 1.0


async def cancel_and_wait(tasks: Collection[asyncio.Task], limit: float = 10.0) -> None:
    """Cancel `tasks` and wait for them, cancelling again every RECANCEL_AFTER s in case one swallowed the cancel;
    after `limit` seconds give up on the rest (logged by name) rather than hang the shutdown."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    pending = {t for t in tasks if not t.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            log.error("tasks did not end when cancelled: %s", ", ".join(sorted(t.get_name() for t in pending)))
            return
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_AFTER, left))
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.error("%s ended with %r", t.get_name(), t.exception())


class Periodic:
    """Calls `tick` every `interval` seconds until stopped. A failing tick is logged, never fatal."""

    def __init__(self, name: str, interval: float, tick: Callable[[], Awaitable[None]], *, immediate: bool = False) -> None:
        self.name = name
        self.interval = interval
        self.tick = tick
        self.immediate = immediate
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        await cancel_and_wait([task])

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        if not self.immediate:
            await asyncio.sleep(self.interval)
        while not self._stopping:
            try:
                await self.tick()
            except Exception:
                log.exception("%s: cycle failed", self.name)
            await asyncio.sleep(self.interval)
