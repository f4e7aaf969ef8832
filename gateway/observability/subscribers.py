"""Hook subscribers for traces and metrics: what the request path tells OpenTelemetry (GenAI conventions).

Spans: a SERVER span per client request (child of the client's traceparent) and a CLIENT span per attempt (whose
context is injected as the upstream's traceparent). The routing decision (strategy, candidates and their scores,
the reason, queue wait) goes on the spans, so a trace says which upstream was chosen and why. Nothing is computed for
spans that are not recording (not sampled, or no exporter). Metrics are recorded after the response went out, off
the request's latency path.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.errors import GatewayError
from gateway.observability import telemetry as T
from gateway.tokens import max_output_tokens

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.hooks import Attempt
    from gateway.state.goodput import SloVerdict

_SERVER = "tracing.server"
_CLIENT = "tracing.client"


class Tracing:
    def __init__(self, tel: T.Telemetry) -> None:
        self.tel = tel

    def request_start(self, ctx: RequestContext) -> None:
        span = self.tel.tracer.start_span(
            f"{ctx.operation} {ctx.model}", context=self.tel.extract(ctx.headers), kind=SpanKind.SERVER
        )
        ctx.extras[_SERVER] = span
        if not span.is_recording():
            return
        attrs: dict[str, Any] = {
            T.ATTR_GEN_AI_OPERATION_NAME: ctx.operation,
            T.ATTR_GEN_AI_REQUEST_MODEL: ctx.model,
            "http.request.method": "POST",
            "url.path": ctx.path,
            T.ATTR_GEN_AI_REQUEST_STREAM: ctx.stream,
            "gateway.request.id": ctx.request_id,
        }
        mt = max_output_tokens(ctx.body)
        if mt is not None:
            attrs[T.ATTR_GEN_AI_REQUEST_MAX_TOKENS] = mt
        span.set_attributes(attrs)
        if self.tel.capture_content and "messages" in ctx.body:
            span.set_attribute(T.ATTR_GEN_AI_INPUT_MESSAGES, T.input_messages_json(ctx.body["messages"]))

    def decision(self, ctx: RequestContext, a: Attempt) -> None:
        span: Span = ctx.extras[_SERVER]
        if not span.is_recording():  # the attributes cost more than the decision when nobody looks
            return
        d = a.decision
        if a.number == 1:
            span.set_attribute(T.ATTR_ROUTE_STRATEGY, d.strategy)
            span.set_attribute(T.ATTR_QUEUE_WAIT_MS, round(d.queue_wait * 1000, 2))
        span.set_attribute(T.ATTR_UPSTREAM, d.upstream.name)
        span.set_attribute(T.ATTR_ROUTE_REASON, d.reason)
        span.set_attribute(T.ATTR_ROUTE_CANDIDATES, json.dumps({k: round(v, 3) for k, v in d.scores.items()}))
        span.set_attribute(T.ATTR_RETRY_COUNT, a.number - 1)

    def attempt_start(self, ctx: RequestContext, a: Attempt) -> None:
        parent = trace.set_span_in_context(ctx.extras[_SERVER])
        cfg = a.upstream.cfg
        span = self.tel.tracer.start_span(f"{ctx.operation} {a.upstream_model}", context=parent, kind=SpanKind.CLIENT)
        a.extras[_CLIENT] = span
        self.tel.inject(a.headers, trace.set_span_in_context(span) if span.get_span_context().is_valid else parent)
        if span.is_recording():
            span.set_attributes({
                T.ATTR_GEN_AI_OPERATION_NAME: ctx.operation,
                T.ATTR_GEN_AI_PROVIDER_NAME: T.provider_name(cfg.provider),
                T.ATTR_GEN_AI_REQUEST_MODEL: a.upstream_model,
                T.ATTR_SERVER_ADDRESS: host(cfg.base_url),
                T.ATTR_UPSTREAM: a.upstream.name,
                T.ATTR_ATTEMPT: a.number,
            })

    def attempt_end(self, ctx: RequestContext, a: Attempt) -> None:
        span: Span | None = a.extras.get(_CLIENT)
        server: Span = ctx.extras[_SERVER]
        if span is None:
            return
        if span.is_recording() or server.is_recording():
            attrs = _outcome_attrs(a)
            span.set_attributes(attrs)
            server.set_attributes(attrs)
            if a.status:
                span.set_attribute("http.response.status_code", a.status)
            if a.error is not None:
                span.set_attribute(T.ATTR_ERROR_TYPE, a.error.error_type)
                if a.error.status != 499:
                    span.set_status(Status(StatusCode.ERROR, a.error.message))
            out = a.outcome
            if self.tel.capture_content and out.text:
                finish = out.finish_reasons[0] if out.finish_reasons else None
                server.set_attribute(T.ATTR_GEN_AI_OUTPUT_MESSAGES, T.output_messages_json("".join(out.text), finish))
        span.end()

    def request_end(self, ctx: RequestContext, error: BaseException | None) -> None:
        span: Span = ctx.extras[_SERVER]
        if span.is_recording():
            span.set_attribute("http.response.status_code", ctx.status)
            if ctx.slo is not None:
                span.set_attributes(_slo_attrs(ctx.slo))
            if isinstance(error, GatewayError):
                span.set_attribute(T.ATTR_ERROR_TYPE, str(error.status))
                span.set_status(Status(StatusCode.ERROR, error.message))
        span.end()


def _slo_attrs(v: SloVerdict) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "gateway.class": v.service_class,
        "gateway.slo.met": v.met,
        "gateway.slo.min_tok_s": v.min_tok_s,
        "gateway.slo.best_effort": v.best_effort,
    }
    if v.max_ttft_s is not None:
        attrs["gateway.slo.max_ttft_s"] = v.max_ttft_s
    if v.ttft_s is not None:
        attrs[T.ATTR_GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = round(v.ttft_s, 4)
    if v.tok_s is not None:
        attrs["gateway.request.output_tokens_per_second"] = round(v.tok_s, 2)
    return attrs


def _outcome_attrs(a: Attempt) -> dict[str, Any]:
    out = a.outcome
    attrs: dict[str, Any] = {T.ATTR_GEN_AI_USAGE_OUTPUT_TOKENS: out.output_tokens}
    if out.response_model:
        attrs[T.ATTR_GEN_AI_RESPONSE_MODEL] = out.response_model
    if out.response_id:
        attrs[T.ATTR_GEN_AI_RESPONSE_ID] = out.response_id
    if out.input_tokens is not None:
        attrs[T.ATTR_GEN_AI_USAGE_INPUT_TOKENS] = out.input_tokens
    predicted = a.extras.get("affinity_predicted")  # routing/affinity.py: what the prefix index expected
    if predicted is not None or out.cached_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = out.cached_tokens
        attrs["gateway.cache.predicted_tokens"] = predicted or 0
    if out.finish_reasons:
        attrs[T.ATTR_GEN_AI_RESPONSE_FINISH_REASONS] = out.finish_reasons
    if out.ttft is not None:
        attrs[T.ATTR_TTFT_MS] = round(out.ttft * 1000, 2)
    if out.first_at and out.last_at and out.output_tokens > 1 and out.last_at > out.first_at:
        attrs[T.ATTR_OUTPUT_TOKENS_PER_SECOND] = round((out.output_tokens - 1) / (out.last_at - out.first_at), 2)
    return attrs


class Metrics:
    """One operation record per attempt that reached (or tried to reach) an upstream."""

    def __init__(self, tel: T.Telemetry) -> None:
        self.tel = tel

    def attempt_end(self, ctx: RequestContext, a: Attempt) -> None:
        out, u = a.outcome, a.upstream
        asyncio.get_running_loop().call_soon(
            functools.partial(
                self.tel.record_operation,
                operation=ctx.operation,
                request_model=ctx.model,
                response_model=out.response_model,
                provider=T.provider_name(u.cfg.provider),
                upstream=u.name,
                server_address=host(u.cfg.base_url),
                duration_s=time.monotonic() - ctx.started,
                ttft_s=out.ttft if ctx.stream else None,  # time to first chunk exists for streams only
                input_tokens=out.input_tokens,
                output_tokens=out.output_tokens,
                error_type=a.error.error_type if a.error is not None else None,
            )
        )


@functools.lru_cache(maxsize=1024)
def host(url: str) -> str:
    return urlsplit(url).hostname or ""
