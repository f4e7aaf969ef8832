"""Outlier ejection with exponential backoff and half-open probing, plus Retry-After cooldowns."""

from __future__ import annotations

import logging
import time

from .stats import UpstreamStats

log = logging.getLogger("gateway.health")


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
