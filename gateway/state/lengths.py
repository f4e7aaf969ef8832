"""Expected output length of a request, from its max_tokens and the lengths its pool has been producing.

Many clients send no max_tokens, or a loose one (4096 for answers of ~300 tokens). Taking max_tokens at face
value overstates a request's duration and its TPM/KV cost, so the router under-fills rate-limited and KV-bound
upstreams and misjudges short vs long requests. The pool's recent output lengths give the distribution of X;
a request limited to m tokens is expected to produce E[min(X, m)].
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import TYPE_CHECKING

from gateway.context import DEFAULT_OUTPUT_TOKENS

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.state.fleet import Fleet

#: Recent outputs kept per pool, and how many are needed before they are trusted over max_tokens.
KEEP = 512
MIN_OBSERVED = 16
#: The sorted copy is rebuilt after this many new observations (not per request: the hot path stays lean).
REBUILD_EVERY = 16


class OutputLengths:
    """Recent output lengths of one pool; `expected(max_tokens)` = E[min(X, max_tokens)] over them."""

    __slots__ = ("_recent", "_sorted", "_prefix", "_fresh")

    def __init__(self) -> None:
        self._recent: deque[int] = deque(maxlen=KEEP)
        self._sorted: list[int] = []
        self._prefix: list[int] = [0]  # prefix sums of _sorted
        self._fresh = 0  # observations since the last rebuild

    def observe(self, output_tokens: int) -> None:
        if output_tokens > 0:
            self._recent.append(output_tokens)
            self._fresh += 1

    def expected(self, max_tokens: int | None, default: int) -> int:
        """Expected output tokens of a request with this limit (`default` when the pool has no history yet)."""
        if len(self._recent) < MIN_OBSERVED:
            return max_tokens or default
        if self._fresh >= REBUILD_EVERY or not self._sorted:
            self._rebuild()
        xs, n = self._sorted, len(self._sorted)
        if max_tokens is None:
            return max(1, round(self._prefix[n] / n))
        k = bisect.bisect_right(xs, max_tokens)  # xs[:k] <= max_tokens, the rest are capped by it
        return max(1, round((self._prefix[k] + (n - k) * max_tokens) / n))

    def quantile(self, q: float, default: int) -> int:
        """The q-quantile of recent output lengths (`default` until MIN_OBSERVED outputs were seen)."""
        if len(self._recent) < MIN_OBSERVED:
            return default
        if self._fresh >= REBUILD_EVERY or not self._sorted:
            self._rebuild()
        xs = self._sorted
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def _rebuild(self) -> None:
        self._sorted = sorted(self._recent)
        pre = [0]
        for x in self._sorted:
            pre.append(pre[-1] + x)
        self._prefix = pre
        self._fresh = 0


class Lengths:
    """Hook subscriber: refines each request's expected output before routing, learns from finished ones."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def request_start(self, ctx: RequestContext) -> None:
        pool = self.fleet.pool(ctx.model)
        if pool is None or ctx.est.operation == "embeddings":
            return
        ctx.est.output_tokens = pool.lengths.expected(ctx.est.max_tokens, DEFAULT_OUTPUT_TOKENS)

    def request_end(self, ctx: RequestContext, error: BaseException | None) -> None:
        if error is not None or ctx.est.operation == "embeddings":
            return
        pool = self.fleet.pool(ctx.model)
        if pool is not None:
            pool.lengths.observe(ctx.usage.output_tokens)
