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
moments (mean in-flight interactive requests plus a Poisson margin, MARGIN_SIGMAS standard deviations), because a
batch request holds its slot for a long time. The room counts the slots other classes are expected to give back
within half the interactive TTFT target (the queue serves interactive requests first): a backlog of short answers
turns over several slots a second, one of long answers hardly any. Guard (2) only holds batch back from the
upstreams kept as that room (room_upstreams): the cheapest ones in idle slots per interactive slot that hold the
demand. A slow server whose floor allows 2 of its 16 slots is not held idle for them while a fast GPU has room;
a rate-limited hosted API never is (its budget goes to whoever comes first), so batch work may always spend it,
and a short interactive answer keeps off a nearly spent request budget while anything else can take it
(router.spends_scarce_budget): one request unit yields far more tokens as a long batch answer. A class's
`min_share` of the pool's capacity is always allowed, so batch never starves when interactive load is high.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from gateway.config import ServiceClass
from gateway.errors import GatewayError

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
#: Share of the interactive TTFT target a request may wait in the queue for a slot that another class gives back
#: (the queue serves interactive requests first): the room kept counts the slots expected back within it.
TURNOVER_WAIT = 0.5
#: Time constant of the turnover rate, seconds. Long, like a long batch answer: batch requests admitted together
#: end together, and a burst of ends is no steady turnover (read as one, at ~1.5 s, it let a second wave of long
#: answers take the room and hold it for 12 s: 2% of interactive requests then waited past their TTFT target).
TURNOVER_TAU_S = 10.0
#: Room kept above the expected interactive demand d, in Poisson standard deviations (sqrt d).
MARGIN_SIGMAS = 3.0


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
        #: pool model -> smoothed other-class requests ending per second where their slot becomes interactive room.
        self.turnover: dict[str, float] = {}
        #: pool model -> (monotonic time, requests of the other classes ended so far per upstream) at the last tick.
        self._ended: dict[str, tuple[float, dict[str, int]]] = {}

    def observe(self, pool: Pool, now: float | None = None) -> None:
        """Fold the current interactive in-flight count into the demand estimate, and the other classes' ended
        requests into the turnover rate (called every sync tick)."""
        n = sum(u.class_inflight(INTERACTIVE) for u in pool.upstreams)
        prev = self.demand.get(pool.model, INITIAL_DEMAND)
        # Rise fast (a surge must be seen at once), decay slowly (room must outlast a lull between bursts).
        alpha = 0.5 if n > prev else DEMAND_ALPHA
        self.demand[pool.model] = prev + alpha * (n - prev)
        self._observe_turnover(pool, time.monotonic() if now is None else now)

    def _observe_turnover(self, pool: Pool, now: float) -> None:
        inter = pool.cfg.classes.get(INTERACTIVE)
        others = [c for c in pool.cfg.classes if c != INTERACTIVE]
        ended = {u.name: sum(u.class_done(c) for c in others) for u in pool.upstreams}
        last = self._ended.get(pool.model)
        self._ended[pool.model] = (now, ended)
        if inter is None or last is None or now <= last[0]:
            return
        # A slot that ends where the load is within the interactive limit is room for a waiting interactive request
        # (the queue serves it first); one on a rate-limited API or a server loaded past its limit is not.
        freed = sum(ended[u.name] - last[1].get(u.name, ended[u.name]) for u in pool.upstreams
                    if not (u.cfg.rpm or u.cfg.tpm) and u.load <= interactive_limit(u, inter))
        dt = now - last[0]
        prev = self.turnover.get(pool.model, 0.0)
        self.turnover[pool.model] = prev + (1.0 - math.exp(-dt / TURNOVER_TAU_S)) * (freed / dt - prev)

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
        limit = interactive_limit(u, cls)
        return limit > 0 and u.has_slot(limit)

    def _batch(self, pool: Pool, cands: list[UpstreamStats], ctx: RequestContext) -> list[UpstreamStats]:
        inter = pool.cfg.classes.get(INTERACTIVE)
        if inter is None or (inter.min_tok_s <= 0 and inter.max_ttft_s is None):
            return cands  # no targets to protect
        mine = sum(u.class_inflight(ctx.service_class) for u in pool.upstreams)
        capacity = pool.slots
        guaranteed = mine + 1 <= pool.cfg.classes[ctx.service_class].min_share * capacity
        limits = {u.name: interactive_limit(u, inter) for u in pool.upstreams}
        # Never where running interactive requests would be pushed below their floor.
        ok = [u for u in cands if u.class_inflight(INTERACTIVE) == 0 or u.has_slot(limits[u.name])]
        if guaranteed or not ok:
            return ok
        room = room_upstreams([v for v in pool.upstreams if self._is_room(v, inter, ctx)], limits, self.needed(pool))
        reserve = self.reserve(pool)
        # Only where it takes none of the room kept for interactive requests, or leaves enough of it.
        return [u for u in ok if u not in room or _room_after(room, u, limits) >= reserve]

    @staticmethod
    def _is_room(u: UpstreamStats, inter: ServiceClass, ctx: RequestContext) -> bool:
        """Could `u`'s free slots be room for interactive requests? Not a rate-limited API's (its budget is
        spent by whoever comes first, batch work included) nor one too slow to start for the TTFT target."""
        return u.weight > 0 and not (u.cfg.rpm or u.cfg.tpm) and meets_ttft(u, inter, ctx.est.prompt_tokens)

    def needed(self, pool: Pool) -> float:
        """Interactive slots to have in the pool: the expected demand d with a Poisson margin."""
        d = self.demand.get(pool.model, INITIAL_DEMAND)
        return d + MARGIN_SIGMAS * math.sqrt(d) + 1.0

    def reserve(self, pool: Pool) -> float:
        """Free interactive slots to keep: what is needed beyond the interactive requests in flight, less the slots
        other classes are expected to give back within the wait an interactive request can afford (turnover:
        short batch answers return their slots within the TTFT target, long ones hardly)."""
        inflight = sum(u.class_inflight(INTERACTIVE) for u in pool.upstreams)
        inter = pool.cfg.classes.get(INTERACTIVE)
        slack = TURNOVER_WAIT * inter.max_ttft_s if inter is not None and inter.max_ttft_s is not None else 0.0
        back = self.turnover.get(pool.model, 0.0) * slack
        return max(1.0, self.needed(pool) - inflight - back)


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
