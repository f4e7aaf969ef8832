"""Per-request speed against the request's class targets: SLO attainment and goodput, per class, upstream and pool.

A request *meets* its class when its time to first token (as the client saw it: queueing and retries included) is
within the class's TTFT target and its decode speed ((output tokens - 1) / decode time) is at least the class's
floor. A non-streamed response has no observable first token: it meets the class when its whole latency is within
TTFT target + output tokens / floor. A request that failed, or was sent best-effort because no upstream could meet
its targets in time, misses. Goodput = output tok/s of the requests that met their targets; attainment = the share
of requests that met them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import ServiceClass
    from gateway.context import RequestContext
    from gateway.state.fleet import Fleet
    from gateway.state.measure import Outcome

WINDOW_S = 10.0  # figures are over the last this many seconds


@dataclass(slots=True)
class SloVerdict:
    service_class: str
    met: bool
    ttft_s: float | None  # client-side time to first token (streams)
    latency_s: float
    tok_s: float | None  # decode speed per request
    min_tok_s: float
    max_ttft_s: float | None
    best_effort: bool = False


def judge(ctx: RequestContext, cls: ServiceClass, out: Outcome | None, ok: bool, now: float) -> SloVerdict:
    latency = now - ctx.started
    ttft = tok_s = None
    met = ok and out is not None and not ctx.extras.get("best_effort")
    if out is not None and out.first_at is not None:
        if ctx.stream:
            ttft = out.first_at - ctx.started
            if out.output_tokens > 1 and out.last_at is not None and out.last_at > out.first_at:
                tok_s = (out.output_tokens - 1) / (out.last_at - out.first_at)
        elif latency > 0:
            tok_s = out.output_tokens / latency
    if met and ctx.stream:
        met = (cls.max_ttft_s is None or (ttft is not None and ttft <= cls.max_ttft_s)) and (
            cls.min_tok_s <= 0 or tok_s is None or tok_s >= cls.min_tok_s
        )
    elif met and out is not None:
        budget = (cls.max_ttft_s or 0.0) + (out.output_tokens / cls.min_tok_s if cls.min_tok_s > 0 else float("inf"))
        met = cls.max_ttft_s is None and cls.min_tok_s <= 0 or latency <= budget
    return SloVerdict(ctx.service_class, bool(met), ttft, latency, tok_s, cls.min_tok_s, cls.max_ttft_s,
                      bool(ctx.extras.get("best_effort")))


@dataclass(slots=True)
class _Row:
    at: float
    key: tuple[str, str, str]  # (model, class, upstream)
    met: bool
    tokens: int


class SloTracker:
    """Hook subscriber: judges every finished request and keeps the last WINDOW_S seconds of verdicts.

    Besides the rows (to expire them in order), the window's sums per (model, class, upstream) are kept up to
    date as rows come and go: a snapshot (every /metrics scrape, dashboard or `gateway top` poll) then reads a
    few sums instead of walking thousands of rows."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._rows: deque[_Row] = deque()
        self._window: dict[tuple[str, str, str], list[int]] = {}  # key -> [requests, met, tokens, good tokens]
        self.totals: dict[tuple[str, str, str, bool], list[int]] = {}  # (model, class, upstream, met) -> [n, tokens]

    def request_end(self, ctx: RequestContext, error: BaseException | None) -> None:
        pool = self.fleet.pool(ctx.model)
        if pool is None or ctx.service_class not in pool.cfg.classes or ctx.status == 499:
            return  # rejected before routing, or the client left: no verdict
        now = time.monotonic()
        out = ctx.outcome
        ctx.slo = judge(ctx, pool.cfg.classes[ctx.service_class], out, error is None, now)
        row = _Row(now, (pool.model, ctx.service_class, ctx.upstream or ""), ctx.slo.met, out.output_tokens if out is not None else 0)
        self._rows.append(row)
        self._count(row, 1)
        self._expire(now)  # bounded by the window even when no snapshot is ever taken
        tot = self.totals.setdefault((*row.key, row.met), [0, 0])
        tot[0] += 1
        tot[1] += row.tokens

    def _count(self, r: _Row, sign: int) -> None:
        w = self._window.get(r.key)
        if w is None:
            w = self._window[r.key] = [0, 0, 0, 0]
        w[0] += sign
        w[2] += sign * r.tokens
        if r.met:
            w[1] += sign
            w[3] += sign * r.tokens
        if not w[0]:
            del self._window[r.key]

    def _expire(self, now: float) -> None:
        rows = self._rows
        while rows and rows[0].at < now - WINDOW_S:
            self._count(rows.popleft(), -1)

    def snapshot(self) -> dict:
        """{"classes": {model: {class: figures}}, "upstreams": {upstream: {class: figures}}} over the window."""
        self._expire(time.monotonic())
        by_class: dict[str, dict[str, list[int]]] = {}
        by_upstream: dict[str, dict[str, list[int]]] = {}
        for (model, cls, upstream), w in self._window.items():
            for name, bucket in ((model, by_class), (upstream, by_upstream)):
                if name:
                    sums = bucket.setdefault(name, {}).setdefault(cls, [0, 0, 0, 0])
                    for i, v in enumerate(w):
                        sums[i] += v
        return {
            "window_s": WINDOW_S,
            "classes": {k: {c: _figures(*w) for c, w in v.items()} for k, v in by_class.items()},
            "upstreams": {k: {c: _figures(*w) for c, w in v.items()} for k, v in by_upstream.items()},
        }


def _figures(n: int, met: int, tokens: int, good: int) -> dict:
    return {
        "requests": n,
        "attainment": round(met / n, 4) if n else None,
        "tok_s": round(tokens / WINDOW_S, 1),
        "goodput_tok_s": round(good / WINDOW_S, 1),
    }


def perf_headers(ctx: RequestContext, out: Outcome, now: float) -> dict[str, str]:
    """What a non-streamed response tells its client about its own speed."""
    latency = now - ctx.started
    h = {"x-gateway-upstream": ctx.upstream or "", "x-gateway-class": ctx.service_class,
         "x-gateway-latency-ms": f"{latency * 1000:.1f}"}
    if out.output_tokens and latency > 0:
        h["x-gateway-output-tokens-per-second"] = f"{out.output_tokens / latency:.1f}"
    return h


def perf_comment(ctx: RequestContext, out: Outcome, now: float) -> bytes:
    """The same for a stream, as an SSE comment line before its end (every SSE parser skips comments)."""
    parts = [f"upstream={ctx.upstream or ''}", f"class={ctx.service_class}"]
    if out.first_at is not None:
        parts.append(f"ttft_ms={(out.first_at - ctx.started) * 1000:.1f}")
        if out.output_tokens > 1 and out.last_at and out.last_at > out.first_at:
            parts.append(f"tok_s={(out.output_tokens - 1) / (out.last_at - out.first_at):.1f}")
    return (": gateway " + " ".join(parts) + "\n\n").encode()
