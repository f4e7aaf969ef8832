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
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway import cost
from gateway.config import ServiceClass
from gateway.context import DEFAULT_OUTPUT_TOKENS, Estimate, RequestContext
from gateway.errors import GatewayError
from gateway.reliability.outlier import OutlierDetector
from gateway.routing import candidates
from gateway.routing.affinity import Affinity
from gateway.routing.classes import BATCH, TURNOVER_WAIT, ClassPolicy
from gateway.routing.preempt import Preemptions
from gateway.state.fleet import Fleet, Pool
from gateway.state.lengths import band
from gateway.state.load import KV_FILL, KV_RISK_FROM
from gateway.state.stats import UpstreamStats


@dataclass(slots=True)
class Decision:
    upstream: UpstreamStats
    strategy: str
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    queue_wait: float = 0.0


#: A queued request that does not fit the rate limits (a large one against TPM) lets later requests that do fit
#: pass for this long; then it holds the line so the budget frees up for it and it cannot starve.
RATE_PASS_S = 2.0
#: Queued requests the wake-up ordering looks at for a prefix cached on the freed upstream (Router._cached_first).
WAKE_LOOKAHEAD = 16
#: Share of an upstream's RPM (used in the last minute, or at the last 10 s' rate) from which its requests are
#: treated as scarce (spends_scarce_budget).
RPM_PRESSURE = 0.8
#: The output length that stands for "a long request" when a scarce request budget is spent (a quantile), while
#: the pool's request rate is unknown; and the highest quantile long_output_q gives.
LONG_OUTPUT_Q = 0.9
LONG_OUTPUT_Q_MAX = 0.99
#: long_output_q counts this share of the budget's requests (a margin: see there).
LONG_SHARE_MARGIN = 0.75
#: A request held for a rate-limited upstream's next request unit (Router._held) is examined again at the next
#: wake-up (a release, or the sync cycle's tick): it is held only while it can still be dispatched this long before
#: its hold_limit.
HOLD_SLACK_S = 0.25


