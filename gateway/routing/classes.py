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
the load past their n_f; (2) keep enough interactive-qualifying room free in the pool for the interactive demand
expected in the next moments (mean in-flight interactive requests plus a Poisson margin, MARGIN_SIGMAS standard deviations),
because a batch request holds its slot for a long time. Guard (2) only holds batch back from upstreams whose
slots are that room: a rate-limited hosted API is not (its budget goes to whoever comes first), so batch work
may always spend it, and a short interactive answer is steered away from a nearly spent request budget
(router.request_budget_factor): one request unit yields far more tokens as a long batch answer. A class's `min_share` of the pool's capacity is always
allowed, so batch never starves when interactive load is high.
"""

from __future__ import annotations

import math
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
    """Largest total load at which every sequence on `u` still decodes at >= the class's floor (0: never).

    Judged on the whole curve t(n), the line times its per-bucket shape (what the data shows where the line does
    not fit), not on the line alone: an engine held at one concurrency (KV-bound) identifies its level there but
    not the line's intercept, and the line alone refused loads the curve (and the engine) sustained. t(n) grows
    with n, so a bisection finds the limit in O(log max_concurrency)."""
    mc = u.cfg.max_concurrency
    f = cls.min_tok_s
    if f <= 0:
        return mc
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

    def observe(self, pool: Pool) -> None:
        """Fold the current interactive in-flight count into the demand estimate (called every sync tick)."""
        now = sum(u.class_inflight(INTERACTIVE) for u in pool.upstreams)
        prev = self.demand.get(pool.model, INITIAL_DEMAND)
        # Rise fast (a surge must be seen at once), decay slowly (room must outlast a lull between bursts).
        alpha = 0.5 if now > prev else DEMAND_ALPHA
        self.demand[pool.model] = prev + alpha * (now - prev)

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
        ok = []
        reserve: float | None = None
        for u in cands:
            if u.class_inflight(INTERACTIVE) > 0 and not u.has_slot(limits[u.name]):
                continue  # would push running interactive requests below their floor
            if guaranteed or not self._is_room(u, inter, ctx):
                ok.append(u)  # takes none of the room kept for interactive requests (a rate-limited API, ...)
                continue
            reserve = self.reserve(pool) if reserve is None else reserve
            if self._room_after(pool, u, limits, inter, ctx) >= reserve:
                ok.append(u)
        return ok

    @staticmethod
    def _is_room(u: UpstreamStats, inter: ServiceClass, ctx: RequestContext) -> bool:
        """Do `u`'s free slots count as room for interactive requests? Not a rate-limited API's (its budget is
        spent by whoever comes first, batch work included) nor one too slow to start for the TTFT target."""
        return u.weight > 0 and not (u.cfg.rpm or u.cfg.tpm) and meets_ttft(u, inter, ctx.est.prompt_tokens)

    def _room_after(self, pool: Pool, target: UpstreamStats, limits: dict[str, int], inter: ServiceClass, ctx: RequestContext) -> float:
        """Interactive-qualifying free slots left in the pool if one more request went to `target`. Only upstreams
        without request/token rate limits count: a rate-limited API's slots are no room when its budget is spent
        (batch work spends it too)."""
        room = 0.0
        for u in pool.upstreams:
            if not self._is_room(u, inter, ctx):
                continue
            load = u.load + (1 if u is target else 0)
            room += max(0.0, limits[u.name] - load)
        return room

    def reserve(self, pool: Pool) -> float:
        """Free interactive slots to keep: the expected extra interactive demand with a Poisson margin."""
        d = self.demand.get(pool.model, INITIAL_DEMAND)
        inflight = sum(u.class_inflight(INTERACTIVE) for u in pool.upstreams)
        return max(1.0, d + MARGIN_SIGMAS * math.sqrt(d) + 1.0 - inflight)
