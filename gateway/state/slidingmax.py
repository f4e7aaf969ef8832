"""The largest value seen over the last few seconds, in O(1) amortised per observation (a monotonic deque)."""

from __future__ import annotations

from collections import deque


class SlidingMax:
    """Max of the values observed in the last `span` seconds (times are the caller's clock, non-decreasing).

    Only values that can still become the maximum are kept: a new value drops every older one not larger than
    it (those leave the window first and never exceed it), so the deque is strictly decreasing and its front is
    the answer."""

    __slots__ = ("span", "_q")

    def __init__(self, span: float) -> None:
        self.span = span
        self._q: deque[tuple[float, int]] = deque()

    def add(self, value: int, now: float) -> None:
        q = self._q
        while q and q[-1][1] <= value:
            q.pop()
        q.append((now, value))

    def max(self, now: float, default: int) -> int:
        """The largest value observed in (now - span, now], `default` when there is none."""
        q, since = self._q, now - self.span
        while q and q[0][0] <= since:
            q.popleft()
        return q[0][1] if q else default
