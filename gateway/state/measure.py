"""Where a request's tok/s is measured: first/last token times, output tokens (usage when given, else counted
with tiktoken), progress samples of long streams, and the finished-request sample for the capacity fit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.errors import UpstreamRateLimited
from gateway.routing.capacity import Sample
from gateway.state.stats import UpstreamStats
from gateway.tokens import count_text

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.hooks import Attempt


@dataclass(slots=True)
class Outcome:
    """What one attempt produced, as observed while relaying it."""

    output_tokens: int = 0
    input_tokens: int | None = None
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens (priced as cached input)
    ttft: float | None = None
    first_at: float | None = None
    last_at: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    response_model: str | None = None
    response_id: str | None = None
    response_created: int | None = None
    text: list[str] = field(default_factory=list)
    # Progress samples while a stream runs: the time, text index and load integral of the last one.
    mark_at: float | None = None
    mark_text: int = 0
    mark_area: tuple[float, float] | None = None


#: A long stream reports its decode speed this often, so a server that slows down is seen before requests end.
PROGRESS_SAMPLE_EVERY = 1.0


def progress_sample(u: UpstreamStats, out: Outcome) -> None:
    """Decode speed since the last mark, at the mean load over that time (TTFT unknown: -1)."""
    since = out.mark_at or out.first_at
    assert since is not None and out.last_at is not None and out.mark_area is not None
    area = u.load_area()
    tokens = count_text("".join(out.text[out.mark_text :]))
    if tokens >= 2:
        n = mean_load(out.mark_area, area, u)
        u.record_sample(Sample(time.time(), n, (out.last_at - since) / tokens, -1.0, 0, tokens))
    out.mark_at, out.mark_text, out.mark_area = out.last_at, len(out.text), area


def mean_load(a: tuple[float, float], b: tuple[float, float], u: UpstreamStats) -> float:
    dt = b[1] - a[1]
    return (b[0] - a[0]) / dt if dt > 1e-6 else u.load


def observe_chunk(out: Outcome, c: dict) -> None:
    """Stats from one canonical chunk: first/last token time, text (for counting), usage, finish reasons."""
    usage = c.get("usage")
    if usage:
        take_usage(out, usage)
    choices = c.get("choices")
    if not choices:
        return
    if out.response_model is None:
        out.response_model = c.get("model")
        out.response_id = c.get("id")
        out.response_created = c.get("created")
    for ch in choices:
        delta = ch.get("delta") or ch
        text = delta.get("content") or delta.get("text")
        if text or delta.get("tool_calls"):
            now = time.monotonic()
            if out.first_at is None:
                out.first_at = now
            out.last_at = now
            if text:
                out.text.append(text)
        fr = ch.get("finish_reason")
        if fr:
            out.finish_reasons.append(fr)


def observe_body(out: Outcome, data: dict) -> None:
    """Stats from a whole canonical response: usage, model, finish reasons, text (for counting and capture)."""
    take_usage(out, data.get("usage"))
    out.response_model = data.get("model")
    out.response_id = data.get("id")
    for ch in data.get("choices") or ():
        if ch.get("finish_reason"):
            out.finish_reasons.append(ch["finish_reason"])
        text = (ch.get("message") or {}).get("content") if "message" in ch else ch.get("text")
        if isinstance(text, str) and text:
            out.text.append(text)


def take_usage(out: Outcome, usage: dict | None) -> None:
    if not usage:
        return
    ct = usage.get("completion_tokens")
    if isinstance(ct, int):
        out.output_tokens = ct
    pt = usage.get("prompt_tokens")
    if isinstance(pt, int):
        out.input_tokens = pt
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0:
        out.cached_tokens = cached


def finish(u: UpstreamStats, out: Outcome, *, stream: bool, prompt_tokens: int, n_mean: float, t0: float) -> int:
    """Record a finished attempt's output tokens and its sample; returns prompt + output tokens used (0: unknown)."""
    if not out.output_tokens and out.text:
        out.output_tokens = count_text("".join(out.text))
    u.record_tokens(out.output_tokens)
    used = 0
    if out.output_tokens or out.input_tokens:
        used = (out.input_tokens if out.input_tokens is not None else prompt_tokens) + out.output_tokens
    if out.first_at is None or out.output_tokens < 2:
        return used
    ttft = out.first_at - t0
    # What the engine prefilled: prefix-cache hits cost it (almost) nothing.
    prefilled = max(0, prompt_tokens - out.cached_tokens)
    if stream:
        tpot = (out.last_at - out.first_at) / (out.output_tokens - 1)  # type: ignore[operator]
    else:  # one latency only: attribute the known TTFT level, the rest is decode (if that is clear)
        ttft = u.curve.ttft_for(prefilled)
        decode = out.last_at - t0 - ttft  # type: ignore[operator]
        if decode < 0.5 * (out.last_at - t0):  # type: ignore[operator]
            return used
        tpot = decode / out.output_tokens
    out.ttft = ttft
    # A non-streamed TTFT is the curve's own level, not a measurement: it must not flatten the prefill slope.
    u.record_sample(Sample(time.time(), n_mean, tpot, ttft if stream else -1.0, prefilled, out.output_tokens))
    return used


class Measurement:
    """Hook subscriber: measures every attempt into its upstream's live figures and the request's usage.

    The load integral is read when the attempt starts and ends, so a sample's concurrency is the mean over its
    lifetime; decoding starts a fresh mark for progress samples of long streams.
    """

    def attempt_start(self, ctx: RequestContext, a: Attempt) -> None:
        a.extras["load_start"] = a.upstream.load_area()

    def first_token(self, ctx: RequestContext, a: Attempt) -> None:
        a.outcome.mark_area = a.upstream.load_area()

    def progress(self, ctx: RequestContext, a: Attempt) -> None:
        if a.outcome.mark_area is not None:
            progress_sample(a.upstream, a.outcome)

    def attempt_end(self, ctx: RequestContext, a: Attempt) -> None:
        u, out, err = a.upstream, a.outcome, a.error
        if err is not None and (err.blames_upstream or isinstance(err, UpstreamRateLimited)):
            u.record_error(isinstance(err, UpstreamRateLimited))
        start = a.extras.get("load_start")
        if start is None:  # never sent
            return
        n_mean = mean_load(start, u.load_area(), u)
        used = finish(u, out, stream=ctx.stream, prompt_tokens=ctx.est.prompt_tokens, n_mean=n_mean, t0=a.t0)
        charge = ctx.extras.pop("tpm_charge", None)
        if used:
            ctx.used_tokens = used
            if charge is not None:
                u.settle_tokens(charge[0], charge[1], used)
        if err is None or a.streamed:  # this attempt produced the response
            ctx.outcome = out
            ctx.usage.input_tokens = out.input_tokens
            ctx.usage.cached_tokens = out.cached_tokens
            ctx.usage.output_tokens = out.output_tokens
