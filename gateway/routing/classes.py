"""Service classes: per-request speed targets enforced by admission, next to the fleet's aggregate tok/s.

Why. Continuous batching trades the request's speed for the system's: with t(n) = a + b*n seconds per output token,
each of n sequences on a GPU server decodes at 1/t(n) while the server's aggregate n/t(n) rises. Maximising the
aggregate alone water-fills every server to its knee, and every reader then gets the knee's per-request speed.
A class names what its requests need: a decode floor `f` (tok/s per request), a TTFT target, a priority.

Interactive admission. All sequences on a server share t(n), so a floor f holds for every running sequence while
the server's *total* load n satisfies t(n) <= 1/f, i.e. n <= n_f = (1/f - a)/b. An interactive request may go to an
upstream only if, counting itself, the load stays within n_f (split across replicas like every other limit) and its
predicted TTFT (the fitted TTFT for its prompt size) meets the target. A hosted API qualifies while its measured
per-request speed and TTFT meet the targets. Among qualifying upstreams the class's strategy picks: its `prefer`
(cost: the cheapest USD per token; throughput: the marginal gain), else the pool's (Pool.strategy_for).

Batch admission. Batch requests fill the remaining capacity up to the throughput-optimal point (max_concurrency, the
knee; rate limits), with two guards: (1) never onto a server where interactive requests are running if that pushes
the load past their n_f; (2) keep enough interactive room free for the interactive demand expected in the next
moments, because a batch request holds its slot for a long time. The room is sized by a queueing model
(slots_for_wait): an interactive request may wait in the queue (which serves it first) for part of its TTFT target,
and within that wait the interactive requests themselves give slots back, so the room needed grows with the
arrivals' burstiness, not with a margin on the whole in-flight count. Slots given back by other classes are not
counted: long answers admitted together end together, so their mean rate says nothing about the next second (read as
steady turnover it let cohorts of batch requests take the room and an interactive burst wait past its target for the
cohort's end). Nor are they credited as forecast departures (each stream shows how far it is): the room beyond the
Poisson fluctuation is what absorbs a surge while batch slots, held ~12 s each, come back, and every slot given to
batch earlier is one fewer then (an event model of the mixed bench's fast GPU: +0.4 busy slots for twice the
interactive waits past 0.9 s after the surge; each slot less room costs about as much again). Guard (2) only holds
batch back from the upstreams kept as that room (room_upstreams): the cheapest ones in idle slots per interactive
slot that hold the demand. A slow server whose floor allows 2 of its 16 slots is not held idle for them while a fast
GPU has room; a rate-limited hosted API never is (its budget goes to whoever comes first), so batch work may always
spend it, and a short interactive answer keeps off a nearly spent request budget while anything else can take it
(router.spends_scarce_budget): one request unit yields far more tokens as a long batch answer. A class's `min_share`
of the pool's capacity is always allowed, so batch never starves when interactive load is high.

Preemption (routing/preempt.py). Guard (2) keeps slots idle because a batch slot comes back only after ~12 s. A
batch request that may be preempted on an upstream (a GPU, its class's max_preemptions > 0) gives it back at once
when an interactive request needs it, so there it may take the room up to the interactive limit less PREEMPT_ROOM
free slots; the room is then lent rather than kept idle, and only a burst beyond those slots ends batch streams.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from gateway.config import ServiceClass
from gateway.errors import GatewayError
from gateway.routing.preempt import preemptible

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.state.fleet import Pool
    from gateway.state.stats import UpstreamStats

INTERACTIVE = "interactive"
BATCH = "batch"
#: OpenAI's `service_tier` values and the class each asks for (None: no preference).
SERVICE_TIERS: dict[str, str | None] = {"flex": BATCH, "priority": INTERACTIVE, "auto": None, "default": None, "scale": None}
CLASS_HEADER = "X-Gateway-Class"
#: How fast the interactive demand estimate follows the observed in-flight count (per observation, ~150 ms apart).
DEMAND_ALPHA = 0.05
#: The demand assumed before any interactive request was seen: a cold gateway must not hand every slot to a batch
#: backlog that arrived first (batch requests hold their slots for many seconds). It decays like any estimate, so a
#: pool that only ever sees batch work gets its room back within ~15 s.
INITIAL_DEMAND = 8.0
#: The load limit aims this much above the decode floor. The fitted t(n) is an average: the prefill of each
#: admission stalls the batch a little more while arrivals are frequent, and a reader measures its own request's
#: tokens. Filled to the exact n_f (now that short answers no longer spill onto a rate-limited API), 2% of
#: interactive requests decoded at 39.3-40.0 tok/s against a 40 floor (mixed bench).
FLOOR_MARGIN = 0.03
#: Share of the interactive TTFT target a request may wait in the queue for a slot (the queue serves interactive
#: requests first); the rest is for its prefill and the gateway's own latency under load.
TURNOVER_WAIT = 0.5
#: Share of interactive arrivals allowed to wait in the queue longer than that (slots_for_wait sizes the room).
WAIT_TAIL = 0.005
#: Slots kept free on an upstream where batch requests lend the interactive room (they may be preempted there:
#: routing/preempt.py): an interactive arrival then takes a free slot at once, and only a burst beyond them ends
#: batch streams. With none (batch at the limit) every interactive arrival preempts one (the slot an interactive
#: request gives back is refilled by batch at once): ~200 preemptions in the mixed bench's 50 s, each a prefill
#: again and a wait in the queue, 89.3% of the best total; with 1, 99.3% attainment (decode at the floor); with 2,
#: ~140-175 preemptions, 100% attainment and 90.4-90.9% (the fast GPU at ~38 of its 40, ~34 under Erlang C).
PREEMPT_ROOM = 2
#: Time constant of the interactive completion rate, seconds (with the demand it gives the mean holding time).
DONE_TAU_S = 5.0


def requested_class(headers: Mapping[str, str], body: dict) -> tuple[str | None, str | None]:
    """(class, where it came from) from the explicit header, else OpenAI's `service_tier`; (None, None) if neither."""
    h = headers.get(CLASS_HEADER)
    if h:
        return h.strip().lower(), CLASS_HEADER
    tier = body.get("service_tier")
    if tier is None:
        return None, None
    if not isinstance(tier, str) or tier not in SERVICE_TIERS:
        raise GatewayError(
            400, f"'service_tier' must be one of {', '.join(SERVICE_TIERS)}", code="invalid_value", param="service_tier"
        )
    return SERVICE_TIERS[tier], "service_tier" if SERVICE_TIERS[tier] else None


