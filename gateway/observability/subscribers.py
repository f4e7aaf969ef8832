"""Hook subscribers for traces and metrics: what the request path tells OpenTelemetry (GenAI conventions).

Spans: a SERVER span per client request (child of the client's traceparent) and a CLIENT span per attempt (whose
context is injected as the upstream's traceparent). The routing decision (strategy, candidates and their scores,
the reason, queue wait) goes on the spans, so a trace says which upstream was chosen and why. Nothing is computed for
spans that are not recording (not sampled, or no exporter). Metrics are recorded inline: the lean instruments
(instruments.py) take a few microseconds, less than scheduling a callback for later would.
"""

from __future__ import annotations

import functools
import json
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from gateway.errors import GatewayError, Preempted
from gateway.observability import telemetry as T
from gateway.upstream import telemetry_provider_name

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.hooks import Attempt
    from gateway.state.goodput import SloVerdict

_SERVER = "tracing.server"
_CLIENT = "tracing.client"


def tracing(tel: T.Telemetry) -> Tracing | Propagation:
    """The tracing subscriber for this telemetry: spans when an exporter records them, else only the client's
    trace context passed on (one callback per attempt instead of five per request doing nothing)."""
    return Tracing(tel) if tel.tracing_enabled else Propagation(tel)


class Propagation:
    """Without an exporter no span is named or started: the upstream gets the client's traceparent (and
    tracestate), if it sent one, as the no-op tracer would pass it on."""

    def __init__(self, tel: T.Telemetry) -> None:
        self.tel = tel

    def attempt_start(self, ctx: RequestContext, a: Attempt) -> None:
        parent = self.tel.extract(ctx.headers)
        if parent is T.NO_CONTEXT:  # most requests: no traceparent
            return
        client = trace.get_current_span(parent)  # the invalid span when the traceparent was not valid
        if client.get_span_context().is_valid:
            self.tel.inject(a.headers, trace.set_span_in_context(client))


class Tracing:
    """Spans of a telemetry with an exporter (`tracing` picks Propagation otherwise)."""

    def __init__(self, tel: T.Telemetry) -> None:
        assert tel.tracing_enabled, "without an exporter use Propagation (tracing() picks it)"
        self.tel = tel

    def request_start(self, ctx: RequestContext) -> None:
        parent = self.tel.extract(ctx.headers)
        span = self.tel.tracer.start_span(f"{ctx.operation} {ctx.model}", context=parent, kind=SpanKind.SERVER)
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
            **T.request_parameter_attributes(ctx.body),
        }
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
        span.set_attribute(T.ATTR_GEN_AI_PROVIDER_NAME, telemetry_provider_name(d.upstream.cfg))
        span.set_attribute("gateway.class", ctx.service_class)
        span.set_attribute(T.ATTR_ROUTE_REASON, d.reason)
        span.set_attribute(T.ATTR_ROUTE_CANDIDATES, json.dumps({k: round(v, 3) for k, v in d.scores.items()}))
        span.set_attribute(T.ATTR_RETRY_COUNT, a.number - 1)

    def attempt_start(self, ctx: RequestContext, a: Attempt) -> None:
        server: Span = ctx.extras[_SERVER]
        parent = trace.set_span_in_context(server)
        cfg = a.upstream.cfg
        span = self.tel.tracer.start_span(f"{ctx.operation} {a.upstream_model}", context=parent, kind=SpanKind.CLIENT)
        a.extras[_CLIENT] = span
        self.tel.inject(a.headers, trace.set_span_in_context(span) if span.get_span_context().is_valid else parent)
        if span.is_recording():
            # One rule for gen_ai.request.model on every span and metric: the model the client asked for; the name
            # the upstream knows it by is gateway.upstream.model.
            span.set_attributes(T.client_span_attributes(
                operation=ctx.operation, provider=telemetry_provider_name(cfg), request_model=ctx.model,
                base_url=cfg.base_url, body=ctx.body,
            ))
            span.set_attributes({T.ATTR_UPSTREAM: a.upstream.name, "gateway.upstream.model": a.upstream_model,
                                 T.ATTR_ATTEMPT: a.number})

    def attempt_end(self, ctx: RequestContext, a: Attempt) -> None:
        span: Span | None = a.extras.get(_CLIENT)
        server: Span = ctx.extras[_SERVER]
        if span is None:
            return
        if span.is_recording() or server.is_recording():
            attrs = _outcome_attrs(ctx, a)
            span.set_attributes(attrs)
            server.set_attributes(attrs)
            if a.status:
                span.set_attribute("http.response.status_code", a.status)
            if isinstance(a.error, Preempted):  # not a failure: the request goes on as a continuation
                event: dict[str, str | int] = {"gateway.upstream": a.upstream.name,
                                               "gateway.preempted.output_chars": sum(map(len, a.outcome.text))}
                span.add_event("gateway.preempted", event)
                server.add_event("gateway.preempted", event)
            elif a.error is not None:
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
            if "cost_usd" in ctx.extras:
                span.set_attribute(T.ATTR_REQUEST_COST_USD, ctx.extras["cost_usd"])
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


