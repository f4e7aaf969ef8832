"""Each upstream's capacity curve, learned online.

Per-sequence time per output token grows about linearly with the batch: t(n) = a + b*n, so the aggregate is
A(n) = n / (a + b*n), saturating at 1/b. A hosted API is b ~ 0 (A linear) but capped by its rate limits.
a and b are a robust weighted least-squares fit over recent samples (memory spread across concurrency buckets,
weights decaying with age), regularised towards the configured hint so a few samples at one concurrency cannot
produce a nonsense slope. Where the data says the line is wrong (speculative decoding is much faster per request
at low batch than the line through the high-batch points; KV-bound engines slow down faster near their cache
limit), a per-bucket shape factor multiplies the line: t(n) = (a + b*n) * k(n), k piecewise linear in n.
TTFT is fitted against prompt size (level + prefill seconds per prompt token), for GPU and hosted upstreams alike.
Measured t(n) already includes the batch's stalls for the prefills of the prompts it served (their mean size is
kept), so a request's prefill costs the running batch only its departure from that mean (excess_prefill).
"""

from __future__ import annotations

import bisect
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


#: Concurrency buckets (edges) for spreading the fit's memory across load levels: 1, 2, 3-5, 6-11, 12-23, ...
_EDGES = (1.5, 3.0, 6.0, 12.0, 24.0, 48.0, 96.0)


def bucket(n: float) -> int:
    return bisect.bisect_right(_EDGES, n)