def resolve(pool: Pool, requested: str | None, source: str | None, key_default: str | None) -> str:
    """The request's class: explicit header > service_tier > the API key's default > the pool's default."""
    classes = pool.cfg.classes
    name = requested or key_default or pool.cfg.default_class
    if name not in classes:
        raise GatewayError(
            400, f"unknown service class {name!r} for model {pool.model!r}; choose one of {', '.join(classes)}",
            code="invalid_service_class", param=source or CLASS_HEADER,
        )
    return name


def interactive_limit(u: UpstreamStats, cls: ServiceClass) -> int:
    """Largest total load at which every sequence on `u` still decodes at >= the class's floor, with FLOOR_MARGIN
    (0: never).

    Judged on the whole curve t(n), the line times its per-bucket shape (what the data shows where the line does
    not fit), not on the line alone: an engine held at one concurrency (KV-bound) identifies its level there but
    not the line's intercept, and the line alone refused loads the curve (and the engine) sustained. t(n) grows
    with n, so a bisection finds the limit in O(log max_concurrency)."""
    mc = u.cfg.max_concurrency
    if cls.min_tok_s <= 0:
        return mc
    f = cls.min_tok_s * (1.0 + FLOOR_MARGIN)
    c, t = u.curve, 1.0 / f
    if c.tpot(1) > t:
        return 0
    if c.tpot(mc) <= t:
        return mc
    lo, hi = 1, mc  # t(lo) within the floor, t(hi) not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if c.tpot(mid) <= t else (lo, mid)
    return lo


def meets_ttft(u: UpstreamStats, cls: ServiceClass, prompt_tokens: int) -> bool:
    return cls.max_ttft_s is None or u.curve.ttft_for(prompt_tokens) <= cls.max_ttft_s


