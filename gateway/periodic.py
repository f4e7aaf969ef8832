"""Background loops: the one way to run something every few seconds and stop it cleanly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("gateway.periodic")


class Periodic:
    """Calls `tick` every `interval` seconds until stopped. A failing tick is logged, never fatal."""

    def __init__(self, name: str, interval: float, tick: Callable[[], Awaitable[None]], *, immediate: bool = False) -> None:
        self.name = name
        self.interval = interval
        self.tick = tick
        self.immediate = immediate
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        if not self.immediate:
            await asyncio.sleep(self.interval)
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("%s: cycle failed", self.name)
            await asyncio.sleep(self.interval)
