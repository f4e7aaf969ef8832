"""Where routing decides: pick the upstream for a request, or hold it in the gateway's queue.

The default `throughput` strategy sends each request where it adds the most aggregate output tok/s: the
request's own expected rate m / (ttft + m*t(n+1)) minus what it costs the n sequences already there
(n * (1/t(n) - 1/t(n+1))), from each upstream's learned capacity curve (capacity.py), scaled by the operator's
weight. When no upstream has a free slot (max_concurrency = the engine's batch slots, i.e. its knee) or
rate-limit headroom, the request waits here (bounded, FIFO, with a timeout) instead of queueing inside an
engine. Simple strategies are kept for comparison.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

from gateway import cost
from gateway.errors import GatewayError
from gateway.reliability.outlier import OutlierDetector
from gateway.state.fleet import Fleet, Pool
from gateway.state.stats import UpstreamStats

DEFAULT_OUTPUT_TOKENS = 256


@dataclass(slots=True)
class Estimate:
    prompt_tokens: int
    output_tokens: int  # expected (max_tokens when given)
    operation: str = "chat"

    @property
    def admitted_tokens(self) -> int:
        """What hosted APIs charge against TPM at admission."""
        return self.prompt_tokens + self.output_tokens


@dataclass(slots=True)
class Decision:
    upstream: UpstreamStats
    strategy: str
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    queue_wait: float = 0.0


class Refusal(Exception):
    """No upstream can take the request right now.

    `kind`: saturated | rate_limited (may clear any moment), cooldown | ejected (not before `wait` seconds),
    unavailable (no upstream in the pool can ever serve it), too_large (larger than any upstream's TPM allows).
    """

    def __init__(self, kind: str, detail: str, wait: float = 0.0) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.wait = wait


def _refused(r: Refusal, retry_after: float, suffix: str = "") -> GatewayError:
    """The client-facing error for a refusal: 429 when limits are the reason, else 503."""
    if r.kind in ("rate_limited", "cooldown"):
        return GatewayError(429, r.detail + suffix, code="rate_limited", retry_after=retry_after)
    code = "no_healthy_upstream" if r.kind == "ejected" else "saturated"
    return GatewayError(503, r.detail + suffix, code=code, retry_after=retry_after)


def throughput_gain(u: UpstreamStats, est: Estimate) -> float:
    c = u.curve
    n = u.load
    t0, t1 = c.tpot(n), c.tpot(n + 1)
    m = max(1, est.output_tokens)
    duration = c.ttft_for(est.prompt_tokens) + m * t1
    own = m / duration
    if n >= u.cfg.max_concurrency:  # past the engine's slots the request would only queue there
        return 0.0
    ext = n * (1.0 / t0 - 1.0 / t1) if n > 0 else 0.0
    if n > 0 and u.cfg.kind == "gpu":
        # Its prefill stalls the running batch: tokens lost, spread over the request's lifetime.
        ext += (n / t0) * c.prefill * est.prompt_tokens / duration
    return own - ext


class Router:
    def __init__(self, fleet: Fleet, health: OutlierDetector, queue_max: int, queue_timeout: float) -> None:
        self.fleet = fleet
        self.health = health
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self._queues: dict[str, deque[_Waiter]] = {m: deque() for m in fleet.pools}

    # ---- choosing --------------------------------------------------------------------------------------------
    def pick(self, pool: Pool, est: Estimate, exclude: frozenset[str] = frozenset()) -> Decision:
        """Choose now or raise Refusal. Pure decision on in-memory figures: no I/O."""
        now = time.time()
        cands: list[UpstreamStats] = []
        why = "unavailable"
        blocked = ""  # every servable upstream is cooling down (Retry-After) or ejected, until `soonest`
        soonest = math.inf
        too_large = False
        for u in pool.upstreams:
            if u.name in exclude or u.weight <= 0 or est.operation not in u.operations:
                continue
            if not u.fits_tpm(est.admitted_tokens):
                too_large = True
                continue
            until = max(u.cooldown_until, u.ejected_until)
            if until > now:
                soonest = min(soonest, until - now)
                blocked = "cooldown" if u.cooldown_until > now or blocked == "cooldown" else "ejected"
                continue
            if not self.health.available(u, now):  # half-open, its probe is in flight
                why = "saturated"
                continue
            if not u.has_slot():
                why = "saturated"
                continue
            if not u.rate_allows(est.admitted_tokens, est.output_tokens):
                why = "rate_limited"
                continue
            cands.append(u)
        if not cands:
            if why == "unavailable" and blocked:
                state = "rate limited" if blocked == "cooldown" else "failing"
                raise Refusal(blocked, f"every upstream for model {pool.model!r} is {state}", soonest)
            if why == "unavailable" and too_large:
                raise Refusal(
                    "too_large",
                    f"the request needs {est.admitted_tokens} tokens (prompt + max_tokens), more than the tokens-per-minute "
                    f"limit of any upstream for model {pool.model!r} allows a single request; lower max_tokens",
                )
            if why == "unavailable":
                raise Refusal("unavailable", f"no upstream in the pool for model {pool.model!r} can serve this request")
            raise Refusal(why, f"every upstream for model {pool.model!r} is {why.replace('_', ' ')}")
        return _STRATEGIES[pool.strategy](pool, cands, est)

    # ---- admission (queue when everything is busy) ----------------------------------------------------------
    async def admit(self, pool: Pool, est: Estimate, exclude: frozenset[str] = frozenset()) -> Decision:
        """Dispatch now, or wait in the pool's FIFO queue; raise GatewayError when waiting cannot help."""
        q = self._queues[pool.model]
        if not any(self._holds_line(pool, w) for w in q):  # nobody waits ahead for the same capacity
            try:
                return self._dispatch(self.pick(pool, est, exclude), est)
            except Refusal as r:
                if r.kind == "unavailable":
                    raise GatewayError(503, r.detail, code="no_upstream") from None
                if r.kind == "too_large":
                    raise GatewayError(400, r.detail, code="exceeds_upstream_limits", param="max_tokens") from None
                if r.wait > self.queue_timeout:  # nothing comes back before the queue would give up
                    raise _refused(r, r.wait) from None
                last = r
        else:
            last = Refusal("saturated", "queued behind earlier requests")
        if len(q) >= self.queue_max:
            raise GatewayError(503, f"gateway queue for model {pool.model!r} is full", code="queue_full", retry_after=1)
        w = _Waiter(pool, est, exclude, asyncio.get_running_loop().create_future(), time.monotonic(), last)
        q.append(w)
        try:
            d = await asyncio.wait_for(asyncio.shield(w.future), self.queue_timeout)
        except asyncio.TimeoutError:
            w.future.cancel()
            raise _refused(w.last, 1.0, f"; waited {self.queue_timeout:.0f}s") from None
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled():
                self.undispatch(w.future.result().upstream)  # admitted just as the client left
            w.future.cancel()
            raise
        finally:
            if w in q:
                q.remove(w)
        d.queue_wait = time.monotonic() - w.since
        return d

    def _holds_line(self, pool: Pool, w: _Waiter) -> bool:
        """Does this waiter wait for capacity in general (FIFO applies), or only for the upstreams it may still
        use (a retry that excluded the one that failed it)? The latter must not block the requests behind it."""
        if w.future.done():
            return False
        if not w.exclude:
            return True
        try:
            self.pick(pool, w.est)
        except Refusal:
            return True
        return False

    def _dispatch(self, d: Decision, est: Estimate) -> Decision:
        d.upstream.credit(est.admitted_tokens)
        self.health.dispatched(d.upstream)
        return d

    def undispatch(self, u: UpstreamStats) -> None:
        """A dispatched request never reached the upstream: free its slot and any half-open probe it held."""
        self.health.abandoned(u)
        self.release(u)

    def release(self, u: UpstreamStats) -> None:
        u.release()
        self.wake(u)

    def wake(self, u: UpstreamStats | None = None) -> None:
        """Serve queued requests oldest first, across every model that can use `u` (all when None).

        A waiter that cannot be placed keeps its pool's later waiters waiting (FIFO), unless it only waits for
        the upstreams its excludes leave it; other pools go on being served.
        """
        pools = [
            self.fleet.pools[m] for m, q in self._queues.items()
            if q and (u is None or u.name in self.fleet.pools[m].cfg.upstreams)
        ]
        if not pools:
            return
        waiters = sorted((w for p in pools for w in self._queues[p.model]), key=lambda w: w.since)
        blocked: set[str] = set()
        for w in waiters:
            model = w.pool.model
            if model in blocked or w.future.done():
                continue
            try:
                d = self.pick(w.pool, w.est, w.exclude)
            except Refusal as r:
                w.last = r
                if self._holds_line(w.pool, w):
                    blocked.add(model)
                continue
            self._queues[model].remove(w)
            w.future.set_result(self._dispatch(d, w.est))

    def queue_depth(self) -> dict[str, int]:
        return {m: len(q) for m, q in self._queues.items()}


@dataclass(eq=False)
class _Waiter:
    pool: Pool
    est: Estimate
    exclude: frozenset[str]
    future: asyncio.Future
    since: float
    last: Refusal


# ---- strategies ----------------------------------------------------------------------------------------------
def _throughput(pool: Pool, cands: list[UpstreamStats], est: Estimate) -> Decision:
    if est.operation == "embeddings":  # no decode phase: spread by utilisation instead
        d = _least_busy(pool, cands, est)
        d.strategy = "throughput"
        return d
    scores = {u.name: throughput_gain(u, est) * u.weight for u in cands}
    # Work-conserving: every candidate has a free slot, so even a negative best gain is dispatched (the least
    # harmful place); requests wait in the gateway only when no upstream has a slot or rate-limit headroom.
    best = max(cands, key=lambda u: scores[u.name])
    return Decision(best, "throughput", f"max marginal gain {scores[best.name]:.1f} tok/s", scores)


def _weighted(pool: Pool, cands: list[UpstreamStats], est: Estimate) -> Decision:
    u = random.choices(cands, weights=[c.weight for c in cands])[0]
    return Decision(u, "weighted", f"weighted random (weight {u.weight:g})", {c.name: c.weight for c in cands})


def _round_robin(pool: Pool, cands: list[UpstreamStats], est: Estimate) -> Decision:
    pool.rr += 1
    u = cands[pool.rr % len(cands)]
    return Decision(u, "round_robin", "next in rotation", {})


def _least_busy(pool: Pool, cands: list[UpstreamStats], est: Estimate) -> Decision:
    scores = {u.name: u.load / u.cfg.max_concurrency for u in cands}
    u = min(cands, key=lambda c: (scores[c.name], -c.weight))
    return Decision(u, "least_busy", f"lowest utilisation {scores[u.name]:.2f}", scores)


def _lowest_latency(pool: Pool, cands: list[UpstreamStats], est: Estimate) -> Decision:
    m = max(1, est.output_tokens)
    scores = {u.name: u.curve.ttft_for(est.prompt_tokens) + m * u.curve.tpot(u.load + 1) for u in cands}
    u = min(cands, key=lambda c: scores[c.name])
    return Decision(u, "lowest_latency", f"lowest predicted latency {scores[u.name]:.2f}s", scores)


def expected_usd_per_1m(u: UpstreamStats, est: Estimate) -> float:
    """What this request adds to the bill per output token (USD per 1M, input included), at the margin.

    Per-token prices: the request's own price over its expected output. An hourly server is paid for whether it
    runs or idles, so a request there adds tokens but no spend: 0 at the margin (and it lowers that server's
    average $/token, cost.gpu_usd_per_1m). Filling paid-for servers first is what lowers the fleet's $/1M; the
    router only offers servers with a free slot, so this never pushes one past max_concurrency. No price: 0."""
    p = u.cfg.price
    if p is None or not p.per_token:
        return 0.0
    m = max(1, est.output_tokens)
    return cost.request_cost_micros(p, cost.Tokens(est.prompt_tokens, 0, m)) / m


def _cost(pool: Pool, cands: list[UpstreamStats], est: Estimate) -> Decision:
    """Cheapest USD per token among the candidates (all have a free slot); ties (e.g. the paid-for hourly
    servers) by throughput gain, so among them the request still goes where it adds the most tok/s."""
    scores = {u.name: expected_usd_per_1m(u, est) for u in cands}
    best = min(cands, key=lambda u: (round(scores[u.name], 9), -throughput_gain(u, est) * u.weight))
    return Decision(best, "cost", f"cheapest ${scores[best.name]:.4f}/1M output tokens", scores)


_STRATEGIES = {
    "cost": _cost,
    "throughput": _throughput,
    "weighted": _weighted,
    "round_robin": _round_robin,
    "least_busy": _least_busy,
    "lowest_latency": _lowest_latency,
}