class ClassPolicy:
    """Admission per class over the candidates the router found free (pure: reads in-memory figures only)."""

    def __init__(self) -> None:
        #: pool model -> smoothed number of interactive requests in flight (the demand to keep room for).
        self.demand: dict[str, float] = {}
        #: pool model -> smoothed interactive requests ending per second (demand / this: their mean holding time).
        self.done_rate: dict[str, float] = {}
        #: pool model -> (monotonic time, interactive requests ended so far) at the last tick.
        self._ended: dict[str, tuple[float, int]] = {}
        #: (upstream, floor) -> (curve, its fits, max_concurrency, interactive_limit) when last computed.
        self._limits: dict[tuple[str, float], tuple[object, int, int, int]] = {}

    def observe(self, pool: Pool, now: float | None = None) -> None:
        """Fold the current interactive in-flight count into the demand estimate, and the interactive requests
        ended since the last tick into their completion rate (called every sync tick)."""
        n = sum(u.class_inflight(INTERACTIVE) for u in pool.upstreams)
        prev = self.demand.get(pool.model, INITIAL_DEMAND)
        # Rise fast (a surge must be seen at once), decay slowly (room must outlast a lull between bursts).
        alpha = 0.5 if n > prev else DEMAND_ALPHA
        self.demand[pool.model] = prev + alpha * (n - prev)
        self._observe_done(pool, time.monotonic() if now is None else now)

    def _observe_done(self, pool: Pool, now: float) -> None:
        done = sum(u.class_done(INTERACTIVE) for u in pool.upstreams)
        last = self._ended.get(pool.model)
        self._ended[pool.model] = (now, done)
        if last is None or now <= last[0]:
            return
        dt = now - last[0]
        prev = self.done_rate.get(pool.model, 0.0)
        self.done_rate[pool.model] = prev + (1.0 - math.exp(-dt / DONE_TAU_S)) * ((done - last[1]) / dt - prev)

    def limit(self, u: UpstreamStats, cls: ServiceClass) -> int:
        """interactive_limit, kept per upstream and floor until its curve is refitted or its slots change: the
        bisection walks the whole curve, and each batch admission asks it for every upstream of the pool."""
        c, mc = u.curve, u.cfg.max_concurrency
        key = (u.name, cls.min_tok_s)
        hit = self._limits.get(key)
        if hit is not None and hit[0] is c and hit[1] == c.fits and hit[2] == mc:
            return hit[3]
        n = interactive_limit(u, cls)
        self._limits[key] = (c, c.fits, mc, n)
        return n

    def admit(self, pool: Pool, cands: Iterable[UpstreamStats], ctx: RequestContext) -> list[UpstreamStats]:
        cls = pool.cfg.classes[ctx.service_class]
        if cls.min_tok_s > 0 or cls.max_ttft_s is not None:
            return [u for u in cands if self._fits_targets(u, cls, ctx)]
        return self._batch(pool, list(cands), ctx)

    def _fits_targets(self, u: UpstreamStats, cls: ServiceClass, ctx: RequestContext) -> bool:
        # TTFT depends on the tokens to prefill: prompt tokens the upstream probably caches cost none (affinity.py).
        cached = ctx.predicted_cached.get(u.name, 0) if ctx.predicted_cached else 0
        if not meets_ttft(u, cls, ctx.est.prompt_tokens - cached):
            return False
        limit = self.limit(u, cls)
        return limit > 0 and u.has_slot(limit)

    def slots_short(self, u: UpstreamStats, cls: ServiceClass, ctx: RequestContext, freeing: int) -> int | None:
        """How many more of `u`'s slots must be freed for a request of `cls` to meet its targets there, when
        `freeing` slots are already on their way back (0: it fits now or once they are); None: never (too slow)."""
        if u.weight <= 0 or not meets_ttft(u, cls, ctx.est.prompt_tokens):
            return None
        limit = self.limit(u, cls)
        return None if limit <= 0 else max(0, math.ceil(u.load - freeing - limit + 1))

    def _batch(self, pool: Pool, cands: list[UpstreamStats], ctx: RequestContext) -> list[UpstreamStats]:
        inter = pool.cfg.classes.get(INTERACTIVE)
        if inter is None or (inter.min_tok_s <= 0 and inter.max_ttft_s is None):
            return cands  # no targets to protect
        mine = sum(u.class_inflight(ctx.service_class) for u in pool.upstreams)
        capacity = pool.slots
        guaranteed = mine + 1 <= pool.cfg.classes[ctx.service_class].min_share * capacity
        limits = {u.name: self.limit(u, inter) for u in pool.upstreams}
        # Never where running interactive requests would be pushed below their floor.
        ok = [u for u in cands if u.class_inflight(INTERACTIVE) == 0 or u.has_slot(limits[u.name])]
        if guaranteed or not ok:
            return ok
        needed = self.needed(pool)  # an Erlang C search: once per admission
        room = room_upstreams([v for v in pool.upstreams if self._is_room(v, inter, ctx)], limits, needed)
        reserve = self.reserve(pool, needed)
        # Only where it takes none of the room kept for interactive requests, or leaves enough of it, or where
        # the request lends the room: it may be preempted there when an interactive request needs the slot.
        own = pool.cfg.classes[ctx.service_class]
        return [u for u in ok if u not in room or _room_after(room, u, limits) >= reserve
                or (preemptible(ctx, own, u) and u.load + 1 + PREEMPT_ROOM <= limits[u.name])]

    @staticmethod
    def _is_room(u: UpstreamStats, inter: ServiceClass, ctx: RequestContext) -> bool:
        """Could `u`'s free slots be room for interactive requests? Not a rate-limited API's (its budget is
        spent by whoever comes first, batch work included) nor one too slow to start for the TTFT target."""
        return u.weight > 0 and not u.cfg.rate_limited and meets_ttft(u, inter, ctx.est.prompt_tokens)

    def needed(self, pool: Pool) -> float:
        """Interactive slots to have in the pool: enough that an arrival rarely waits longer than it can afford
        (slots_for_wait), for the expected demand d and the holding time d / completion rate (Little's law)."""
        d = self.demand.get(pool.model, INITIAL_DEMAND)
        wait = affordable_wait(pool.cfg.classes.get(INTERACTIVE))
        return float(slots_for_wait(d, wait * self.done_rate.get(pool.model, 0.0) / d if d > 0 else 0.0, WAIT_TAIL))

    def reserve(self, pool: Pool, needed: float | None = None) -> float:
        """Free interactive slots to keep: what is `needed` (self.needed) beyond the interactive requests in flight."""
        inflight = sum(u.class_inflight(INTERACTIVE) for u in pool.upstreams)
        return max(1.0, (self.needed(pool) if needed is None else needed) - inflight)


