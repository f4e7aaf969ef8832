"""The fleet: every upstream's live stats, and the pools (client model -> upstreams) built from config."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

from gateway.config import FleetConfig, ModelConfig
from gateway.cost import blended_usd_per_1m
from gateway.state.class_cost import ClassCost
from gateway.state.learned import SAMPLES_MAX
from gateway.state.lengths import OutputLengths
from gateway.state.rate import WINDOW_S
from gateway.state.stats import OutlierView, UpstreamStats


@dataclass
class Pool:
    model: str
    cfg: ModelConfig
    upstreams: list[UpstreamStats]
    strategy: str
    rr: int = 0  # round-robin cursor
    lengths: OutputLengths = field(default_factory=OutputLengths)  # observed output lengths (expected output)
    #: What at least one upstream of the pool serves (checked on every request: computed once).
    operations: frozenset[str] = field(init=False)
    #: The pool's engine slots (sum of max_concurrency, fixed by config): per-request rules read it, so a pool of
    #: hundreds of upstreams is not summed per request.
    slots: int = field(init=False)
    #: The slots of the upstreams without a request or token rate limit (all of them when every one has one): what
    #: takes the pool's load in proportion to slots (affinity.share_basis).
    unmetered_slots: int = field(init=False)
    #: Requests per second the pool's RPM limits allow together (config), and the requests per second its
    #: upstreams were sent in the last 10 s (refreshed each router tick, not per request).
    rpm_rps: float = field(init=False)
    request_rps: float = 0.0
    #: The longest expected output among the requests waiting in the pool's gateway queue (kept by the router as
    #: its queue changes): what a scarce request unit is taken from (router.long_output).
    waiting_output: int = 0

    def __post_init__(self) -> None:
        self.operations = frozenset().union(*(u.operations for u in self.upstreams))
        self.slots = sum(u.cfg.max_concurrency for u in self.upstreams)
        self.unmetered_slots = sum(u.cfg.max_concurrency for u in self.upstreams if not u.cfg.rate_limited) or self.slots
        self.rpm_rps = sum(u.cfg.rpm / 60.0 for u in self.upstreams if u.cfg.rpm)

    def observe_demand(self) -> None:
        self.request_rps = sum(u.rates.rps for u in self.upstreams)

    def strategy_for(self, service_class: str) -> str:
        """The routing strategy of one class's requests: the class's `prefer` (each preference is the strategy
        of the same name: throughput, cost) when set, else the pool's. Lets batch work flow to the cheapest
        tokens while interactive work keeps the pool's marginal-gain choice."""
        cls = self.cfg.classes.get(service_class)
        return cls.prefer if cls is not None and cls.prefer is not None else self.strategy


class Fleet:
    def __init__(self, config: FleetConfig, default_strategy: str) -> None:
        self.config = config
        self.upstreams: dict[str, UpstreamStats] = {n: UpstreamStats(c) for n, c in config.upstreams.items()}
        self.pools: dict[str, Pool] = {
            m: Pool(m, c, [self.upstreams[u] for u in c.upstreams], "cost" if c.prefer == "cost" else c.strategy or default_strategy)
            for m, c in config.models.items()
        }
        self._aliases = {a: m for m, c in config.models.items() for a in c.aliases}
        #: What each pool's service classes were charged (spend.charge_request books every request here).
        self.class_cost = ClassCost()
        #: Names of upstreams whose figures changed since the router last re-ranked them (routing/candidates.py);
        #: written by the router on dispatch/release and by fleet_sync when it merges new figures.
        self.changed: set[str] = set(self.upstreams)
        self.models_of: dict[str, list[str]] = {n: [] for n in self.upstreams}
        for m, c in config.models.items():
            for u in c.upstreams:
                self.models_of[u].append(m)

    def pool(self, model: str) -> Pool | None:
        p = self.pools.get(model)
        if p is None and model in self._aliases:
            p = self.pools[self._aliases[model]]
        return p

    def memory(self) -> dict:
        """What the per-upstream state holds now and what bounds it (window: WINDOW_S + 10 s of buckets for this
        replica and as many for the others; samples: the deque's maxlen). RSS is the process total."""
        buckets = [len(u.rates.mine.buckets) + len(u.rates.others.buckets) for u in self.upstreams.values()]
        samples = [len(u.learned.samples) + len(u.learned.pending) for u in self.upstreams.values()]
        maxlen = SAMPLES_MAX
        return {
            "upstreams": len(self.upstreams),
            "window_buckets": sum(buckets),
            "window_buckets_max_per_upstream": max(buckets, default=0),
            "samples": sum(samples),
            "samples_max_per_upstream": max(samples, default=0),
            "bounds_per_upstream": {"window_buckets": 2 * (WINDOW_S + 11), "samples": maxlen},
            "rss_bytes": rss_bytes(),
        }

    def cost_view(self) -> dict:
        """Live USD per 1M output tokens per model pool and for the fleet (gateway/cost.py: all spend, hourly
        servers included even when idle, over all output tokens delivered), and per pool and service class what
        its requests were charged (state/class_cost.py)."""
        pools = {m: _r(blended_usd_per_1m(u.cost_row() for u in p.upstreams)) for m, p in self.pools.items()}
        fleet = _r(blended_usd_per_1m(u.cost_row() for u in self.upstreams.values()))
        return {"fleet_usd_per_1m_output": fleet, "pools_usd_per_1m_output": pools, "classes": self.class_cost.view(),
                "classes_window_s": self.class_cost.window_s}

    def snapshot(self, health: OutlierView | None = None) -> list[dict]:
        now = time.time()
        return [u.snapshot(now, self.models_of[n], health) for n, u in self.upstreams.items()]


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)
