"""Live figures per upstream, all in memory. This is where tok/s is measured and windowed.

The request path only touches this module (no I/O): it credits dispatches, records finished requests and reads
cached fleet figures. fleet_sync merges these with the other replicas through Redis in the background and calls
`refresh()` so the cached figures (fleet tok/s, RPM/TPM used, remote in-flight) stay current.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Protocol

from gateway import cost
from gateway.config import UpstreamConfig
from gateway.context import Estimate
from gateway.routing.capacity import CapacityCurve, Sample
from gateway.upstream import provider_for
from gateway.upstream.base import OPERATION_PATHS as OPERATIONS

# Per-second counter fields.
REQ, OUT, ADM, ERR, RL = range(5)
FIELDS = ("req", "out", "adm", "err", "rl")
WINDOW_S = 60
RATE_WINDOW_S = 10  # tok/s and error rates are averaged over this many seconds
#: Rate limits are also paced by token buckets refilled at exactly the limit's rate (this replica's share), holding
#: BURST_S seconds of it (and at least PACE_BURST requests, so a small limit such as 6 RPM may start at once).
#: Started no faster than the limit allows, the sliding window never fills early: the upstream is kept busy all
#: minute instead of the budget being burnt in a burst and the upstream then idling until the window slides.
BURST_S = 2.0
PACE_BURST = 8
#: Slack before a request's window slot is treated as expired at the provider (it arrived after the gateway counted it).
EXPIRY_MARGIN_S = 0.5
REFIT_IDLE_S = 10.0  # a curve without new samples is refitted this often (its samples' weights age)
#: Share of a GPU upstream's KV-cache token capacity the router fills: the expected output is a mean, some
#: requests run longer, and past the capacity the engine preempts (recomputes) sequences.
KV_FILL = 0.92
#: From this fill on, the marginal gain is discounted (linearly to 0 at KV_FILL): the risk of preemption.
KV_RISK_FROM = 0.75


class OutlierView(Protocol):
    """What a snapshot needs from the outlier detector (reliability/outlier.py owns the ejection state)."""

    def is_ejected(self, u: UpstreamStats, now: float) -> bool: ...
    def ejections(self, u: UpstreamStats) -> int: ...
    def success_probability(self, u: UpstreamStats) -> float: ...


class Window:
    """Per-second counters keyed by epoch second."""

    __slots__ = ("buckets",)

    def __init__(self) -> None:
        self.buckets: dict[int, list[int]] = {}

    def add(self, sec: int, field: int, v: int) -> None:
        b = self.buckets.get(sec)
        if b is None:
            b = self.buckets[sec] = [0, 0, 0, 0, 0]
        b[field] += v

    def merge(self, other: Window) -> None:
        for sec, vals in other.buckets.items():
            b = self.buckets.get(sec)
            if b is None:
                self.buckets[sec] = list(vals)
            else:
                for i, v in enumerate(vals):
                    b[i] += v

    def sum(self, field: int, since: int) -> int:
        return sum(v[field] for s, v in self.buckets.items() if s >= since)

    def prune(self, before: int) -> None:
        for s in [s for s in self.buckets if s < before]:
            del self.buckets[s]

    def __bool__(self) -> bool:
        return bool(self.buckets)


class UpstreamStats:
    """Everything the router knows about one upstream."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.operations = frozenset(op for op in OPERATIONS if provider_for(cfg.provider).supports(op))
        self.curve = CapacityCurve(cfg.capacity, cfg.max_concurrency)
        self.weight = cfg.weight
        # Exact, this replica only.
        self.inflight_local = 0
        #: In flight from this replica by service class (the router's class admission reads these).
        self.inflight_by_class: dict[str, int] = {}
        # Per-second totals: this replica's own (exact, current) and the other replicas' (from Redis). Flushes
        # write this replica's absolute totals for the seconds that changed, so a retried flush cannot double count.
        self.mine = Window()
        self.dirty: set[int] = set()
        self.others = Window()
        # KV-cache tokens held by this replica's in-flight requests (prompt + expected output), the engine's token
        # capacity (configured `kv_tokens`, else learned from its vllm:cache_config_info) and the KV tokens the
        # engine reports beyond the fleet's own (engine_metrics.py).
        self.kv_local = 0
        self.kv_learned: int | None = None
        self.kv_external = 0.0
        self.pending_samples: list[Sample] = []
        self.samples: deque[Sample] = deque(maxlen=400)
        self._fitted_newest = -1.0  # newest sample's ts at the last refit, and when that was
        self._fitted_at = 0.0
        self._remote = 0
        self._external = 0.0
        # Integral of load over time, so a sample's concurrency is the mean over its interval, not a snapshot
        # (a noisy n would flatten the fitted slope: regression dilution).
        self._load_area = 0.0
        self._load_at = time.monotonic()
        self.replicas = 1
        self.rank = 0  # this replica's index among the live ones (sorted ids): who gets a limit's remainder
        self.cooldown_until = 0.0
        # Cached at refresh; the request path reads these.
        self.tok_s = 0.0
        self.rps = 0.0
        self.errors_per_min = 0.0
        self.rate_limited_per_min = 0.0
        self.used_req_60 = 0
        self.used_tok_60 = 0
        # Pacing buckets (requests, tokens), full at start; may go negative (a request larger than the bucket).
        self._pace_req = math.inf
        self._pace_tok = math.inf
        self._pace_at = time.monotonic()
        self.inflight_at_refresh = 0
        self.req_since_refresh = 0
        self.tok_since_refresh = 0
        self.decode_tok_s = 0.0
        # Outlier ejection state is owned by reliability/outlier.py (OutlierDetector), not kept here.
        #: routing.affinity.UpstreamAffinity when the replica keeps a prefix index (its figures join the snapshot).
        self.affinity: Any = None
        # Money (this replica's requests): what they cost and the output tokens they were charged for.
        self.spend_micros = 0
        self.billed_output = 0

    # ---- cost -----------------------------------------------------------------------------------------------
    def live_usd_per_1m(self) -> float | None:
        """Live USD per 1M output tokens (gateway/cost.py): hourly servers from their measured tok/s."""
        return cost.usd_per_1m_output(self.cfg.price, self.tok_s, self.spend_micros, self.billed_output)

    def billing_usd_per_1m(self) -> float | None:
        """The rate an hourly server's output tokens are charged at now (None: per-token or no price)."""
        p = self.cfg.price
        if p is None or p.per_token or p.hourly is None:
            return None
        return cost.gpu_usd_per_1m(p.hourly, cost.billing_tok_s(self.tok_s, 1.0 / self.curve.tpot(1)))

    def quote(self, usage: cost.Tokens, batch: bool = False) -> int:
        """What a request with this usage costs here now (micro-dollars), without booking it."""
        return cost.request_cost_micros(self.cfg.price, usage, batch=batch, live_usd_per_1m=self.billing_usd_per_1m())

    def charge(self, usage: cost.Tokens, batch: bool = False) -> int:
        """Price one finished request on this upstream (micro-dollars) and count it in the live figures."""
        micros = cost.request_cost_micros(self.cfg.price, usage, batch=batch, live_usd_per_1m=self.billing_usd_per_1m())
        self.spend_micros += micros
        self.billed_output += usage.output_tokens
        return micros

    def cost_row(self) -> tuple[float, float]:
        """(USD/s, output tok/s) for pool and fleet figures."""
        return cost.usd_per_second(self.cfg.price, self.tok_s, self.live_usd_per_1m()), self.tok_s

    # ---- request path -------------------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self.inflight_local + self._remote

    @property
    def load(self) -> float:
        """Concurrency to plan with: the fleet's in-flight requests plus external load on the engine."""
        return self.inflight_local + self._remote + self._external

    @property
    def inflight_remote(self) -> int:
        """In flight here from the other live replicas (fleet_sync)."""
        return self._remote

    @inflight_remote.setter
    def inflight_remote(self, v: int) -> None:
        self._tick()
        self._remote = v

    @property
    def external_load(self) -> float:
        """Requests the engine reports beyond what the gateways sent (engine_metrics.py)."""
        return self._external

    @external_load.setter
    def external_load(self, v: float) -> None:
        self._tick()
        self._external = v

    def _tick(self) -> None:
        now = time.monotonic()
        self._load_area += self.load * (now - self._load_at)
        self._load_at = now

    def load_area(self) -> tuple[float, float]:
        """(integral of load dt, monotonic time): the mean load between two readings is their quotient."""
        self._tick()
        return self._load_area, self._load_at

    def class_inflight(self, service_class: str) -> int:
        return self.inflight_by_class.get(service_class, 0)

    def credit(self, admitted_tokens: int, service_class: str = "", kv_tokens: int = 0) -> int:
        """A request was dispatched here: count it at once so a burst spreads out. Returns the epoch second it
        was charged to (settle_tokens corrects that second's TPM charge by the usage)."""
        self._tick()
        self.inflight_local += 1
        self.kv_local += kv_tokens
        self.inflight_by_class[service_class] = self.inflight_by_class.get(service_class, 0) + 1
        self.req_since_refresh += 1
        self.tok_since_refresh += admitted_tokens
        sec = int(time.time())
        self.mine.add(sec, REQ, 1)
        self.mine.add(sec, ADM, admitted_tokens)
        self.dirty.add(sec)
        self._pace_req -= 1
        self._pace_tok -= admitted_tokens
        return sec

    def release(self, service_class: str = "", kv_tokens: int = 0) -> None:
        self._tick()
        self.inflight_local -= 1
        self.kv_local -= kv_tokens
        self.inflight_by_class[service_class] -= 1

    def record_tokens(self, output_tokens: int) -> None:
        if output_tokens > 0:
            self._add(OUT, output_tokens)

    def record_sample(self, s: Sample) -> None:
        self.pending_samples.append(s)
        rate = 1.0 / s.tpot if s.tpot > 0 else 0.0
        self.decode_tok_s = rate if self.decode_tok_s == 0 else 0.8 * self.decode_tok_s + 0.2 * rate

    def record_error(self, rate_limited: bool) -> None:
        self._add(RL if rate_limited else ERR, 1)

    def _add(self, field: int, v: int) -> None:
        sec = int(time.time())
        self.mine.add(sec, field, v)
        self.dirty.add(sec)

    def window_sum(self, field: int, since: int = 0) -> int:
        """Fleet-wide total of a per-second counter since an epoch second (this replica's part is current)."""
        return self.others.sum(field, since) + self.mine.sum(field, since)

    # ---- limits (read by the router) ----------------------------------------------------------------------
    def _share(self, limit: int, used: int) -> int:
        """This replica's share of what is left of a limit until the next refresh.

        The headroom seen at the last refresh is split between the live replicas, the remainder going to the
        lowest ranks, so the shares add up to the headroom exactly: the fleet cannot overshoot, whatever the
        flush lag, and a headroom smaller than the number of replicas is still usable.
        """
        headroom = limit - used
        if headroom <= 0:
            return 0
        n = max(1, self.replicas)
        return headroom // n + (1 if self.rank < headroom % n else 0)

    def has_slot(self, limit: int | None = None) -> bool:
        """Room for one more request within max_concurrency, this replica's share of it; with a lower `limit` (a
        service class's speed limit) also within this replica's fixed share of that limit.

        max_concurrency is shared dynamically (each replica takes its part of the headroom seen at the last sync).
        A class limit is split statically by replica rank instead: a floor on per-request speed must hold exactly,
        and a fixed split cannot overshoot however stale the other replicas' figures are.
        """
        mc = self.cfg.max_concurrency
        if limit is not None and (limit < mc or self.replicas > 1):
            if self.load >= limit or self.inflight_local + 1 > self.static_share(limit):
                return False
        if self.load >= mc:
            return False
        grown = self.inflight_local - self.inflight_at_refresh
        return grown + 1 <= self._share(mc, self.inflight_at_refresh + self.inflight_remote)

    def static_share(self, limit: int) -> int:
        """This replica's fixed part of `limit`: an even split, the remainder to the lowest ranks."""
        n = max(1, self.replicas)
        return limit // n + (1 if self.rank < limit % n else 0)

    def tpm_charge(self, est: Estimate) -> int:
        """Tokens this upstream's TPM limit is charged for the request at admission.

        `reserved` providers (OpenAI-style) charge prompt + max_tokens up front, so that is what counts when the
        client gave max_tokens; `usage` providers count what is really used, so the gateway charges prompt + the
        expected output (est.output_tokens: from max_tokens and the pool's observed lengths) and settles the
        difference when the usage is known (settle_tokens). Either way the tokens started in the window include
        what the in-flight requests will still consume.
        """
        if self.cfg.tpm_counts == "usage" or est.max_tokens is None:
            return est.prompt_tokens + est.output_tokens
        return est.prompt_tokens + est.max_tokens

    def settle_tokens(self, sec: int, charged: int, used: int) -> None:
        """Correct a `usage` provider's TPM charge (made in epoch second `sec`) by the tokens really used."""
        if self.cfg.tpm_counts != "usage" or used <= 0 or sec not in self.mine.buckets:
            return
        delta = used - charged
        self.mine.add(sec, ADM, delta)
        self.dirty.add(sec)
        self.tok_since_refresh += delta
        self._pace_tok -= delta

    def fits_tpm(self, tokens: int) -> bool:
        """Could a request of this size ever be admitted here (by this replica's share of an idle TPM window)?"""
        return not self.cfg.tpm or tokens <= self.static_share(self.cfg.tpm)

    def rate_allows(self, tokens: int) -> bool:
        """RPM/TPM from the limits themselves: what started in the sliding 60 s window (plus this request) stays
        within this replica's share of the limit, and the pacing buckets have room (see BURST_S).

        Nothing here depends on the request's own duration: a short request is not held back by a small
        in-flight cap, so the queue behind it keeps moving and the budget is filled.
        """
        cfg = self.cfg
        if not (cfg.rpm or cfg.tpm):
            return True
        self._refill()
        if cfg.rpm:
            n = self.req_since_refresh + 1
            if n > self._share(cfg.rpm, self.used_req_60) or self._pace_req < 1.0:
                return False
        if cfg.tpm:
            t = self.tok_since_refresh + tokens
            if t > self._share(cfg.tpm, self.used_tok_60):
                return False
            if self._pace_tok < tokens and self._pace_tok < self._burst(cfg.tpm, 1.0):  # a full bucket takes anything
                return False
        return True

    def _burst(self, limit: int, least: float) -> float:
        """Capacity of a pacing bucket: BURST_S seconds of this replica's share of the limit, at least `least`."""
        share = limit / max(1, self.replicas)
        return max(1.0, min(share, max(share * BURST_S / WINDOW_S, least)))

    def _refill(self) -> None:
        now = time.monotonic()
        dt, self._pace_at = now - self._pace_at, now
        cfg, n = self.cfg, max(1, self.replicas)
        if cfg.rpm:
            self._pace_req = min(self._burst(cfg.rpm, PACE_BURST), self._pace_req + dt * cfg.rpm / WINDOW_S / n)
        if cfg.tpm:
            self._pace_tok = min(self._burst(cfg.tpm, 1.0), self._pace_tok + dt * cfg.tpm / WINDOW_S / n)

    # ---- KV-cache budget (GPU upstreams) ------------------------------------------------------------------
    @property
    def kv_capacity(self) -> int | None:
        """The engine's KV-cache capacity in tokens: configured, else learned from its metrics, else unknown."""
        return self.cfg.kv_tokens or self.kv_learned

    def kv_load(self) -> float:
        """KV tokens in use on the engine: this replica's exactly, the other replicas' estimated at the same
        tokens per request (only counts are shared), plus what the engine reports beyond the fleet's."""
        mine: float = self.kv_local
        if self._remote and self.inflight_local > 0:
            mine += self._remote * self.kv_local / self.inflight_local
        return mine + self.kv_external

    def kv_fill(self, kv_tokens: int) -> float:
        """Share of the KV capacity in use with this request added (0 when the capacity is unknown)."""
        cap = self.kv_capacity
        return (self.kv_load() + kv_tokens) / cap if cap else 0.0

    def kv_allows(self, kv_tokens: int) -> bool:
        """Room in the KV cache for the request's prompt and expected output (an idle engine takes anything)."""
        return self.kv_capacity is None or self.load < 1 or self.kv_fill(kv_tokens) <= KV_FILL

    # ---- background ---------------------------------------------------------------------------------------
    def take_dirty(self) -> dict[int, list[int]]:
        """This replica's totals for the seconds changed since the last flush (absolute values: idempotent)."""
        out = {sec: list(self.mine.buckets[sec]) for sec in self.dirty if sec in self.mine.buckets}
        self.dirty.clear()
        return out

    def take_samples(self) -> list[Sample]:
        s, self.pending_samples = self.pending_samples, []
        return s

    def refresh(self, now: float) -> None:
        """Recompute the cached figures from the other replicas' windows plus this replica's own."""
        sec = int(now)
        self.mine.prune(sec - WINDOW_S - 10)
        self.others.prune(sec - WINDOW_S - 10)
        view = Window()
        view.merge(self.others)
        view.merge(self.mine)
        since10 = sec - RATE_WINDOW_S
        # The current second is partial: average over the complete ones plus the elapsed fraction.
        span = RATE_WINDOW_S + (now - sec)
        self.tok_s = view.sum(OUT, since10) / span
        self.rps = view.sum(REQ, since10) / span
        self.errors_per_min = view.sum(ERR, since10) * 60 / span
        self.rate_limited_per_min = view.sum(RL, since10) * 60 / span
        # A request counted in bucket s may have reached the provider up to a second later (the bucket's end)
        # plus network and clock skew: it leaves the provider's sliding window by s + 1 + 60 + EXPIRY_MARGIN_S.
        since60 = math.floor(now - WINDOW_S - 1 - EXPIRY_MARGIN_S) + 1
        self.used_req_60 = view.sum(REQ, since60)
        self.used_tok_60 = view.sum(ADM, since60)
        self.req_since_refresh = 0
        self.tok_since_refresh = 0
        self.inflight_at_refresh = self.inflight_local

    def quiet(self) -> bool:
        """Would refresh() change nothing? True for an upstream with no traffic in its window and zeroed figures:
        the sync loop skips it, so an idle fleet costs nothing per upstream per cycle."""
        return not (
            self.mine.buckets or self.others.buckets or self.req_since_refresh or self.tok_since_refresh
            or self.tok_s or self.rps or self.errors_per_min or self.rate_limited_per_min
            or self.used_req_60 or self.used_tok_60 or self.inflight_at_refresh != self.inflight_local
        )

    def refit(self, now: float) -> None:
        """Refit the curve when samples arrived since the last fit (or every REFIT_IDLE_S, as weights age): a fit
        costs a few ms per upstream, which large pools of idle upstreams should not pay every second."""
        newest = self.samples[-1].ts if self.samples else 0.0
        if newest == self._fitted_newest and now - self._fitted_at < REFIT_IDLE_S:
            return
        self._fitted_newest, self._fitted_at = newest, now
        self.curve.fit(list(self.samples), now)

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
        c = self.cfg
        ejected = health.is_ejected(self, now) if health is not None else False
        return {
            "name": self.name,
            "provider": c.provider,
            "kind": c.kind,
            "models": models,
            "weight": self.weight,
            "state": self.state(now, ejected),
            "inflight": self.inflight,
            "inflight_local": self.inflight_local,
            "external_load": round(self.external_load, 1),
            "max_concurrency": c.max_concurrency,
            "tok_s": round(self.tok_s, 1),
            "rps": round(self.rps, 2),
            "ttft_s": round(self.curve.ttft, 4),
            "decode_tok_s": round(self.decode_tok_s, 1),
            "errors_per_min": round(self.errors_per_min, 2),
            "rate_limited_per_min": round(self.rate_limited_per_min, 2),
            "ejections": health.ejections(self) if health is not None else 0,
            "success_rate": round(health.success_probability(self), 3) if health is not None else 1.0,
            "capacity": self.curve.snapshot(),
            "limits": {"rpm": c.rpm, "tpm": c.tpm, "rpm_used": self.used_req_60, "tpm_used": self.used_tok_60},
            **({"cache": self.affinity.snapshot()} if self.affinity is not None else {}),
            "price": c.price.model_dump(exclude_none=True) if c.price else None,
            "usd_per_1m_output": _round_opt(self.live_usd_per_1m(), 4),
            "spend_usd": round(cost.usd(self.spend_micros), 6),
            "kv": {"capacity_tokens": self.kv_capacity, "in_use_tokens": round(self.kv_load())},
        }


def _round_opt(v: float | None, nd: int) -> float | None:
    return None if v is None else round(v, nd)
