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
from typing import NamedTuple

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
    #: TTFT samples needed before the prefill slope is fitted at all.
    MIN_TTFT_SAMPLES = 8
    #: Without a hinted prefill, the prior's scale: a prompt of this many tokens costs about the hinted TTFT.
    PRIOR_PROMPT_TOKENS = 1000.0

    __slots__ = ("a", "b", "ttft", "prefill", "samples", "fits", "_hint", "_slots", "_mean_prompt", "_shape_n", "_shape_k")

    def __init__(self, hint: CapacityHint, slots: int) -> None:
        self._hint = hint
        self._slots = max(1, slots)
        self.a = hint.a
        self.b = hint.b
        self.ttft = hint.ttft  # TTFT level at the mean prompt size seen
        self.prefill = hint.prefill  # extra TTFT seconds per prompt token (prefill), fitted when prompt sizes vary
        self._mean_prompt = float(hint.prompt_tokens)  # the prompt size whose prefills t(n) includes
        self.samples = 0
        #: Fits so far: figures derived from the curve (a class's load limit) are valid while this is unchanged.
        self.fits = 0
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
        self.fits += 1

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
        b = (sw * sxy - sx * sy) / den if den > 1e-12 else k * h.b
        b = max(0.0, self._shrunk_slope(rows, b, (sy - b * sx) / sw, den / sw, k))
        a = (sy - b * sx) / sw
        if a <= 1e-5:
            # The line would pass below zero at n=0: keep the slope's share bounded by the mean time.
            mean_t = sy / sw
            a = max(1e-5, mean_t * 0.1)
            b = max(0.0, (mean_t - a) / max(sx / sw, 1e-9))
        return a, b

    def _shrunk_slope(self, rows: list[tuple[float, Sample]], b: float, a: float, sxx: float, k: float) -> float:
        """The fitted slope shrunk towards the hint's (scaled to the data's level) by its own sampling variance.

        Samples bunched at the operating point (a KV-bound engine runs at one concurrency) with noisy t (the
        stalls of long prefills land on whoever is decoding) identify the level but not the slope: fitted slopes
        came out 5-15x the hint's on identical engines, so the curve extrapolated to n+1 broke the interactive
        class's per-request speed at loads the engine sustained, and turns left the engine holding their
        conversation. A precision-weighted mean keeps a slope the data shows (spread over n, low noise) and
        falls back to the hinted shape where it does not. A hint without a slope (b = 0) is no prior on it.
        """
        h = self._hint
        tau2 = (k * h.b) ** 2
        if tau2 <= 0 or sxx <= 1e-12 or not rows:
            return b
        ws = sum(w for w, _ in rows)
        var = sum(w * (s.tpot - a - b * s.n) ** 2 for w, s in rows) / max(1.0, ws - 2.0) / sxx
        return (b * tau2 + k * h.b * var) / (tau2 + var)

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
        pts = [(w, s) for w, s in rows if s.ttft >= 0]  # progress samples of running streams carry no TTFT
        wd = sum(w for w, _ in pts)  # data weight only: the prior says nothing about prompt sizes
        if wd <= 0:
            self.ttft = h.ttft
            return
        self._mean_prompt = sum(w * s.prompt_tokens for w, s in pts) / wd
        enough = len(pts) >= self.MIN_TTFT_SAMPLES
        self.prefill = self._prefill_slope(pts, _ttft_regression(pts) if enough else None)
        level = _robust_level(pts, self.prefill, self._mean_prompt) if enough else sum(w * s.ttft for w, s in pts) / wd
        self.ttft = (w0 * h.ttft + wd * level) / (w0 + wd)

    def _prefill_slope(self, pts: list[tuple[float, Sample]], fit: _TtftFit | None) -> float:
        """Prefill seconds per prompt token: the data's slope where it identifies one, else the hint's.

        A measured TTFT is queue wait (behind the engine's running prefills and full batch) plus the prefill of
        the tokens the engine had to compute (prompt sizes exclude cached tokens: measure.py). Under load the
        wait dominates and varies far more than the prefill, so a plain covariance of TTFT and prompt size is
        mostly noise: identical engines fitted slopes 50x apart. Here the slope is (1) fitted robustly beside
        the concurrency the request saw (the wait grows with it, and placement correlates load with prompt size:
        cache hits are short and go where the conversation is), (2) shrunk towards the hint by its own sampling
        variance against the hint's scale (a precision-weighted mean: well-identified data wins, noise does not
        move it far), (3) capped by what the fastest long-prompt TTFTs allow (a TTFT contains its prefill, so
        prefill * tokens cannot exceed it).
        """
        h = self._hint
        if fit is None or not math.isfinite(fit.var):
            p = h.prefill
        else:
            tau2 = max(h.prefill, h.ttft / self.PRIOR_PROMPT_TOKENS) ** 2
            p = (fit.slope * tau2 + h.prefill * fit.var) / (tau2 + fit.var) if tau2 + fit.var > 0 else h.prefill
        return max(0.0, min(p, _prefill_cap(pts, self._mean_prompt)))

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


