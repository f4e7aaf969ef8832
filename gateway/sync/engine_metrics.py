"""Scrapes local inference engines' Prometheus metrics (vLLM, SGLang) for load the gateway did not send.

A GPU server may also serve other clients. Its own running+waiting counts minus what this fleet of gateways
has in flight there is external load, which the router adds to the concurrency it plans with.

Cost per tick is bounded: up to PER_TICK servers are scraped every tick. A larger fleet scrapes every tick the
servers that are busy (gateway requests in flight or external load seen), and fills the rest of the budget with
the idle ones in rotation, so an idle server's external load is still seen within len(idle)/room ticks (300 idle
servers: ~10 s) while a replica does not parse hundreds of metrics pages a second.

vLLM's prefix-cache state feeds the KV-cache affinity index (routing/affinity.py): the KV capacity
(`vllm:cache_config_info`: num_gpu_blocks * block_size) sizes the index, and the prefix-cache counters
(`vllm:prefix_cache_queries_total` / `_hits_total`) give the engine's own hit rate beside the index's.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator

import aiohttp

from gateway.periodic import Periodic
from gateway.routing.affinity import Affinity
from gateway.state.fleet import Fleet
from gateway.state.stats import UpstreamStats

log = logging.getLogger("gateway.sync.engine_metrics")

_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_FAMILIES = _RUNNING + _WAITING
PER_TICK = 32
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_CACHE_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_CACHE_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # a fraction 0..1 (the older name first seen)


def _vllm_samples(text: str) -> Iterator[tuple[str, str, float]]:
    """(family, label text, value) of every `vllm:` sample on a metrics page."""
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = _LINE.match(line)
        if m:
            yield m.group(1), m.group(2) or "", float(m.group(3))


def _kv_capacity(labels: str) -> int | None:
    """KV-cache tokens from vllm:cache_config_info's labels: block_size x num_gpu_blocks."""
    d = dict(_LABEL.findall(labels))
    try:
        return int(d["block_size"]) * int(d["num_gpu_blocks"])
    except (KeyError, ValueError):
        return None


def parse_kv(text: str) -> tuple[int | None, float | None]:
    """(KV capacity in tokens from vllm:cache_config_info's block_size x num_gpu_blocks, KV usage fraction).

    Either is None when the page does not say. Engines with several label sets (data parallel) add up.
    """
    cap: int | None = None
    usage: float | None = None
    for name, labels, value in _vllm_samples(text):
        if name == "vllm:cache_config_info" and labels:
            c = _kv_capacity(labels)
            if c is not None:
                cap = (cap or 0) + c
        elif name in _KV_USAGE and usage is None:
            usage = value
    return cap, usage


def parse_load(text: str) -> tuple[float, float] | None:
    """(running, waiting) summed over label sets, or None when the page has neither family."""
    running = waiting = 0.0
    seen = False
    for line in text.splitlines():
        if not line.startswith(_FAMILIES):  # comments and the many other families (cheap test first)
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name = m.group(1)
        if name in _RUNNING:
            running += float(m.group(3))
            seen = True
        elif name in _WAITING:
            waiting += float(m.group(3))
            seen = True
    return (running, waiting) if seen else None


def parse_cache(text: str) -> tuple[int | None, tuple[float, float] | None]:
    """(KV capacity in tokens from cache_config_info, (prefix-cache queries, hits) counters); None where absent."""
    capacity: int | None = None
    queries = hits = 0.0
    seen = False
    for name, labels, value in _vllm_samples(text):
        if name == "vllm:cache_config_info" and labels:
            capacity = _kv_capacity(labels) or capacity
        elif name in _CACHE_QUERIES:
            queries += value
            seen = True
        elif name in _CACHE_HITS:
            hits += value
            seen = True
    return capacity, ((queries, hits) if seen else None)


class EngineMetricsScraper:
    def __init__(self, fleet: Fleet, interval: float = 1.0, per_tick: int = PER_TICK, affinity: Affinity | None = None) -> None:
        self.targets = [u for u in fleet.upstreams.values() if u.cfg.metrics_url]
        self.interval = interval
        self.per_tick = per_tick
        self._cursor = 0
        self.affinity = affinity
        self._loop = Periodic("engine-metrics", interval, self.scrape_all, immediate=True)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if not self.targets:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(0.5, self.interval)))
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._session:
            await self._session.close()

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(u) for u in self.due()))

    def due(self) -> list[UpstreamStats]:
        """This tick's servers: all of a small fleet; else the busy ones, then idle ones in rotation (<= per_tick)."""
        t = self.targets
        if len(t) <= self.per_tick:
            return t
        hot = [u for u in t if u.inflight or u.external_load]
        if len(hot) >= self.per_tick:
            return self._rotate(hot)
        return hot + self._rotate([u for u in t if not (u.inflight or u.external_load)], self.per_tick - len(hot))

    def _rotate(self, us: list[UpstreamStats], k: int | None = None) -> list[UpstreamStats]:
        k = self.per_tick if k is None else k
        start = self._cursor % len(us)
        self._cursor = start + k
        return (us[start:] + us[:start])[:k]

    async def scrape(self, u: UpstreamStats) -> None:
        assert self._session is not None and u.cfg.metrics_url
        inflight = u.inflight
        try:
            async with self._session.get(u.cfg.metrics_url) as r:
                if r.status != 200:
                    return
                text = await r.text()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            u.endpoint.forget_engine()  # unknown: plan with our own counts only
            return
        load = parse_load(text)
        if load is not None:
            running, waiting = load
            # A request dispatched while the page was fetched is counted by the engine but not in `inflight`:
            # subtract the larger of the counts before and after, so it does not show as a phantom external load.
            u.set_external_load(max(0.0, running + waiting - max(inflight, u.inflight)))
        u.endpoint.learn_kv(*parse_kv(text))
        if self.affinity is not None:
            self._cache_state(u, text)

    def _cache_state(self, u: UpstreamStats, text: str) -> None:
        assert self.affinity is not None
        ua = self.affinity.upstreams[u.name]
        capacity, counters = parse_cache(text)
        if capacity is not None:
            ua.engine_capacity(capacity)
        if counters is not None:
            ua.engine_counters(*counters)
