"""Scrapes local inference engines' Prometheus metrics (vLLM, SGLang) for load the gateway did not send.

A GPU server may also serve other clients. Its own running+waiting counts minus what this fleet of gateways
has in flight there is external load, which the router adds to the concurrency it plans with.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp

from gateway.periodic import Periodic
from gateway.state.fleet import Fleet
from gateway.state.stats import UpstreamStats

log = logging.getLogger("gateway.sync.engine_metrics")

_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # a fraction 0..1 (the older name first seen)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')


def parse_kv(text: str) -> tuple[int | None, float | None]:
    """(KV capacity in tokens from vllm:cache_config_info's block_size x num_gpu_blocks, KV usage fraction).

    Either is None when the page does not say. Engines with several label sets (data parallel) add up.
    """
    cap: int | None = None
    usage: float | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name = m.group(1)
        if name == "vllm:cache_config_info" and m.group(2):
            labels = dict(_LABEL.findall(m.group(2)))
            try:
                cap = (cap or 0) + int(labels["block_size"]) * int(labels["num_gpu_blocks"])
            except (KeyError, ValueError):
                continue
        elif name in _KV_USAGE and usage is None:
            usage = float(m.group(3))
    return cap, usage


def parse_load(text: str) -> tuple[float, float] | None:
    """(running, waiting) summed over label sets, or None when the page has neither family."""
    running = waiting = 0.0
    seen = False
    for line in text.splitlines():
        if not line or line[0] == "#":
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


class EngineMetricsScraper:
    def __init__(self, fleet: Fleet, interval: float = 1.0) -> None:
        self.targets = [u for u in fleet.upstreams.values() if u.cfg.metrics_url]
        self.interval = interval
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
        await asyncio.gather(*(self.scrape(u) for u in self.targets))

    async def scrape(self, u: UpstreamStats) -> None:
        assert self._session is not None and u.cfg.metrics_url
        inflight = u.inflight
        try:
            async with self._session.get(u.cfg.metrics_url) as r:
                if r.status != 200:
                    return
                text = await r.text()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            u.external_load = 0.0  # unknown: plan with our own counts only
            u.kv_external = 0.0
            return
        load = parse_load(text)
        if load is not None:
            running, waiting = load
            u.external_load = max(0.0, running + waiting - inflight)
        learn_kv(u, *parse_kv(text))


def learn_kv(u: UpstreamStats, capacity: int | None, usage: float | None) -> None:
    """The engine's KV capacity (unless configured) and the KV tokens it holds beyond the fleet's own requests
    (other clients), which the router adds to the KV load it plans with."""
    if capacity:
        u.kv_learned = capacity
    cap = u.kv_capacity
    if usage is None or not cap:
        return
    ours = u.kv_load() - u.kv_external
    u.kv_external = max(0.0, min(1.0, usage) * cap - ours)