def _upstream_id(a: Attempt, rid: str | None) -> str | None:
    """The id the upstream itself gave the response: Anthropic's `msg_...` (the canonical chunks carry it as
    `chatcmpl-msg_...`); None rather than an id the gateway made up."""
    if a.upstream.cfg.provider != "anthropic" or not rid:
        return rid
    rid = rid.removeprefix("chatcmpl-")
    return rid if rid.startswith("msg_") else None


def _outcome_attrs(ctx: RequestContext, a: Attempt) -> dict[str, Any]:
    out = a.outcome
    attrs = T.response_attributes(
        response_model=out.response_model, response_id=_upstream_id(a, out.response_id), finish_reasons=out.finish_reasons,
        input_tokens=out.input_tokens, output_tokens=out.output_tokens,
        ttfc_s=out.first_at - a.t0 if ctx.stream and out.first_at is not None else None,
    )
    predicted = a.extras.get("affinity_predicted")  # routing/affinity.py: what the prefix index expected
    if predicted is not None or out.cached_tokens:
        attrs["gen_ai.usage.cache_read.input_tokens"] = out.cached_tokens
        attrs["gateway.cache.predicted_tokens"] = predicted or 0
    if out.first_at and out.last_at and out.output_tokens > 1 and out.last_at > out.first_at:
        attrs[T.ATTR_OUTPUT_TOKENS_PER_SECOND] = round((out.output_tokens - 1) / (out.last_at - out.first_at), 2)
    return attrs


class Metrics:
    """One operation record per attempt that reached (or tried to reach) an upstream."""

    def __init__(self, tel: T.Telemetry) -> None:
        self.tel = tel

    def attempt_end(self, ctx: RequestContext, a: Attempt) -> None:
        out, u = a.outcome, a.upstream
        if isinstance(a.error, Preempted):
            self.tel.record_preemption(u.name)
        address = _server_address_port(u.cfg.base_url)
        self.tel.record_operation(
            operation=ctx.operation,
            request_model=ctx.model,
            response_model=out.response_model,
            provider=telemetry_provider_name(u.cfg),
            upstream=u.name,
            server_address=address[0],
            server_port=address[1],
            duration_s=time.monotonic() - a.t0,  # the attempt's own duration
            ttft_s=out.ttft if ctx.stream else None,  # time to first chunk exists for streams only
            input_tokens=out.input_tokens,
            output_tokens=out.output_tokens,
            error_type=a.error.error_type if a.error is not None else None,
        )


#: An upstream's server.address and server.port, parsed once per base URL (few: they come from the config).
_server_address_port = functools.lru_cache(maxsize=1024)(T.server_address_port)