class _TtftFit(NamedTuple):
    slope: float  # seconds per prefilled token
    var: float  # the slope's sampling variance (inf: prompt sizes do not vary)


def _ttft_regression(pts: list[tuple[float, Sample]]) -> _TtftFit:
    """Robust weighted least squares of TTFT on prompt tokens and concurrency. Huber reweighting as the t(n)
    line (on absolute residuals): the few requests that waited long behind others do not set the slope."""
    hub = [1.0] * len(pts)
    sw = sum(w for w, _ in pts)
    for _ in range(1 + CapacityCurve.ROBUST_ITERATIONS):
        _, p, _, var, res = _wls2([(w * k, s) for (w, s), k in zip(pts, hub)])
        scale = max(1e-3, 3.0 * sorted(abs(e) for e in res)[len(res) // 2])
        hub = [_huber(e, scale) for e in res]
        if sum(w * k for (w, _), k in zip(pts, hub)) < 0.5 * sw:
            break  # no consensus to reweight towards: keep the last fit
    return _TtftFit(p, var)


def _robust_level(pts: list[tuple[float, Sample]], prefill: float, mean_prompt: float) -> float:
    """TTFT at the mean prompt: a Huber location of every TTFT moved to the mean prompt along the prefill slope.
    A burst of long prefills queued behind each other (the first turns of many conversations at once) is a run of
    large waits the typical request does not see again; a mean would keep it in every prediction for minutes
    (and a cache hit on its own engine above a TTFT target), a robust location does not."""
    vals = [(s.ttft - prefill * (s.prompt_tokens - mean_prompt), w, 0.0) for w, s in pts]
    level = _weighted_median(vals, sum(w for _, w, _ in vals))  # the start: a median, then Huber steps
    scale = max(1e-3, 3.0 * sorted(abs(v - level) for v, _, _ in vals)[len(vals) // 2])
    for _ in range(CapacityCurve.ROBUST_ITERATIONS):
        ws = [w * _huber(v - level, scale) for v, w, _ in vals]
        if sum(ws) <= 0:
            break
        level = sum(k * v for (v, _, _), k in zip(vals, ws)) / sum(ws)
    return level


def _wls2(pts: list[tuple[float, Sample]]) -> tuple[float, float, float, float, list[float]]:
    """y = c + p*x + q*n by weighted least squares, centred (p: 0 with infinite variance when x does not vary,
    q: 0 when n does not): c, p, q, p's sampling variance (residual variance times the inverse normal matrix),
    and every point's residual."""
    sw = sum(w for w, _ in pts)
    mx = sum(w * s.prompt_tokens for w, s in pts) / sw
    mn = sum(w * s.n for w, s in pts) / sw
    my = sum(w * s.ttft for w, s in pts) / sw
    sxx = sum(w * (s.prompt_tokens - mx) ** 2 for w, s in pts)
    snn = sum(w * (s.n - mn) ** 2 for w, s in pts)
    sxn = sum(w * (s.prompt_tokens - mx) * (s.n - mn) for w, s in pts)
    sxy = sum(w * (s.prompt_tokens - mx) * (s.ttft - my) for w, s in pts)
    sny = sum(w * (s.n - mn) * (s.ttft - my) for w, s in pts)
    det = sxx * snn - sxn * sxn
    p = q = 0.0
    inv = math.inf
    if sxx / sw > 1.0 and snn / sw > 1e-3 and det > 1e-9 * sxx * snn:
        p, q, inv = (snn * sxy - sxn * sny) / det, (sxx * sny - sxn * sxy) / det, snn / det
    elif sxx / sw > 1.0:  # one concurrency: prompt size alone
        p, inv = sxy / sxx, 1.0 / sxx
    elif snn / sw > 1e-3:  # one prompt size: no slope to find
        q = sny / snn
    res = [s.ttft - my - p * (s.prompt_tokens - mx) - q * (s.n - mn) for _, s in pts]
    sigma2 = sum(w * e * e for (w, _), e in zip(pts, res)) / max(1.0, sw - 3.0)
    return my - p * mx - q * mn, p, q, sigma2 * inv if math.isfinite(inv) else math.inf, res


def _prefill_cap(pts: list[tuple[float, Sample]], mean_prompt: float) -> float:
    """Highest prefill per token the data allows: a TTFT contains its own prefill, so TTFT / prefilled tokens
    bounds it; the weighted 10th percentile over prompts of at least the mean size (and 64 tokens), robust to
    the odd mis-sized sample. No bound without such prompts."""
    lo = max(64.0, mean_prompt)
    ratios = [(s.ttft / s.prompt_tokens, w) for w, s in pts if s.prompt_tokens >= lo]
    if not ratios:
        return math.inf
    ratios.sort()
    total, acc = sum(w for _, w in ratios), 0.0
    for r, w in ratios:
        acc += w
        if acc >= 0.1 * total:
            return r
    return ratios[-1][0]
