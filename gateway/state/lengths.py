"""Expected output length of a request, from its max_tokens and the lengths its pool has been producing.

Many clients send no max_tokens, or a loose one (4096 for answers of ~300 tokens). Taking max_tokens at face
value overstates a request's duration and its TPM/KV cost, so the router under-fills rate-limited and KV-bound
upstreams and misjudges short vs long requests. The pool's recent output lengths give the distribution of X;
a request limited to m tokens is expected to produce E[min(X, m)].

X is not independent of m, though: a client asking for at most 16 tokens (a classifier, a title) and one asking
for 1024 (an essay) share a pool, and the short answers are the many. Pooled, every request with a generous limit
would be expected at about the pool's mean, the essay taken for a title. So outputs are also kept per band of
max_tokens (powers of two), and a request is estimated from its own band once that band has BAND_MIN_OBSERVED
outputs. Until then, from the outputs of the requests at least as free as it (higher bands, or no max_tokens):
those of requests limited below its own limit were cut by their limits and say nothing about how far it goes. With
none of those either, its max_tokens is taken at face value (the one thing known about it); a request without
max_tokens is estimated from the pool's mean.

Quantiles (which requests count as long, router.spends_scarce_budget) are taken over the expected outputs of
the requests *arriving*, not over the outputs of those finishing: a long request finishes long after it arrived
and a short one soon, so right after a change (or a start) the finished ones are almost all short, and the
question is which of the requests now arriving should get a scarce request unit. Both the quantiles and the
longest answer are over the arrivals of the last LONGEST_S, the request budget's own window (not over the last
KEEP arrivals): a client's long answers arrive one answer apart, so among the last few hundred arrivals of a busy
pool they can be missing altogether (512 arrivals at 40/s are 13 s, shorter than a 1024-token answer), and the
threshold then fell to the next-shorter class, which spent the budget the long ones came back for. The longest
are those a rate-limited API's pacing bucket keeps a reserve for (router.spends_scarce_budget).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from itertools import accumulate
from typing import TYPE_CHECKING

from gateway.context import DEFAULT_OUTPUT_TOKENS
from gateway.state.slidingmax import SlidingMax

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.state.fleet import Fleet

#: Recent outputs kept per pool (and per max_tokens band), and how many are needed before they are trusted.
KEEP = 512
BAND_KEEP = 128
MIN_OBSERVED = 16
#: A band's own few outputs already say more about its requests than the pool's many (the 1024-token answers
#: of a pool of 16-token ones): it is trusted from this many on.
BAND_MIN_OBSERVED = 4
#: Seconds over which the longest arriving answer is remembered: a rate-limited API's minute (its RPM window).
LONGEST_S = 60.0
#: The sorted copy is rebuilt after this many new observations (not per request: the hot path stays lean), or
#: for the arrivals of the minute, after this share of them is new (a sort per request stays O(log n) amortised).
REBUILD_EVERY = 16
REBUILD_SHARE = 1 / 64
#: Most arrivals kept for the minute's quantiles (a memory bound; a busier pool's minute is sampled by its newest).
ARRIVED_KEEP = 8192


class _Recent:
    """Recent output lengths, with E[min(X, m)], the mean and quantiles over them."""

    __slots__ = ("_recent", "_sorted", "_prefix", "_fresh")

    def __init__(self, keep: int) -> None:
        self._recent: deque[int] = deque(maxlen=keep)
        self._sorted: list[int] = []
        self._prefix: list[int] = [0]  # prefix sums of _sorted
        self._fresh = 0  # observations since the last rebuild

    def __len__(self) -> int:
        return len(self._recent)

    def recent(self) -> deque[int]:
        return self._recent

    def observe(self, output_tokens: int) -> None:
        self._recent.append(output_tokens)
        self._fresh += 1

    def expected(self, max_tokens: int | None) -> int:
        xs, pre = self._view()
        n = len(xs)
        if max_tokens is None:
            return max(1, round(pre[n] / n))
        k = bisect.bisect_right(xs, max_tokens)  # xs[:k] <= max_tokens, the rest are capped by it
        return max(1, round((pre[k] + (n - k) * max_tokens) / n))

    def quantile(self, q: float) -> int:
        xs, _ = self._view()
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def _view(self) -> tuple[list[int], list[int]]:
        if self._fresh >= REBUILD_EVERY or not self._sorted:
            self._sorted = sorted(self._recent)
            self._prefix = list(accumulate(self._sorted, initial=0))  # C-level: the rebuild's cost was this loop
            self._fresh = 0
        return self._sorted, self._prefix


class _Arrivals:
    """Expected outputs of the requests arrived in the last `span` seconds (at most `keep`), and their quantiles."""

    __slots__ = ("span", "_recent", "_sorted", "_fresh")

    def __init__(self, span: float, keep: int) -> None:
        self.span = span
        self._recent: deque[tuple[float, int]] = deque(maxlen=keep)
        self._sorted: list[int] = []
        self._fresh = 0  # arrivals since the last rebuild

    def __len__(self) -> int:
        return len(self._recent)

    def observe(self, expected_output: int, now: float) -> None:
        q = self._recent
        q.append((now, expected_output))
        while q[0][0] <= now - self.span:
            q.popleft()
        self._fresh += 1

    def quantile(self, q: float) -> int:
        if self._fresh >= max(REBUILD_EVERY, len(self._recent) * REBUILD_SHARE) or not self._sorted:
            self._sorted = sorted(x for _, x in self._recent)
            self._fresh = 0
        xs = self._sorted
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def band(max_tokens: int | None) -> int:
    """The max_tokens band a limit belongs to: (2^(k-1), 2^k] -> k; 0 for no limit."""
    return 0 if max_tokens is None else max(1, max_tokens - 1).bit_length()


class OutputLengths:
    """Recent output lengths of one pool; `expected(max_tokens)` = E[min(X, max_tokens)], over the outputs of
    requests with a max_tokens in the same band when there are enough, else over the pool's."""

    __slots__ = ("_all", "_bands", "_arrived", "_longest")

    def __init__(self) -> None:
        self._all = _Recent(KEEP)
        self._bands: dict[int, _Recent] = {}
        self._arrived = _Arrivals(LONGEST_S, ARRIVED_KEEP)  # expected outputs of the requests routed lately
        self._longest = SlidingMax(LONGEST_S)  # of the expected outputs arrived

    def arrived(self, expected_output: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._arrived.observe(expected_output, now)
        self._longest.add(expected_output, now)

    def observe(self, output_tokens: int, max_tokens: int | None = None) -> None:
        if output_tokens <= 0:
            return
        self._all.observe(output_tokens)
        b = self._bands.get(band(max_tokens))
        if b is None:
            b = self._bands[band(max_tokens)] = _Recent(BAND_KEEP)
        b.observe(output_tokens)

    def expected(self, max_tokens: int | None, default: int) -> int:
        """Expected output tokens of a request with this limit (`default`: no max_tokens and no history yet)."""
        k = band(max_tokens)
        own = self._bands.get(k)
        if own is not None and len(own) >= BAND_MIN_OBSERVED:
            return own.expected(max_tokens)
        if max_tokens is None:
            return self._all.expected(None) if len(self._all) >= MIN_OBSERVED else default
        # Rare (a band's first few requests): a plain pass over the freer bands' recent outputs.
        free = [x for b, r in self._bands.items() if b == 0 or b >= k for x in r.recent()]
        if len(free) < BAND_MIN_OBSERVED:
            return max_tokens
        return max(1, round(sum(min(x, max_tokens) for x in free) / len(free)))

    def quantile(self, q: float, default: int) -> int:
        """The q-quantile of the expected outputs of the last LONGEST_S's arrivals (`default` until MIN_OBSERVED)."""
        return self._arrived.quantile(q) if len(self._arrived) >= MIN_OBSERVED else default

    def longest(self, default: int, now: float | None = None) -> int:
        """The longest expected output among the requests arrived in the last LONGEST_S (`default`: none)."""
        return self._longest.max(time.monotonic() if now is None else now, default)


class Lengths:
    """Hook subscriber: refines each request's expected output before routing, learns from finished ones."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def request_start(self, ctx: RequestContext) -> None:
        pool = self.fleet.pool(ctx.model)
        if pool is None or ctx.est.operation == "embeddings":
            return
        ctx.est.output_tokens = pool.lengths.expected(ctx.est.max_tokens, DEFAULT_OUTPUT_TOKENS)
        pool.lengths.arrived(ctx.est.output_tokens)

    def request_end(self, ctx: RequestContext, error: BaseException | None) -> None:
        if error is not None or ctx.est.operation == "embeddings":
            return
        pool = self.fleet.pool(ctx.model)
        if pool is not None:
            pool.lengths.observe(ctx.usage.output_tokens, ctx.est.max_tokens)
