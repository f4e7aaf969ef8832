"""The learned capacity curve of one upstream: its measured samples and the CapacityCurve fitted to them.

Samples measured here wait in `pending` until fleet_sync writes them to Redis; the fitted set (`samples`) is the
fleet's, read back from Redis (or kept locally while Redis is away).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from gateway.config import UpstreamConfig
from gateway.routing.capacity import CapacityCurve, Sample

REFIT_IDLE_S = 10.0  # a curve without new samples is refitted this often (its samples' weights age)
SAMPLES_MAX = 400


class LearnedCurve:
    """Samples + the curve fitted to them, refitted only when there is something new to learn."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.curve = CapacityCurve(cfg.capacity, cfg.max_concurrency)
        self.pending: list[Sample] = []
        self.samples: deque[Sample] = deque(maxlen=SAMPLES_MAX)
        self.decode_tok_s = 0.0  # smoothed decode speed of the latest samples (for display)
        self._fitted_newest = -1.0  # newest sample's ts at the last refit, and when that was
        self._fitted_at = 0.0

    def record(self, s: Sample) -> None:
        self.pending.append(s)
        rate = 1.0 / s.tpot if s.tpot > 0 else 0.0
        self.decode_tok_s = rate if self.decode_tok_s == 0 else 0.8 * self.decode_tok_s + 0.2 * rate

    def take_pending(self) -> list[Sample]:
        s, self.pending = self.pending, []
        return s

    def keep(self, samples: Iterable[Sample]) -> None:
        """Fit with these too (samples taken for a flush that was not written, or without Redis)."""
        self.samples.extend(samples)

    def replace(self, samples: Iterable[Sample]) -> None:
        """The fleet's samples as read back from Redis."""
        self.samples.clear()
        self.samples.extend(samples)

    def refit(self, now: float) -> None:
        """Refit the curve when samples arrived since the last fit (or every REFIT_IDLE_S, as weights age): a fit
        costs a few ms per upstream, which large pools of idle upstreams should not pay every second."""
        newest = self.samples[-1].ts if self.samples else 0.0
        if newest == self._fitted_newest and now - self._fitted_at < REFIT_IDLE_S:
            return
        self._fitted_newest, self._fitted_at = newest, now
        self.curve.fit(list(self.samples), now)