def affordable_wait(inter: ServiceClass | None) -> float:
    """Seconds an interactive request may wait in the queue for a slot: TURNOVER_WAIT of its TTFT target."""
    return TURNOVER_WAIT * inter.max_ttft_s if inter is not None and inter.max_ttft_s is not None else 0.0


def slots_for_wait(a: float, wait_over_hold: float, tail: float) -> int:
    """Fewest slots c such that an interactive arrival waits longer than W with probability <= `tail`, for an
    offered load of `a` requests in flight on average, each holding its slot S seconds (wait_over_hold = W/S).

    Why a queueing model and not a margin on the in-flight count: a request may wait W for a slot, and within W
    slots come back from the interactive requests themselves (a share W/S of them), so the room needed grows
    with the arrivals' burstiness during W, not with the whole in-flight count's. Model M/M/c (Erlang C):
    P(wait > W) = C(c, a) * exp(-(c - a) W / S). With deterministic holding times (fixed-length answers) waits
    are shorter still, so this errs on the side of the interactive class. W = 0 asks that nobody waits. The
    demand `a` given is the rise-fast/decay-slow estimate (an envelope of the in-flight count, ~1 sigma above its
    mean): that surplus is what covers a surge until batch slots come back (recovery measured at 0 s)."""
    if a <= 0:
        return 1
    b = 1.0  # Erlang B with 0 slots
    c = 0
    while True:
        c += 1
        b = a * b / (c + a * b)
        if c > a:
            waits = c * b / (c - a * (1.0 - b))  # Erlang C
            if waits * math.exp(-(c - a) * wait_over_hold) <= tail:
                return c


def room_upstreams(ups: list[UpstreamStats], limits: Mapping[str, int], needed: float) -> list[UpstreamStats]:
    """The upstreams whose free slots are kept as room for interactive requests: the cheapest ones that can hold
    `needed` interactive requests.

    Keeping room on an upstream caps its load below its interactive limit n_f while interactive requests may
    come, so its slots above n_f go unused: per interactive slot that costs max_concurrency / n_f slots (64/40
    on the reference fast GPU, 16/2 on the slow one at a 40 tok/s floor). So the room is kept where that ratio is
    lowest, on as few upstreams as hold `needed`; the others are open to batch work up to their slots (an
    interactive request may still use a free slot there). Holding batch back from the slow server for its 2
    interactive slots would idle 14 of its 16.
    """
    usable = sorted((u for u in ups if limits[u.name] > 0),
                    key=lambda u: (u.cfg.max_concurrency / limits[u.name], -limits[u.name], u.name))
    out: list[UpstreamStats] = []
    held = 0
    for u in usable:
        if held >= needed:
            break
        out.append(u)
        held += limits[u.name]
    return out


def _room_after(room: list[UpstreamStats], target: UpstreamStats, limits: Mapping[str, int]) -> float:
    """Free interactive slots left on the room upstreams if one more request went to `target`."""
    return sum(max(0.0, limits[u.name] - u.load - (1 if u is target else 0)) for u in room)