class Refusal(Exception):
    """No upstream can take the request right now.

    `kind`: saturated | rate_limited (may clear any moment), cooldown | ejected (not before `wait` seconds),
    unavailable (no upstream in the pool can ever serve it), too_large (larger than any upstream's TPM allows),
    held (an upstream could take it now, but it gains more by waiting `wait` seconds for a rate-limited one).
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


def error_adjusted(gain: float, p_success: float) -> float:
    """Expected gain of sending a request to an upstream that succeeds with probability `p_success`.

    A failed attempt delivers nothing, and its retry then takes about as much capacity elsewhere as the request
    would have used here: gain*p - gain*(1-p) = gain*(2p-1) for a positive gain. So an upstream failing 30% of
    requests is worth 40% of a healthy one, and one failing half or more is chosen only when nothing better has
    a slot (work-conserving). A negative gain (the least harmful place) only gets worse with failures.
    """
    if p_success >= 1.0:
        return gain
    return gain - 2.0 * (1.0 - p_success) * abs(gain)


def throughput_gain(u: UpstreamStats, est: Estimate, cached: int = 0, wait: float = 0.0, shared: int = 0) -> float:
    """Aggregate output tok/s the request adds on `u`: its own rate minus what it costs the running batch.

    `cached`: prompt tokens `u` probably holds in its prefix cache (routing/affinity.py). They are not prefilled,
    which shortens the request's TTFT (a higher own rate) and the stall its prefill causes the running batch.
    `wait`: seconds it would first wait in the gateway for `u` (Router._held), which lower its own rate.
    `shared`: prompt tokens `u`'s running sequences already hold (affinity.RunningBlocks): KV it does not add.
    """
    c = u.curve
    n = u.load
    t0, t1 = c.tpot(n), c.tpot(n + 1)
    m = max(1, est.output_tokens)
    prefill = max(0, est.prompt_tokens - cached)
    duration = c.ttft_for(prefill) + m * t1
    own = m / (duration + wait)
    if n >= u.cfg.max_concurrency:  # past the engine's slots the request would only queue there
        return 0.0
    ext = n * (1.0 / t0 - 1.0 / t1) if n > 0 else 0.0
    if n > 0 and u.cfg.kind == "gpu":
        # Its prefill stalls the running batch: tokens lost, spread over the request's lifetime (beyond the
        # mean-sized prefill the measured curve already charges).
        ext += (n / t0) * c.excess_prefill(prefill) / duration
    return own * (1.0 - kv_risk(u, est.kv_tokens - shared)) - ext


def spends_scarce_budget(u: UpstreamStats, output_tokens: int, long_output: int, longest: int) -> bool:
    """Would a request of `output_tokens` spend a unit of a nearly used-up requests-per-minute budget that a long
    request would put to better use?

    A hosted API limited in RPM spends one unit of its budget per request, however long the answer. While the
    budget has headroom a request there costs nothing else; once it is nearly used up (requests in the last
    minute, or the last 10 s' rate, at RPM_PRESSURE of the limit, or its pacing bucket half empty: requests are
    being started at the limit's pace), a 64-token answer there takes the place of a long one (`long_output`: the
    length from which the pool's requests count as long, long_output_q) that would have produced far more for the
    same unit. So such a request goes there only when no upstream without a scarce budget can take it
    (_throughput): a scaled-down gain was not enough, since a GPU near its knee adds almost nothing per extra
    sequence and still lost to it. (A mean would not do for the reference: short requests are usually the many,
    and would set it to their own length.)

    Nor does a short answer take a unit while the pacing bucket is not within one request of full
    (UpstreamRates.requests_spare), whatever the counts say: a unit left in the bucket is lost only once the bucket
    overflows, and until then the long answers come back for it (a client's next long answer arrives one answer
    later). Between groups of long answers the 10 s rate dips below RPM_PRESSURE; the short answers then took
    the units the next group found missing. Units nobody else takes still go to them: the bucket fills up.

    The RPM pacing bucket's lower half is kept for the longest answers (`longest`, budget_lengths; those in its
    max_tokens band): a long answer that is not the longest spends a unit only while that bucket is at least half
    full. Long answers of one length come in groups (clients started together, answers of one length finishing
    together); taken first come, the bucket is kept empty by the shorter long answers arriving in between, a
    group of the longest gets one unit at once and one per 60/rpm s after, and those that cannot wait run on a
    GPU for their whole length. The reserve costs no units: the bucket refills until it is full whatever its
    level, and the others take every unit above the reserve. (The TPM bucket is not reserved: it holds eight of
    the largest requests, UpstreamRates._tpm_burst, and reserving it too kept the others off for the seconds it
    takes to refill half of it after a group.)
    """
    rpm = u.cfg.rpm
    if not rpm or band(output_tokens) >= band(longest):
        return False
    r = u.rates  # the recent rate (10 s) sees pressure build before the minute's count does
    if output_tokens >= long_output:
        return r.requests_paced()
    return max(r.used_req_60, r.rps * 60.0) >= RPM_PRESSURE * rpm or r.pacing_low() or not r.requests_spare()


def long_output_q(rpm_rps: float, request_rps: float) -> float:
    """Quantile of the expected outputs of the pool's arriving requests (OutputLengths.quantile) from which a
    request counts as long for spends_scarce_budget.

    The RPM-limited upstreams can start `rpm_rps` requests a second out of the `request_rps` the pool receives:
    the budget is best spent on the longest 'rpm_rps / request_rps' share of them, so the threshold is the
    (1 - that share)-quantile. A fixed quantile would misplace it whenever the share differs: with 16- to
    1024-token requests mixed the short ones are the many, the 90th percentile is a short length, and the budget
    went to requests a GPU serves as well. Unknown rate: LONG_OUTPUT_Q.

    Both rates are estimates (10 s), and erring is not symmetric: a threshold too high leaves budget the long
    requests do not use, and the pressure rule (spends_scarce_budget) lets any request have it again as soon as
    usage falls below RPM_PRESSURE; a threshold too low makes the next-shorter class (often many times more
    numerous) compete for every unit as an equal. So the share is taken with a margin (LONG_SHARE_MARGIN), which
    keeps the threshold inside the class that fills the budget rather than on its lower edge.
    """
    if rpm_rps <= 0 or request_rps <= 0:
        return LONG_OUTPUT_Q
    return min(LONG_OUTPUT_Q_MAX, max(0.0, 1.0 - LONG_SHARE_MARGIN * rpm_rps / request_rps))


def long_output(pool: Pool, est: Estimate) -> int:
    """The output length from which the pool's requests count as long for its scarce request budgets: the one
    definition the strategy (_throughput), Router._holds_out and Router._held all read.

    The arriving requests' threshold (arriving_long), or a longer answer waiting in the gateway's queue: until
    long answers have finished (one answer's duration after a cold start) only the short ones that finished
    first are known, and the backlog waiting for the budget is what a unit is taken from. So while a long answer
    waits for the next unit, a shorter one does not take it (first come would)."""
    return max(arriving_long(pool, est), pool.waiting_output)


def budget_lengths(pool: Pool, est: Estimate) -> tuple[int, int]:
    """The two reference lengths spends_scarce_budget takes: the answers that count as long (long_output), and
    the longest the pool received in the last minute (OutputLengths.longest; at least the long ones), which a
    rate-limited upstream's pacing bucket keeps a reserve for."""
    long = long_output(pool, est)
    return long, max(pool.lengths.longest(est.output_tokens), long)


def arriving_long(pool: Pool, est: Estimate) -> int:
    """The long_output_q-quantile of the arriving requests' expected outputs (`est`'s own until enough arrived):
    the shortest answers the pool's request budgets are spent on, once they are used at their limit."""
    return pool.lengths.quantile(long_output_q(pool.rpm_rps, pool.request_rps), est.output_tokens)


def hold_limit(cls: ServiceClass, u: UpstreamStats, est: Estimate, timeout: float) -> float:
    """How long after its arrival a request may still be held for `u` (Router._held): while `u` can meet its
    class's TTFT target, within its queue `timeout`, and never longer than its answer takes there (by then its
    own rate there has halved, whatever the gain says), HOLD_SLACK_S before any. A held request is not waiting
    for its class's targets (an upstream meeting them was free): holding it never makes it a best-effort miss
    (Router.wake) nor a timeout."""
    ttft = u.curve.ttft_for(est.prompt_tokens)
    limit = min(timeout, ttft + max(1, est.output_tokens) * u.curve.tpot(u.load + 1))
    if cls.max_ttft_s is not None:
        limit = min(limit, cls.max_ttft_s - ttft)
    return limit - HOLD_SLACK_S


def kv_risk(u: UpstreamStats, kv_tokens: int) -> float:
    """Chance-like discount for preemption: 0 while the KV cache (with this request's `kv_tokens`) is below
    KV_RISK_FROM full, rising linearly to 1 at KV_FILL (past which the request is not sent there at all)."""
    fill = u.kv_fill(kv_tokens)
    if fill <= KV_RISK_FROM:
        return 0.0
    return min(1.0, (fill - KV_RISK_FROM) / (KV_FILL - KV_RISK_FROM))


#: The request size the candidate index ranks upstreams for (the live pick scores the real request).
_RANK_EST = Estimate(prompt_tokens=200, output_tokens=DEFAULT_OUTPUT_TOKENS)


class Router:
    def __init__(self, fleet: Fleet, health: OutlierDetector, queue_max: int, queue_timeout: float,
                 sample_above: int = candidates.SAMPLE_ABOVE) -> None:
        self.fleet = fleet
        self.health = health
        #: Pools larger than this score a constant number of candidates (candidates.py); the rest score all.
        self.sample_above = sample_above
        self._indexes: dict[str, candidates.CandidateIndex] = {}
        self.queue_max = queue_max
        self.queue_timeout = queue_timeout
        self._queues: dict[str, deque[_Waiter]] = {m: deque() for m in fleet.pools}
        self.classes = ClassPolicy()
        #: The preemptible attempts running on each upstream (the proxy registers them).
        self.preemptions = Preemptions()
        #: The replica's prefix index (KV-cache affinity); None: routing never looks at the prompt.
        self.affinity: Affinity | None = None

    # ---- choosing --------------------------------------------------------------------------------------------
    def pick(self, pool: Pool, ctx: RequestContext, exclude: frozenset[str] = frozenset(), best_effort: bool = False) -> Decision:
        """Choose now or raise Refusal. Pure decision on in-memory figures: no I/O.

        `best_effort` drops the service class's targets (the request waited its class's `wait_s` for an upstream
        that meets them) but never the hard limits: slots, rate limits, health.
        """
        now = time.time()
        # Large pool: a constant number of candidates, ranked by throughput; a class that prefers another
        # objective (cost) scores the whole pool, or the cheapest upstream could be outside the sample.
        if candidates.sampled(pool, self.sample_above) and pool.strategy_for(ctx.service_class) == "throughput":
            sampled = self._scan(pool, self._index(pool).candidates(), ctx, exclude, now)
            few = self._admitted(pool, sampled.cands, ctx, best_effort)
            if few:
                return self._unless_held(pool, sampled.paced, self._choose(pool, few, ctx), ctx, best_effort)
        scan = self._scan(pool, pool.upstreams, ctx, exclude, now)
        if not scan.cands:
            raise scan.refusal(pool, ctx.est)
        cands = self._admitted(pool, scan.cands, ctx, best_effort)
        if not cands:
            raise Refusal(
                "class_limited", f"no upstream for model {pool.model!r} can serve the {ctx.service_class} class within its targets now"
            )
        return self._unless_held(pool, scan.paced, self._choose(pool, cands, ctx), ctx, best_effort)

    def _unless_held(self, pool: Pool, paced: list[UpstreamStats], d: Decision, ctx: RequestContext, best_effort: bool) -> Decision:
        """The decision, unless the request gains more by waiting for a rate-limited upstream's next unit (_held)."""
        if paced and not best_effort and d.strategy == "throughput" and ctx.est.operation != "embeddings":
            held = self._held(pool, paced, d, ctx)
            if held is not None:
                raise held
        return d

    def _held(self, pool: Pool, paced: list[UpstreamStats], d: Decision, ctx: RequestContext) -> Refusal | None:
        """Should a long answer wait a moment for an upstream whose request budget is being spent at its pace
        (`paced`: its pacing bucket is what refuses the request now) rather than go to the best upstream free now?

        An RPM-limited API used at its limit hands out its units one at a time (every 60/rpm s). Work-conserving,
        the answer that happens to arrive when a unit is free gets it; a 1024-token answer arriving a moment too
        late runs on a busy GPU at a fraction of the rate (tens of seconds there), and the unit goes to a shorter
        answer. The loss is the difference of the two gains for the whole answer, while waiting costs only the
        wait: so it waits when its gain there, counting the wait (throughput_gain's `wait`: until the bucket
        holds a unit for it and for the answers held before it that are at least as long), beats the best
        upstream free now.

        Only an answer longer than those the budget is spent on anyway (arriving_long) is held: when the unit would
        go to an answer as long, holding only delays it (the budget is used either way); a longer one takes the
        unit from a shorter one, which yields it while it waits (long_output). And only until hold_limit."""
        est = ctx.est
        if est.output_tokens <= arriving_long(pool, est):
            return None
        cls, best = pool.cfg.classes[ctx.service_class], d.scores.get(d.upstream.name, -math.inf)
        (long, longest), waited = budget_lengths(pool, est), time.monotonic() - ctx.started
        for u in paced:
            if spends_scarce_budget(u, est.output_tokens, long, longest) or not self.classes.admit(pool, [u], ctx):
                continue
            wait = u.rates.paced_in(u.tpm_charge(est), self._held_ahead(pool, ctx))
            if waited + wait > hold_limit(cls, u, est, self._timeout(cls)):
                continue
            gain = error_adjusted(throughput_gain(u, est, wait=wait), self.health.success_probability(u)) * u.weight
            if gain > best:
                return Refusal("held", f"held {wait:.2f}s for the next request unit of {u.name}", wait)
        return None

    def _held_ahead(self, pool: Pool, ctx: RequestContext) -> int:
        """Requests held in the pool's queue that take a unit before this one: longer ones (a shorter one yields
        it, long_output), and as long ones held since earlier (the queue serves the oldest first). Counting the
        later ones too, two answers of a group each saw the other ahead of it, and the older let go of its hold."""
        m, t = ctx.est.output_tokens, ctx.started
        return sum(1 for w in self._queues[pool.model] if w.last.kind == "held" and w.ctx is not ctx
                   and (w.ctx.est.output_tokens > m or (w.ctx.est.output_tokens == m and w.ctx.started < t)))

    def _admitted(self, pool: Pool, cands: list[UpstreamStats], ctx: RequestContext, best_effort: bool) -> list[UpstreamStats]:
        """Affinity ranks the upstreams within their hard limits (with its own bounded-load rule); class admission
        then applies the class's limits, judging TTFT targets by the tokens each upstream would have to prefill."""
        if not cands:
            return cands
        if self.affinity is not None and self.affinity.enabled(pool, ctx):
            ctx.predicted_cached = self.affinity.predict(pool, cands, ctx)
        if best_effort:
            return cands
        cands = self.classes.admit(pool, cands, ctx)
        return [u for u in cands if not self._holds_out(pool, u, ctx)]

    def _holds_out(self, pool: Pool, u: UpstreamStats, ctx: RequestContext) -> bool:
        """Should a request with a TTFT target rather wait a moment in the queue than spend `u`'s scarce request
        budget (spends_scarce_budget)? While it has waited less than TURNOVER_WAIT of the TTFT slack `u` leaves it
        (target - `u`'s TTFT), or so long that `u` can no longer meet the target either (a miss anyway, at a long
        answer's price), and an upstream without a request budget could serve it: slots there turn over several
        times a second (short answers end too), and the queue serves it first. Taken at once, a 64-token answer
        on a rate-limited API costs the unit a 512-token answer would have used (long_output)."""
        cls = pool.cfg.classes[ctx.service_class]
        if cls.max_ttft_s is None or not u.cfg.rpm:
            return False
        waited, slack = time.monotonic() - ctx.started, cls.max_ttft_s - u.curve.ttft_for(ctx.est.prompt_tokens)
        if TURNOVER_WAIT * slack <= waited <= slack:
            return False
        if not spends_scarce_budget(u, ctx.est.output_tokens, *budget_lengths(pool, ctx.est)):
            return False
        # Last, as the dearest test (every upstream of the pool): could anything without a request budget serve it?
        return any(not v.cfg.rate_limited and v.weight > 0 and self.classes.limit(v, cls) > 0 for v in pool.upstreams)

    def _choose(self, pool: Pool, cands: list[UpstreamStats], ctx: RequestContext) -> Decision:
        """The class's strategy (its `prefer`, else the pool's) among the upstreams its admission left."""
        return STRATEGIES[pool.strategy_for(ctx.service_class)](pool, cands, ctx, self.health.success_probability)

    def _scan(self, pool: Pool, ups: list[UpstreamStats], ctx: RequestContext, exclude: frozenset[str], now: float) -> _Scan:
        """The upstreams that can take the request now, and why the others cannot. With affinity, the KV limit
        counts only the prompt tokens an engine's running sequences do not already hold (ctx.kv_shared)."""
        sc = _Scan()
        est = ctx.est
        aff = self.affinity
        shared = ctx.kv_shared = aff.kv_shared(ups, ctx) if aff is not None and aff.enabled(pool, ctx) else {}
        for u in ups:
            if u.name in exclude or u.weight <= 0 or est.operation not in u.operations:
                continue
            if not u.fits_tpm(u.tpm_charge(est)):
                sc.too_large = True
                continue
            until = max(u.cooldown_until, self.health.ejected_until(u))
            if until > now:
                sc.soonest = min(sc.soonest, until - now)
                sc.blocked = "cooldown" if u.cooldown_until > now or sc.blocked == "cooldown" else "ejected"
                continue
            if not self.health.available(u, now) or not u.has_slot():  # half-open with its probe in flight, or full
                sc.why = "saturated"
                continue
            if not u.rate_allows(u.tpm_charge(est)):
                sc.why = "rate_limited"
                sc.paced.append(u)
                continue
            if not u.kv_allows(est.kv_tokens - shared.get(u.name, 0)):
                sc.why = "saturated"
                continue
            sc.cands.append(u)
        return sc

    def _index(self, pool: Pool) -> candidates.CandidateIndex:
        idx = self._indexes.get(pool.model)
        if idx is None:
            idx = self._indexes[pool.model] = candidates.CandidateIndex(pool, self._rank)
        return idx

    def _rank(self, u: UpstreamStats) -> float:
        """Index key of an upstream in a large pool: its throughput score for a typical request, -inf if it cannot
        take one now (cooling down, ejected, no free slot)."""
        now = time.time()
        if max(u.cooldown_until, self.health.ejected_until(u)) > now or not u.has_slot():
            return -math.inf
        return throughput_gain(u, _RANK_EST) * u.weight

    def reindex(self) -> None:
        """Re-rank the upstreams whose figures changed since the last call (called each sync cycle, not per request)."""
        changed = self.fleet.changed
        if not changed:
            return
        names, self.fleet.changed = changed, set()
        for m, pool in self.fleet.pools.items():
            if candidates.sampled(pool, self.sample_above):
                self._index(pool).update(names)

    # ---- admission (queue when everything is busy) ----------------------------------------------------------
    async def admit(self, pool: Pool, ctx: RequestContext, exclude: frozenset[str] = frozenset()) -> Decision:
        """Dispatch now, or wait in the pool's priority queue; raise GatewayError when waiting cannot help."""
        q = self._queues[pool.model]
        cls = pool.cfg.classes[ctx.service_class]
        timeout = self._timeout(cls)
        if not any(w.cls.priority <= cls.priority and self._holds_line(pool, w) for w in q):  # nobody waits ahead
            try:
                return self._dispatch(self.pick(pool, ctx, exclude), ctx)
            except Refusal as r:
                if r.kind == "unavailable":
                    raise GatewayError(503, r.detail, code="no_upstream") from None
                if r.kind == "too_large":
                    raise GatewayError(400, r.detail, code="exceeds_upstream_limits", param="max_tokens") from None
                if r.wait > timeout:  # nothing comes back before the queue would give up
                    raise _refused(r, r.wait) from None
                last = r
        else:
            last = Refusal("saturated", "queued behind earlier requests")
        if len(q) >= self.queue_max:
            raise GatewayError(503, f"gateway queue for model {pool.model!r} is full", code="queue_full", retry_after=1)
        self._preempt_for(pool, ctx, cls, last, exclude)
        w = _Waiter(pool, ctx, cls, exclude, asyncio.get_running_loop().create_future(), time.monotonic(), last)
        q.append(w)
        self._queue_changed(pool)
        try:
            d = await asyncio.wait_for(asyncio.shield(w.future), timeout)
        except asyncio.TimeoutError:
            if not (w.future.done() and not w.future.cancelled()):
                w.future.cancel()
                raise _refused(w.last, 1.0, f"; waited {timeout:.0f}s") from None
            d = w.future.result()  # dispatched (slot credited) just as the timeout fired: use it, never leak it
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled():
                self.undispatch(w.future.result().upstream, ctx)  # admitted just as the client left
            w.future.cancel()
            raise
        finally:
            if w in q:
                q.remove(w)
                self._queue_changed(pool)
        d.queue_wait = time.monotonic() - w.since
        return d

    def _preempt_for(self, pool: Pool, ctx: RequestContext, cls: ServiceClass, why: Refusal, exclude: frozenset[str]) -> None:
        """A request with targets about to wait for want of a slot: end one lower-class stream where it would then
        fit (routing/preempt.py). The slot comes back when that attempt ends, and the queue serves this request
        first (its class's priority is better)."""
        if (cls.min_tok_s > 0 or cls.max_ttft_s is not None) and why.kind in ("class_limited", "saturated"):
            self.preemptions.make_room(pool, ctx, self.classes, exclude)

    def _timeout(self, cls: ServiceClass) -> float:
        """How long a request of this class waits in the queue at most."""
        return cls.max_wait_s if cls.max_wait_s is not None else self.queue_timeout

    def _queue_changed(self, pool: Pool) -> None:
        pool.waiting_output = max((w.ctx.est.output_tokens for w in self._queues[pool.model]), default=0)

    def _holds_line(self, pool: Pool, w: _Waiter) -> bool:
        """Does this waiter wait for capacity in general (the queue's order applies), or only for the upstreams
        it may still use (a retry that excluded the one that failed it)? The latter must not block the others;
        nor, for RATE_PASS_S, does one the rate limits refused (a later, smaller request may fit)."""
        if w.future.done() or w.last.kind == "held":  # held by choice, for one upstream: others pass
            return False
        if w.last.kind == "rate_limited" and time.monotonic() - w.since < RATE_PASS_S:
            return False  # no head-of-line blocking by a request the limits cannot take yet
        if not w.exclude:
            return True
        try:
            self.pick(pool, w.ctx)
        except Refusal:
            return True
        return False

    def _dispatch(self, d: Decision, ctx: RequestContext) -> Decision:
        u = d.upstream
        charged = u.tpm_charge(ctx.est)
        sec = u.credit(charged, ctx.service_class, ctx.est.kv_tokens)
        ctx.extras["tpm_charge"] = (sec, charged)  # settled by the usage when a `usage` provider reports it
        if self.affinity is not None:
            self.affinity.started(u, ctx)
        self.fleet.changed.add(u.name)
        self.health.dispatched(d.upstream)
        return d

    def undispatch(self, u: UpstreamStats, ctx: RequestContext) -> None:
        """A dispatched request never reached the upstream: free its slot and any half-open probe it held."""
        self.health.abandoned(u)
        self.release(u, ctx)

    def release(self, u: UpstreamStats, ctx: RequestContext) -> None:
        u.release(ctx.service_class, ctx.est.kv_tokens)
        if self.affinity is not None:
            self.affinity.ended(u, ctx)
        self.fleet.changed.add(u.name)
        for m in self.fleet.models_of[u.name]:  # large pools: the freed slot is a candidate at once
            idx = self._indexes.get(m)
            if idx is not None:
                idx.freed(u)
        self.wake(u)

    def wake(self, u: UpstreamStats | None = None) -> None:
        """Serve queued requests, across every model that can use `u` (all when None): by class priority (raised
        by one step per `aging_s` waited, so nothing waits forever), then oldest first.

        A waiter that cannot be placed keeps the later waiters of its pool and class waiting (FIFO within a class),
        unless it only waits for the upstreams its excludes leave it. A waiter whose class targets cannot be met
        within the class's `wait_s` goes best-effort (recorded on its context: an SLO miss).
        """
        pools = [
            self.fleet.pools[m] for m, q in self._queues.items()
            if q and (u is None or u.name in self.fleet.pools[m].cfg.upstreams)
        ]
        if not pools:
            return
        now = time.monotonic()
        waiters = sorted((w for p in pools for w in self._queues[p.model]), key=lambda w: (w.rank(now), w.since))
        if u is not None and self.affinity is not None and len(waiters) > 1:
            waiters = self._cached_first(u, waiters, now)
        blocked: set[tuple[str, str]] = set()
        for w in waiters:
            line = (w.pool.model, w.ctx.service_class)
            if line in blocked or w.future.done():
                continue
            best_effort = w.cls.wait_s > 0 and now - w.since >= w.cls.wait_s and w.last.kind != "held"  # hold_limit
            try:
                d = self.pick(w.pool, w.ctx, w.exclude, best_effort)
            except Refusal as r:
                w.last = r
                if self._holds_line(w.pool, w):
                    blocked.add(line)
                continue
            if best_effort:
                w.ctx.extras["best_effort"] = True
            self._queues[w.pool.model].remove(w)
            self._queue_changed(w.pool)
            w.future.set_result(self._dispatch(d, w.ctx))

    def _cached_first(self, u: UpstreamStats, waiters: list[_Waiter], now: float) -> list[_Waiter]:
        """The queue's order for room freed on `u`: a waiter whose prompt prefix `u` probably caches counts as having
        waited as much longer as the prefill it would save there. Otherwise the oldest waiter takes the room, as
        a miss (a multi-turn conversation moves off the engine holding its history while the next waiter, whose
        history is on `u`, then waits for room elsewhere or misses too); this way each engine's room goes first
        to its own conversations, and a waiter is passed over only by one saving more prefill than its extra
        wait. Only the first WAKE_LOOKAHEAD waiters are considered (a queue storm stays cheap to serve)."""
        aff = self.affinity
        assert aff is not None
        head = waiters[:WAKE_LOOKAHEAD]

        def key(w: _Waiter) -> tuple[float, float]:
            saved = aff.saved_prefill_s(w.pool, u, w.ctx) if aff.enabled(w.pool, w.ctx) else 0.0
            return w.rank(now) - saved / w.cls.aging_s, w.since

        return sorted(head, key=key) + waiters[WAKE_LOOKAHEAD:]

    def tick(self) -> None:
        """Periodic: update each pool's class demand estimate, re-rank the upstreams whose figures changed (large
        pools' candidate index; nothing when idle), then serve the queues (new headroom, waits over)."""
        for p in self.fleet.pools.values():
            self.classes.observe(p)
            p.observe_demand()
        self.reindex()
        self.wake()

    def queue_depth(self) -> dict[str, int]:
        return {m: len(q) for m, q in self._queues.items()}


@dataclass(slots=True)
class _Scan:
    cands: list[UpstreamStats] = field(default_factory=list)
    why: str = "unavailable"
    blocked: str = ""  # every servable upstream is cooling down (Retry-After) or ejected, until `soonest`
    soonest: float = math.inf
    too_large: bool = False
    paced: list[UpstreamStats] = field(default_factory=list)  # refused by their rate limits only (Router._held)

    def refusal(self, pool: Pool, est: Estimate) -> Refusal:
        why = self.why
        if why == "unavailable" and self.blocked:
            state = "rate limited" if self.blocked == "cooldown" else "failing"
            return Refusal(self.blocked, f"every upstream for model {pool.model!r} is {state}", self.soonest)
        if why == "unavailable" and self.too_large:
            return Refusal(
                "too_large",
                f"the request needs {est.admitted_tokens} tokens (prompt + max_tokens), more than the tokens-per-minute "
                f"limit of any upstream for model {pool.model!r} allows a single request; lower max_tokens",
            )
        if why == "unavailable":
            return Refusal("unavailable", f"no upstream in the pool for model {pool.model!r} can serve this request")
        return Refusal(why, f"every upstream for model {pool.model!r} is {why.replace('_', ' ')}")


@dataclass(eq=False)
class _Waiter:
    pool: Pool
    ctx: RequestContext
    cls: ServiceClass
    exclude: frozenset[str]
    future: asyncio.Future
    since: float
    last: Refusal

    def rank(self, now: float) -> float:
        """Queue order: the class's priority, one step better for every `aging_s` waited."""
        return self.cls.priority - (now - self.since) / self.cls.aging_s


# ---- strategies ----------------------------------------------------------------------------------------------
# Each gets the pool, the candidates (free slot, headroom, not ejected), the request context and each upstream's
# recent success probability (from the outlier detector); only `throughput` weighs the latter.
SuccessOdds = Callable[[UpstreamStats], float]


def _throughput(pool: Pool, cands: list[UpstreamStats], ctx: RequestContext, odds: SuccessOdds) -> Decision:
    est = ctx.est
    if est.operation == "embeddings":  # no decode phase: spread by utilisation instead
        d = _least_busy(pool, cands, ctx, odds)
        d.strategy = "throughput"
        return d
    cached, shared = ctx.predicted_cached or {}, ctx.kv_shared or {}
    if any(u.cfg.rpm for u in cands):  # only a request budget can be scarce; the quantile costs a sort now and then
        long, longest = budget_lengths(pool, est)
        plenty = [u for u in cands if not spends_scarce_budget(u, est.output_tokens, long, longest)]
        cands = plenty or cands  # a short answer spends a scarce request budget only when nothing else can take it
    scores = {u.name: error_adjusted(throughput_gain(u, est, cached.get(u.name, 0), shared=shared.get(u.name, 0)), odds(u)) * u.weight
              for u in cands}
    # Work-conserving: every candidate has a free slot, so even a negative best gain is dispatched (the least
    # harmful place); requests wait in the gateway only when no upstream has a slot or rate-limit headroom.
    best = max(cands, key=lambda u: scores[u.name])
    hit = cached.get(best.name, 0)
    why = f"max marginal gain {scores[best.name]:.1f} tok/s" + (f", ~{hit} prompt tokens cached" if hit else "")
    return Decision(best, "throughput", why, scores)


def _weighted(pool: Pool, cands: list[UpstreamStats], ctx: RequestContext, odds: SuccessOdds) -> Decision:
    u = random.choices(cands, weights=[c.weight for c in cands])[0]
    return Decision(u, "weighted", f"weighted random (weight {u.weight:g})", {c.name: c.weight for c in cands})


def _round_robin(pool: Pool, cands: list[UpstreamStats], ctx: RequestContext, odds: SuccessOdds) -> Decision:
    pool.rr += 1
    u = cands[pool.rr % len(cands)]
    return Decision(u, "round_robin", "next in rotation", {})


def _least_busy(pool: Pool, cands: list[UpstreamStats], ctx: RequestContext, odds: SuccessOdds) -> Decision:
    scores = {u.name: u.load / u.cfg.max_concurrency for u in cands}
    u = min(cands, key=lambda c: (scores[c.name], -c.weight))
    return Decision(u, "least_busy", f"lowest utilisation {scores[u.name]:.2f}", scores)


def _lowest_latency(pool: Pool, cands: list[UpstreamStats], ctx: RequestContext, odds: SuccessOdds) -> Decision:
    est = ctx.est
    m = max(1, est.output_tokens)
    scores = {u.name: u.curve.ttft_for(est.prompt_tokens) + m * u.curve.tpot(u.load + 1) for u in cands}
    u = min(cands, key=lambda c: scores[c.name])
    return Decision(u, "lowest_latency", f"lowest predicted latency {scores[u.name]:.2f}s", scores)


def expected_usd_per_1m(u: UpstreamStats, est: Estimate, batch: bool = False) -> float:
    """What this request adds to the bill per output token (USD per 1M, input included), at the margin.

    Per-token prices: the request's own price over its expected output. An hourly server is paid for whether it
    runs or idles, so a request there adds tokens but no spend: 0 at the margin (and it lowers that server's
    average $/token, cost.gpu_usd_per_1m). Filling paid-for servers first is what lowers the fleet's $/1M; the
    router only offers servers with a free slot, so this never pushes one past max_concurrency. No price: 0.
    `batch`: priced at the provider's batch rates, which is what a batch-class request is charged (spend.py)."""
    p = u.cfg.price
    if p is None or not p.per_token:
        return 0.0
    m = max(1, est.output_tokens)
    return cost.request_cost_micros(p, cost.Tokens(est.prompt_tokens, 0, m), batch=batch) / m


def _cost(pool: Pool, cands: list[UpstreamStats], ctx: RequestContext, odds: SuccessOdds) -> Decision:
    """Cheapest USD per token among the candidates (all have a free slot); ties (e.g. the paid-for hourly
    servers) by throughput gain, so among them the request still goes where it adds the most tok/s."""
    est = ctx.est
    batch = ctx.service_class == BATCH
    scores = {u.name: expected_usd_per_1m(u, est, batch) for u in cands}
    best = min(cands, key=lambda u: (round(scores[u.name], 9), -throughput_gain(u, est) * u.weight))
    return Decision(best, "cost", f"cheapest ${scores[best.name]:.4f}/1M output tokens", scores)


#: The one registry of routing strategies: config and settings validation, docs and the router read it.
#: Adding a strategy = a function here (or imported here) plus its entry and its test.
STRATEGIES: dict[str, Callable[[Pool, list[UpstreamStats], RequestContext, SuccessOdds], Decision]] = {
    "throughput": _throughput,
    "weighted": _weighted,
    "round_robin": _round_robin,
    "least_busy": _least_busy,
    "lowest_latency": _lowest_latency,
    "cost": _cost,
}