class CapacityCurve:
    """t(n): a fitted line times a per-concurrency-bucket shape factor (1 where the line fits).

    Forgetting is by count *within each concurrency bucket* and by age. Under load samples arrive fast (every
    running stream reports each second) and mostly at the operating point; counting recency per bucket keeps the
    samples taken at other concurrencies, so the slope stays identified instead of being pulled back to the hint.
    A server that changes (slows down, is throttled) shows in the newest samples first: when they disagree with
    the fit by more than CHANGE, the fit falls back to plain recency (the newest ~RECENT samples overall), which
    adapts within seconds. The line is fitted robustly (one Huber reweighting), and per bucket a shape factor
    (the data's mean ratio to the line, shrunk towards 1) lets the curve follow what the measurements show where
    a straight line does not (speculative decoding: fast at low batch; KV-bound regimes).
    """

    RECENT = 80.0  # samples (per bucket; overall after a change) at which a sample's weight has decayed to 1/e
    MAX_AGE = 120.0  # seconds at which a sample's weight has decayed to 1/e
    #: Weight of the configured hint, in samples.
    PRIOR_WEIGHT = 1.0
    #: Newest samples checked against the fit, and the relative disagreement that means the server changed.
    NEWEST = 16
    CHANGE = 0.1  # a false alarm only costs what plain recency (the older scheme) costs
    #: A bucket's shape factor is shrunk towards 1 by this many samples' weight.
    SHAPE_PRIOR = 1.0
    ROBUST_ITERATIONS = 3

    __slots__ = ("a", "b", "ttft", "prefill", "samples", "_hint", "_slots", "_mean_prompt", "_shape_n", "_shape_k")

    def __init__(self, hint: CapacityHint, slots: int) -> None:
        self._hint = hint
        self._slots = max(1, slots)
        self.a = hint.a
        self.b = hint.b
        self.ttft = hint.ttft  # TTFT level at the mean prompt size seen
        self.prefill = hint.prefill  # extra TTFT seconds per prompt token (prefill), fitted when prompt sizes vary
        self._mean_prompt = float(hint.prompt_tokens)  # the prompt size whose prefills t(n) includes
        self.samples = 0
        self._shape_n: list[float] = []  # bucket centres (mean n) with a shape factor, ascending
        self._shape_k: list[float] = []

    def ttft_for(self, prompt_tokens: int) -> float:
        """Expected time to first token for a prompt of this size."""
        return max(0.0, self.ttft + self.prefill * (prompt_tokens - self._mean_prompt))

    def excess_prefill(self, prompt_tokens: int) -> float:
        """Seconds this prompt's prefill stalls the running batch beyond what t(n) already includes.

        Measured t(n) contains the stalls of the prefills that were going on: every sequence there was prefilled
        once, a prompt of the measured mean size (`_mean_prompt`). So the curve's step from t(n) to t(n+1) already
        charges one mean-sized prefill; charging the whole prefill again would count it twice and make a busy
        GPU look worse than it is at the margin (at 48 streams on a speculative H100 that alone sent work to
        servers adding half as much). Only the departure from the mean is extra: positive for a long prompt,
        negative for a short one. Before any measurement the mean is the hint's `prompt_tokens` (0: the whole
        prefill counts).
        """
        return self.prefill * (prompt_tokens - self._mean_prompt)

    def tpot(self, n: float) -> float:
        """Seconds per output token per sequence at concurrency n."""
        return (self.a + self.b * n) * self._shape(n)

    def _shape(self, n: float) -> float:
        xs = self._shape_n
        if not xs:
            return 1.0
        i = bisect.bisect_right(xs, n)
        if i == 0:
            return self._shape_k[0]
        if i == len(xs):
            return self._shape_k[-1]
        x0, x1 = xs[i - 1], xs[i]
        k0, k1 = self._shape_k[i - 1], self._shape_k[i]
        return k0 + (k1 - k0) * (n - x0) / (x1 - x0)

    def aggregate(self, n: float) -> float:
        """A(n): aggregate output tok/s at concurrency n (flat past the engine's slots)."""
        n = min(n, self._slots)
        return n / self.tpot(n) if n > 0 else 0.0

    def saturation(self) -> float:
        return self.aggregate(self._slots)

    def fit(self, samples: list[Sample], now: float) -> None:
        """Refit the line, the shape factors and the TTFT model from samples (see the class docstring)."""
        usable = sorted((s for s in samples if s.output_tokens >= 2 and s.tpot > 0), key=lambda x: x.ts, reverse=True)
        rows = self._weigh(usable, now, self.RECENT, per_bucket=True)
        self.a, self.b = self._line(rows)
        self._fit_shape(rows)
        newest = usable[: self.NEWEST]
        if len(newest) >= self.NEWEST // 2:
            drift = sorted(s.tpot / self.tpot(s.n) for s in newest)[len(newest) // 2]
            if abs(drift - 1.0) > self.CHANGE:  # the server changed: trust the newest samples
                rows = self._weigh(usable, now, self.RECENT / 4, per_bucket=False)
                self.a, self.b = self._line(rows)
                self._fit_shape(rows)
        self.samples = len(rows)
        self._fit_ttft(rows)

    def _weigh(self, usable: list[Sample], now: float, recent: float, per_bucket: bool) -> list[tuple[float, Sample]]:
        """(weight, sample), newest first: recency rank within the sample's bucket (or overall) and age."""
        rows: list[tuple[float, Sample]] = []
        ranks = [0] * (len(_EDGES) + 1)
        for s in usable:
            i = bucket(s.n) if per_bucket else 0
            w = math.exp(-ranks[i] / recent - max(0.0, now - s.ts) / self.MAX_AGE)
            ranks[i] += 1
            if w >= 1e-3:
                rows.append((w, s))
        return rows

    def _line(self, rows: list[tuple[float, Sample]]) -> tuple[float, float]:
        """Weighted least squares of tpot on n with the hint's shape as prior, made robust by iterated
        reweighting (Huber within 3 robust deviations, rejected beyond 9) so a few outliers (a stalled stream,
        a GC pause) do not tilt the line."""
        a, b = self._wls(rows)
        if len(rows) < 8:
            return a, b
        for _ in range(self.ROBUST_ITERATIONS):
            res = [s.tpot / (a + b * s.n) - 1.0 for _, s in rows]
            c = max(0.05, 3.0 * sorted(abs(e) for e in res)[len(res) // 2])
            a, b = self._wls([(w * _huber(e, c), s) for (w, s), e in zip(rows, res)])
        return a, b

    def _wls(self, rows: list[tuple[float, Sample]]) -> tuple[float, float]:
        h = self._hint
        ws = sum(w for w, _ in rows)
        # Level of the data relative to the hint: the prior is the hinted shape scaled to it (samples at one
        # concurrency cannot identify the slope, and a slower server is usually slower at every batch size).
        k = sum(w * s.tpot / (h.a + h.b * s.n) for w, s in rows) / ws if rows else 1.0
        n_hi = max(2.0, self._slots / 2)
        w0 = self.PRIOR_WEIGHT / 2
        y1, y2 = k * (h.a + h.b), k * (h.a + h.b * n_hi)
        sw, sx, sxx = 2 * w0, w0 * (1.0 + n_hi), w0 * (1.0 + n_hi * n_hi)
        sy, sxy = w0 * (y1 + y2), w0 * (y1 + n_hi * y2)
        for w, s in rows:
            sw += w
            sx += w * s.n
            sxx += w * s.n * s.n
            sy += w * s.tpot
            sxy += w * s.n * s.tpot
        den = sw * sxx - sx * sx
        b = max(0.0, (sw * sxy - sx * sy) / den if den > 1e-12 else k * h.b)
        a = (sy - b * sx) / sw
        if a <= 1e-5:
            # The line would pass below zero at n=0: keep the slope's share bounded by the mean time.
            mean_t = sy / sw
            a = max(1e-5, mean_t * 0.1)
            b = max(0.0, (mean_t - a) / max(sx / sw, 1e-9))
        return a, b

    def _fit_shape(self, rows: list[tuple[float, Sample]]) -> None:
        """Per bucket: the weighted median of the data's ratio to the line (robust to outliers, unlike the line's
        reweighting it keeps a real departure from the line), shrunk towards 1 (1 = the line fits)."""
        acc: dict[int, list[tuple[float, float, float]]] = {}
        for w, s in rows:
            acc.setdefault(bucket(s.n), []).append((s.tpot / (self.a + self.b * s.n), w, s.n))
        cells = []
        for cell in acc.values():
            total = sum(w for _, w, _ in cell)
            centre = sum(w * n for _, w, n in cell) / total
            cells.append((centre, (_weighted_median(cell, total) * total + self.SHAPE_PRIOR) / (total + self.SHAPE_PRIOR)))
        cells.sort()
        if all(abs(k - 1.0) < 0.05 for _, k in cells):
            cells = []  # the line fits: no correction (and no interpolation on the request path)
        self._shape_n = [n for n, _ in cells]
        self._shape_k = [k for _, k in cells]

    def _fit_ttft(self, rows: list[tuple[float, Sample]]) -> None:
        """TTFT against prompt size: the level (at the mean prompt) and a slope (prefill seconds per token)."""
        h = self._hint
        w0 = self.PRIOR_WEIGHT / 2
        tw, tt = w0, w0 * h.ttft
        tp = tpp = tpt = 0.0
        for w, s in rows:
            if s.ttft >= 0:  # progress samples of running streams carry no TTFT
                tw += w
                tt += w * s.ttft
                tp += w * s.prompt_tokens
                tpp += w * s.prompt_tokens * s.prompt_tokens
                tpt += w * s.prompt_tokens * s.ttft
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
            "shape": [[round(n, 1), round(k, 3)] for n, k in zip(self._shape_n, self._shape_k)],
            "samples": self.samples,
        }


def _huber(e: float, c: float) -> float:
    """Robust weight of a relative residual e at scale c: 1 inside, c/|e| beyond, 0 past 3c (a gross outlier)."""
    ae = abs(e)
    return 1.0 if ae <= c else 0.0 if ae > 3 * c else c / ae


def _weighted_median(cell: list[tuple[float, float, float]], total: float) -> float:
    """Median of (value, weight, _) rows by weight."""
    acc = 0.0
    for v, w, _ in sorted(cell):
        acc += w
        if acc >= total / 2:
            return v
    return cell[-1][0]
