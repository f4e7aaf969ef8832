"""Endpoint load accounting: what is in flight on one upstream (this replica's, the other replicas', the engine's
own beyond the fleet's) and the KV-cache tokens it holds. The router plans with these figures; writers outside
this module go through its methods, so the load integral (measure.py's mean concurrency) never misses a change.
"""

from __future__ import annotations

import time

from gateway.config import UpstreamConfig
from gateway.state.rate import headroom_share, static_share

#: Share of a GPU upstream's KV-cache token capacity the router fills: the expected output is a mean, some
#: requests run longer, and past the capacity the engine preempts (recomputes) sequences.
KV_FILL = 0.92
#: From this fill on, the marginal gain is discounted (linearly to 0 at KV_FILL): the risk of preemption.
KV_RISK_FROM = 0.75


class Membership:
    """The live replicas as the last fleet sync saw them: how many, and this one's index among them (sorted ids).
    Limits are split between them; the lowest ranks get a split's remainder."""

    __slots__ = ("replicas", "rank")

    def __init__(self) -> None:
        self.replicas = 1
        self.rank = 0

    def update(self, replicas: int, rank: int) -> None:
        self.replicas, self.rank = replicas, rank


class EndpointLoad:
    """In-flight requests and KV tokens on one upstream, and the slot and KV checks the router applies to them."""

    def __init__(self, cfg: UpstreamConfig, member: Membership) -> None:
        self.cfg = cfg  # max_concurrency and kv_tokens: read live (the config is their one source)
        self.member = member
        # Exact, this replica only.
        self.inflight_local = 0
        #: In flight from this replica by service class (the router's class admission reads these).
        self.by_class: dict[str, int] = {}
        #: Requests of this replica ended here, by service class (class admission measures the interactive completion rate).
        self.done_by_class: dict[str, int] = {}
        self.remote = 0  # in flight here from the other live replicas (fleet_sync)
        self.external = 0.0  # requests the engine reports beyond what the gateways sent (engine_metrics.py)
        #: Concurrency to plan with: local + remote + external, kept current by every writer (a plain attribute
        #: because the router's scoring loop reads it for every candidate).
        self.load = 0.0
        self.inflight_at_refresh = 0  # inflight_local when the rate figures were last refreshed
        # KV-cache tokens held by this replica's in-flight requests (prompt + expected output), the engine's token
        # capacity learned from its vllm:cache_config_info (when not configured) and the KV tokens the engine
        # reports beyond the fleet's own (engine_metrics.py).
        self.kv_local = 0
        #: Of kv_local, prompt tokens counted twice or more: prefix blocks the engine holds once for several of
        #: this replica's running sequences (routing/affinity.RunningBlocks keeps it; 0 without affinity).
        self.kv_shared = 0
        self.kv_learned: int | None = None
        self.kv_external = 0.0
        # Integral of load over time, so a sample's concurrency is the mean over its interval, not a snapshot
        # (a noisy n would flatten the fitted slope: regression dilution).
        self._area = 0.0
        self._at = time.monotonic()

    # ---- writers ----------------------------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        self._area += self.load * (now - self._at)
        self._at = now

    def _sum(self) -> None:
        self.load = self.inflight_local + self.remote + self.external

    def credit(self, service_class: str, kv_tokens: int) -> None:
        self._tick()
        self.inflight_local += 1
        self.load = self.inflight_local + self.remote + self.external  # _sum() inlined: once per request
        self.kv_local += kv_tokens
        self.by_class[service_class] = self.by_class.get(service_class, 0) + 1

    def release(self, service_class: str = "", kv_tokens: int = 0) -> None:
        self._tick()
        self.inflight_local -= 1
        self.load = self.inflight_local + self.remote + self.external
        self.kv_local -= kv_tokens
        self.by_class[service_class] -= 1
        self.done_by_class[service_class] = self.done_by_class.get(service_class, 0) + 1

    def set_remote(self, v: int) -> None:
        self._tick()
        self.remote = v
        self._sum()

    def set_external(self, v: float) -> None:
        self._tick()
        self.external = v
        self._sum()

    def learn_kv(self, capacity: int | None, usage: float | None) -> None:
        """The engine's KV capacity (unless configured) and the KV tokens it holds beyond the fleet's own requests
        (other clients), which the router adds to the KV load it plans with."""
        if capacity:
            self.kv_learned = capacity
        cap = self.kv_capacity
        if usage is None or not cap:
            return
        ours = self.kv_load() - self.kv_external
        self.kv_external = max(0.0, min(1.0, usage) * cap - ours)

    def forget_engine(self) -> None:
        """The engine's page could not be read: plan with the fleet's own counts only."""
        self.set_external(0.0)
        self.kv_external = 0.0

    def mark_refresh(self) -> None:
        self.inflight_at_refresh = self.inflight_local

    # ---- readers ----------------------------------------------------------------------------------------------
    def load_area(self) -> tuple[float, float]:
        """(integral of load dt, monotonic time): the mean load between two readings is their quotient."""
        self._tick()
        return self._area, self._at

    def class_inflight(self, service_class: str) -> int:
        return self.by_class.get(service_class, 0)

    def class_done(self, service_class: str) -> int:
        return self.done_by_class.get(service_class, 0)

    def static_share(self, limit: int) -> int:
        """This replica's fixed part of `limit` (rate.static_share by this replica's rank)."""
        return static_share(limit, self.member.replicas, self.member.rank)

    def has_slot(self, limit: int | None = None) -> bool:
        """Room for one more request within max_concurrency, this replica's share of it; with a lower `limit` (a
        service class's speed limit) also within this replica's fixed share of that limit.

        max_concurrency is shared dynamically (each replica takes its part of the headroom seen at the last sync).
        A class limit is split statically by replica rank instead: a floor on per-request speed must hold exactly,
        and a fixed split cannot overshoot however stale the other replicas' figures are.
        """
        mc, m = self.cfg.max_concurrency, self.member
        if limit is not None and (limit < mc or m.replicas > 1):
            if self.load >= limit or self.inflight_local + 1 > self.static_share(limit):
                return False
        if self.load >= mc:
            return False
        grown = self.inflight_local - self.inflight_at_refresh
        return grown + 1 <= headroom_share(mc, self.inflight_at_refresh + self.remote, m.replicas, m.rank)

    @property
    def kv_capacity(self) -> int | None:
        """The engine's KV-cache capacity in tokens: configured, else learned from its metrics, else unknown."""
        return self.cfg.kv_tokens or self.kv_learned

    def kv_load(self) -> float:
        """KV tokens in use on the engine: this replica's exactly (shared prefix blocks once), the other replicas' estimated at the same
        tokens per request (only counts are shared), plus what the engine reports beyond the fleet's."""
        mine: float = self.kv_local - self.kv_shared
        if self.remote and self.inflight_local > 0:
            mine += self.remote * self.kv_local / self.inflight_local
        return mine + self.kv_external

    def kv_fill(self, kv_tokens: int) -> float:
        """Share of the KV capacity in use with this request added (0 when the capacity is unknown)."""
        cap = self.cfg.kv_tokens or self.kv_learned
        return (self.kv_load() + kv_tokens) / cap if cap else 0.0

    def kv_allows(self, kv_tokens: int) -> bool:
        """Room in the KV cache for the request's prompt and expected output (an idle engine takes anything)."""
        return (self.cfg.kv_tokens or self.kv_learned) is None or self.load < 1 or self.kv_fill(kv_tokens) <= KV_FILL
