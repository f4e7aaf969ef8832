"""Live figures per upstream, all in memory: the router's one handle per upstream.

The request path only touches this state (no I/O): it credits dispatches, records finished requests and reads
cached fleet figures. fleet_sync merges these with the other replicas through Redis in the background and calls
`refresh()` so the cached figures (fleet tok/s, RPM/TPM used, remote in-flight) stay current.

UpstreamStats composes one owner per concern, each in its own module; code outside an owner changes its state
through methods, never by attribute assignment:
  endpoint (state/load.py)         in-flight and KV accounting, slot and KV checks
  rates    (state/upstream_rates.py) per-second windows, cached tok/s and RPM/TPM use, rate admission
  learned  (state/learned.py)      samples and the fitted capacity curve
  costs    (state/billing.py)      spend counters
Outlier ejection state is owned by reliability/outlier.py (OutlierDetector), not kept here. Weight and cooldown
(operator and reliability state) are this class's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from gateway import cost
from gateway.config import UpstreamConfig
from gateway.routing.capacity import Sample
from gateway.state.billing import CostCounters
from gateway.state.learned import LearnedCurve
from gateway.state.load import EndpointLoad, Membership
from gateway.state.upstream_rates import ERR, OUT, RL, UpstreamRates
from gateway.upstream import provider_for
from gateway.upstream.base import OPERATION_PATHS as OPERATIONS


class OutlierView(Protocol):
    """What a snapshot needs from the outlier detector (reliability/outlier.py owns the ejection state)."""

    def is_ejected(self, u: UpstreamStats, now: float) -> bool: ...
    def ejections(self, u: UpstreamStats) -> int: ...
    def success_probability(self, u: UpstreamStats) -> float: ...


class UpstreamStats:
    """Everything the router knows about one upstream."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.operations = frozenset(op for op in OPERATIONS if provider_for(cfg.provider).supports(op))
        self.member = Membership()
        self.endpoint = EndpointLoad(cfg, self.member)
        self.rates = UpstreamRates(cfg, self.endpoint)
        self.learned = LearnedCurve(cfg)
        self.costs = CostCounters(cfg)
        #: The fitted curve (the same object as learned.curve, which refits it in place): read per candidate.
        self.curve = self.learned.curve
        self.weight = cfg.weight
        self.cooldown_until = 0.0
        #: routing.affinity.UpstreamAffinity when the replica keeps a prefix index (its figures join the snapshot).
        self.affinity: Any = None
        # The router calls these for every candidate of every pick: bound once from their owners, so a call costs
        # what it did when the state lived here (no delegating frame).
        self.has_slot = self.endpoint.has_slot
        self.kv_allows = self.endpoint.kv_allows
        self.kv_fill = self.endpoint.kv_fill
        self.class_inflight = self.endpoint.class_inflight
        self.class_done = self.endpoint.class_done
        self.rate_allows = self.rates.rate_allows
        self.fits_tpm = self.rates.fits_tpm
        self.tpm_charge = self.rates.tpm_charge
        self.load_area = self.endpoint.load_area
        self.release = self.endpoint.release  # (service_class, kv_tokens): a request here ended
        # The sync loop calls these for every upstream every cycle (fleet_sync._refresh): bound the same way.
        self.refresh = self.rates.refresh
        self.quiet = self.rates.quiet

    # ---- operator and reliability state -------------------------------------------------------------------
    def set_weight(self, weight: float) -> bool:
        """Apply a routing weight (0: draining); True when it changed."""
        changed = weight != self.weight
        self.weight = weight
        return changed

    def set_cooldown(self, until: float) -> bool:
        """Hold the upstream back until `until` (epoch s); a cooldown only ever extends. True when it did."""
        if until <= self.cooldown_until:
            return False
        self.cooldown_until = until
        return True

    def set_membership(self, replicas: int, rank: int) -> None:
        """The live replicas and this one's rank (fleet_sync): limits and max_concurrency are split by them."""
        self.member.update(replicas, rank)

    def set_remote_inflight(self, n: int) -> None:
        self.endpoint.set_remote(n)

    def set_external_load(self, v: float) -> None:
        self.endpoint.set_external(v)

    def attach_affinity(self, ua: Any) -> None:
        self.affinity = ua

    # ---- figures the router and others read ---------------------------------------------------------------
    @property
    def load(self) -> float:
        """Concurrency to plan with: the fleet's in-flight requests plus external load on the engine."""
        return self.endpoint.load

    @property
    def inflight(self) -> int:
        return self.endpoint.inflight_local + self.endpoint.remote

    @property
    def inflight_local(self) -> int:
        return self.endpoint.inflight_local

    @property
    def inflight_remote(self) -> int:
        """In flight here from the other live replicas (fleet_sync)."""
        return self.endpoint.remote

    @property
    def external_load(self) -> float:
        """Requests the engine reports beyond what the gateways sent (engine_metrics.py)."""
        return self.endpoint.external

    @property
    def kv_capacity(self) -> int | None:
        return self.endpoint.kv_capacity

    def kv_load(self) -> float:
        return self.endpoint.kv_load()

    @property
    def replicas(self) -> int:
        return self.member.replicas

    @property
    def rank(self) -> int:
        return self.member.rank

    @property
    def tok_s(self) -> float:
        return self.rates.tok_s

    def window_sum(self, field: int, since: int = 0) -> int:
        return self.rates.window_sum(field, since)

    # ---- request path ---------------------------------------------------------------------------------------
    def credit(self, admitted_tokens: int, service_class: str = "", kv_tokens: int = 0) -> int:
        """A request was dispatched here: count it at once so a burst spreads out. Returns the epoch second it
        was charged to (settle_tokens corrects that second's TPM charge by the usage)."""
        self.endpoint.credit(service_class, kv_tokens)
        return self.rates.credit(admitted_tokens)

    def record_tokens(self, output_tokens: int) -> None:
        if output_tokens > 0:
            self.rates.record(OUT, output_tokens)

    def record_error(self, rate_limited: bool) -> None:
        self.rates.record(RL if rate_limited else ERR, 1)

    def record_sample(self, s: Sample) -> None:
        self.learned.record(s)

    def settle_tokens(self, sec: int, charged: int, used: int) -> None:
        self.rates.settle_tokens(sec, charged, used)

    # ---- cost -----------------------------------------------------------------------------------------------
    def live_usd_per_1m(self) -> float | None:
        """Live USD per 1M output tokens (gateway/cost.py): hourly servers from their measured tok/s."""
        return self.costs.live_usd_per_1m(self.rates.tok_s)

    def billing_usd_per_1m(self) -> float | None:
        """The rate an hourly server's output tokens are charged at now (None: per-token or no price)."""
        return self.costs.billing_usd_per_1m(self.rates.tok_s, 1.0 / self.curve.tpot(1))

    def quote(self, usage: cost.Tokens, batch: bool = False) -> int:
        """What a request with this usage costs here now (micro-dollars), without booking it."""
        return self.costs.quote(usage, batch, self.billing_usd_per_1m())

    def charge(self, usage: cost.Tokens, batch: bool = False) -> int:
        """Price one finished request on this upstream (micro-dollars) and count it in the live figures."""
        return self.costs.charge(usage, batch, self.billing_usd_per_1m())

    def cost_row(self) -> tuple[float, float]:
        """(USD/s, output tok/s) for pool and fleet figures."""
        tok_s = self.rates.tok_s
        return cost.usd_per_second(self.cfg.price, tok_s, self.live_usd_per_1m()), tok_s

    # ---- background (fleet_sync) ----------------------------------------------------------------------------
    def take_dirty(self) -> dict[int, list[int]]:
        return self.rates.take_dirty()

    def take_samples(self) -> list[Sample]:
        return self.learned.take_pending()

    def keep_samples(self, samples: Iterable[Sample]) -> None:
        self.learned.keep(samples)

    def refit(self, now: float) -> None:
        self.learned.refit(now)

    def state(self, now: float, ejected: bool = False) -> str:
        """draining | ejected | cooldown | healthy; `ejected` comes from the outlier detector."""
        if self.weight <= 0:
            return "draining"
        if ejected:
            return "ejected"
        if self.cooldown_until > now:
            return "cooldown"
        return "healthy"

    def snapshot(self, now: float, models: list[str], health: OutlierView | None = None) -> dict:
        c, r = self.cfg, self.rates
        ejected = health.is_ejected(self, now) if health is not None else False
        return {
            "name": self.name,
            "provider": c.provider,
            "kind": c.kind,
            "models": models,
            "weight": self.weight,
            "state": self.state(now, ejected),
            "inflight": self.inflight,
            "inflight_local": self.endpoint.inflight_local,
            "external_load": round(self.endpoint.external, 1),
            "max_concurrency": c.max_concurrency,
            "tok_s": round(r.tok_s, 1),
            "rps": round(r.rps, 2),
            "ttft_s": round(self.curve.ttft, 4),
            "decode_tok_s": round(self.learned.decode_tok_s, 1),
            "errors_per_min": round(r.errors_per_min, 2),
            "rate_limited_per_min": round(r.rate_limited_per_min, 2),
            "ejections": health.ejections(self) if health is not None else 0,
            "success_rate": round(health.success_probability(self), 3) if health is not None else 1.0,
            "capacity": self.curve.snapshot(),
            "limits": {"rpm": c.rpm, "tpm": c.tpm, "rpm_used": r.used_req_60, "tpm_used": r.used_tok_60},
            **({"cache": self.affinity.snapshot()} if self.affinity is not None else {}),
            "price": c.price.model_dump(exclude_none=True) if c.price else None,
            "usd_per_1m_output": _round_opt(self.live_usd_per_1m(), 4),
            "spend_usd": round(cost.usd(self.costs.spend_micros), 6),
            "kv": {"capacity_tokens": self.endpoint.kv_capacity, "in_use_tokens": round(self.endpoint.kv_load())},
        }


def _round_opt(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)
