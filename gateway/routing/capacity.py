"""Each upstream's capacity curve, learned online.

Per-sequence time per output token grows about linearly with the batch: t(n) = a + b*n, so the aggregate is
A(n) = n / (a + b*n), saturating at 1/b. A hosted API is b ~ 0 (A linear) but capped by its rate limits.
a and b are a weighted least-squares fit over recent samples (weights decay with age), regularised towards
the configured hint so a few samples at one concurrency cannot produce a nonsense slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.config import CapacityHint


@dataclass(slots=True)
class Sample:
    ts: float  # wall-clock seconds when the request finished
    n: float  # concurrency the request saw on that upstream (mean of start and end, itself included)
    tpot: float  # seconds per output token after the first
    ttft: float  # seconds to first token (-1: unknown, a progress sample of a running stream)
    prompt_tokens: int
    output_tokens: int

    def to_row(self) -> str:
        return f"{self.ts:.3f},{self.n:.2f},{self.tpot:.6f},{self.ttft:.4f},{self.prompt_tokens},{self.output_tokens}"

    @classmethod
    def from_row(cls, row: str | bytes) -> Sample:
        if isinstance(row, bytes):
            row = row.decode()
        ts, n, tpot, ttft, p, o = row.split(",")
        return cls(float(ts), float(n), float(tpot), float(ttft), int(p), int(o))


class CapacityCurve:
    #: Forgetting is by count and by age. Under load samples arrive fast (every running stream reports each
    #: second), so the newest ~RECENT samples dominate and a server that slows down is seen within seconds;
    #: when traffic is thin, memory stretches out to minutes instead of falling back to the hint.
    RECENT = 80.0  # samples at which a sample's weight has decayed to 1/e
    MAX_AGE = 120.0  # seconds at which a sample's weight has decayed to 1/e
    #: Weight of the configured hint, in samples.
    PRIOR_WEIGHT = 1.0

    __slots__ = ("a", "b", "ttft", "prefill", "samples", "_hint", "_slots", "_mean_prompt")

    def __init__(self, hint: CapacityHint, slots: int) -> None:
        self._hint = hint
        self._slots = max(1, slots)
        self.a = hint.a
        self.b = hint.b
        self.ttft = hint.ttft  # TTFT level at the mean prompt size seen
        self.prefill = hint.prefill  # extra TTFT seconds per prompt token (prefill), fitted when prompt sizes vary
        self._mean_prompt = 0.0
        self.samples = 0

    def ttft_for(self, prompt_tokens: int) -> float:
        """Expected time to first token for a prompt of this size."""
        return max(0.0, self.ttft + self.prefill * (prompt_tokens - self._mean_prompt))

    def tpot(self, n: float) -> float:
        """Seconds per output token per sequence at concurrency n."""
        return self.a + self.b * n

    def aggregate(self, n: float) -> float:
        """A(n): aggregate output tok/s at concurrency n (flat past the engine's slots)."""
        n = min(n, self._slots)
        return n / self.tpot(n) if n > 0 else 0.0

    def saturation(self) -> float:
        return self.aggregate(self._slots)

    def fit(self, samples: list[Sample], now: float) -> None:
        """Refit a, b (and the TTFT level) from samples, newest weighing most.

        The prior is the hinted curve's *shape*, scaled to the level the data shows: samples taken at one
        concurrency cannot identify the slope, and a server that slows down (throttling, a noisy neighbour)
        usually slows at every batch size alike.
        """
        h = self._hint
        rows: list[tuple[float, Sample]] = []
        for s in sorted(samples, key=lambda x: x.ts, reverse=True):
            if s.output_tokens < 2 or s.tpot <= 0:
                continue
            w = math.exp(-len(rows) / self.RECENT - max(0.0, now - s.ts) / self.MAX_AGE)
            if w < 1e-3:
                break
            rows.append((w, s))
        self.samples = len(rows)
        # Level of the data relative to the hint.
        ws = sum(w for w, _ in rows)
        k = sum(w * s.tpot / (h.a + h.b * s.n) for w, s in rows) / ws if rows else 1.0
        # Prior: two pseudo-points on the scaled hinted line.
        n_hi = max(2.0, self._slots / 2)
        w0 = self.PRIOR_WEIGHT / 2
        y1, y2 = k * (h.a + h.b), k * (h.a + h.b * n_hi)
        sw = 2 * w0
        sx = w0 * (1.0 + n_hi)
        sxx = w0 * (1.0 + n_hi * n_hi)
        sy = w0 * (y1 + y2)
        sxy = w0 * (y1 + n_hi * y2)
        # TTFT against prompt size: the level (at the mean prompt) and a slope (prefill seconds per token).
        tw = w0
        tt = w0 * h.ttft
        tp = tpp = tpt = 0.0
        for w, s in rows:
            sw += w
            sx += w * s.n
            sxx += w * s.n * s.n
            sy += w * s.tpot
            sxy += w * s.n * s.tpot
            if s.ttft >= 0:  # progress samples of running streams carry no TTFT
                tw += w
                tt += w * s.ttft
                tp += w * s.prompt_tokens
                tpp += w * s.prompt_tokens * s.prompt_tokens
                tpt += w * s.prompt_tokens * s.ttft
        den = sw * sxx - sx * sx
        b = (sw * sxy - sx * sy) / den if den > 1e-12 else k * h.b
        b = max(0.0, b)
        a = (sy - b * sx) / sw
        if a <= 1e-5:
            # The line would pass below zero at n=0: keep the slope's share bounded by the mean time.
            mean_t = sy / sw
            a = max(1e-5, mean_t * 0.1)
            b = max(0.0, (mean_t - a) / max(sx / sw, 1e-9))
        self.a, self.b = a, b
        self.ttft = tt / tw
        wd = tw - w0  # data weight only: the prior says nothing about prompt sizes
        if wd > 0:
            mp = tp / wd
            var = tpp / wd - mp * mp
            mean_t = (tt - w0 * h.ttft) / wd
            cov = tpt / wd - mp * mean_t
            # Only with a real spread of prompt sizes; shrunk towards the hint (often 0) when the spread is small.
            # Prompt sizes are the tokens the engine had to prefill (cached ones excluded: measure.py).
            k = 100.0**2
            self.prefill = max(0.0, (cov + k * h.prefill) / (var + k)) if var > 1.0 else h.prefill
            self._mean_prompt = mp

    def snapshot(self) -> dict:
        return {
            "a": round(self.a, 6),
            "b": round(self.b, 7),
            "ttft": round(self.ttft, 4),
            "prefill_ms_per_1k_tokens": round(self.prefill * 1e6, 2),
            "saturation_tok_s": round(self.saturation(), 1),
            "samples": self.samples,
        }
