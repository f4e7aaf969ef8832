"""Outlier ejection with exponential backoff and half-open probing; optional active health checks.

Passive: every attempt reports success or failure (connect error, timeout, 5xx, broken stream). After
`eject_after_failures` consecutive failures the upstream is ejected for base * 2^k seconds (capped); when that
passes it is half-open: exactly one request (the probe) may go, and its outcome closes or re-opens the breaker.
Retry-After cooldowns are separate (fleet_sync shares them; the router skips cooling upstreams).

Active (settings.health_check_interval > 0): a background GET of each upstream's metrics_url, or base_url +
"/models", with the upstream's own auth headers. A connect error, timeout or 5xx ejects the upstream at once
(backoff growing while it stays down); the first good answer (< 500) after that un-ejects it without waiting for
the backoff. A passing check never overrides an ejection caused by failing requests: serving /models is not
proof that completions work, so those recover through the half-open probe.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from gateway.periodic import Periodic
from gateway.state.stats import UpstreamStats
from gateway.upstream import provider_for

log = logging.getLogger("gateway.reliability.outlier")


class OutlierDetector:
    def __init__(self, after_failures: int, base_seconds: float, max_seconds: float, on_eject=None) -> None:
        self.after = after_failures
        self.base = base_seconds
        self.max = max_seconds
        self.on_eject = on_eject

    def available(self, u: UpstreamStats, now: float) -> bool:
        if u.ejected_until > now:
            return False
        # Past the ejection time but not yet proven healthy: half-open, one probe at a time.
        return not (u.consecutive_failures >= self.after and u.probing)

    def dispatched(self, u: UpstreamStats) -> None:
        if u.consecutive_failures >= self.after:
            u.probing = True

    def success(self, u: UpstreamStats) -> None:
        if u.consecutive_failures >= self.after:
            log.info("upstream %s healthy again after probe", u.name)
        u.consecutive_failures = 0
        u.probing = False

    def abandoned(self, u: UpstreamStats) -> None:
        """An attempt ended with no verdict (client left, gateway bug): let another probe go."""
        u.probing = False

    def check_failed(self, u: UpstreamStats) -> None:
        """An active health check failed: eject now."""
        u.consecutive_failures = max(u.consecutive_failures, self.after - 1)
        self.failure(u)

    def check_recovered(self, u: UpstreamStats) -> None:
        """An active health check passes again after failing: back in rotation at once."""
        log.info("upstream %s passes its health check again", u.name)
        u.consecutive_failures = 0
        u.probing = False
        u.ejected_until = 0.0

    def failure(self, u: UpstreamStats) -> None:
        u.consecutive_failures += 1
        u.probing = False
        if u.consecutive_failures >= self.after:
            k = u.consecutive_failures - self.after
            backoff = min(self.max, self.base * (2**k))
            u.ejected_until = time.time() + backoff
            u.ejections += 1
            log.warning("ejecting upstream %s for %.1fs after %d consecutive failures", u.name, backoff, u.consecutive_failures)
            if self.on_eject:
                self.on_eject(u.name)


class HealthChecker:
    """Periodic reachability checks feeding the outlier detector (see the module docstring)."""

    def __init__(self, upstreams: dict[str, UpstreamStats], detector: OutlierDetector, interval: float, timeout: float):
        self.upstreams = upstreams
        self.detector = detector
        self.timeout = timeout
        self.down: dict[str, bool] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop = Periodic("health-checks", interval, self.check_all, immediate=True)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._session:
            await self._session.close()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(u) for u in self.upstreams.values()))

    async def _check(self, u: UpstreamStats) -> None:
        ok = await self.probe(u)
        if ok:
            if self.down.pop(u.name, False):
                self.detector.check_recovered(u)
        else:
            if not self.down.get(u.name):
                log.warning("upstream %s failed its health check", u.name)
            self.down[u.name] = True
            self.detector.check_failed(u)

    async def probe(self, u: UpstreamStats) -> bool:
        cfg = u.cfg
        prov = provider_for(cfg.provider)
        url = cfg.metrics_url or prov.health_url(cfg)
        headers = prov.headers(cfg)
        headers.pop("Content-Type", None)
        assert self._session is not None
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                return resp.status < 500
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False
