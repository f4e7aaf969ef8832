"""Retry budget: retries may add at most a fraction of recent traffic, so a sick fleet is not hammered twice."""

from __future__ import annotations

import time
from collections import deque


class RetryBudget:
    def __init__(self, ratio: float, minimum: int, window: float = 10.0) -> None:
        self.ratio = ratio
        self.minimum = minimum
        self.window = window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.window
        for d in (self._requests, self._retries):
            while d and d[0] < edge:
                d.popleft()

    def request(self) -> None:
        self._requests.append(time.monotonic())

    def try_spend(self) -> bool:
        now = time.monotonic()
        self._trim(now)
        if len(self._retries) >= max(self.minimum, self.ratio * len(self._requests)):
            return False
        self._retries.append(now)
        return True
