"""OpenTelemetry setup, GenAI metrics and the Prometheus text view of them.

One :class:`Telemetry` per gateway process (tests may create several: nothing here
touches the global OpenTelemetry providers).

Traces
    Exported over OTLP/HTTP (protobuf) when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set and ``OTEL_TRACES_EXPORTER`` is not
    ``none``; the exporter reads the standard ``OTEL_EXPORTER_OTLP_*`` variables
    (headers, timeout, compression) itself. With no exporter, ``self.tracer`` is a
    no-op tracer: spans cost next to nothing, and the W3C context a client sent is
    still passed on to the upstream unchanged by :meth:`Telemetry.inject`.

Metrics
    GenAI client metrics (semantic conventions v1.41.0, with their advised bucket
    boundaries) plus gateway counters, kept by the lean instruments of instruments.py
    (plain Python: the OTel SDK's record path costs several times more). ``GET /metrics``
    is rendered by prometheus_client (:meth:`Telemetry.prometheus_text`) from a custom
    collector that reads those instruments and the live fleet snapshot at scrape time:
    nothing is copied per request. Metrics are also pushed over OTLP/HTTP, through SDK
    twins of the instruments, when an OTLP endpoint is configured (``OTEL_METRICS_EXPORTER=
    none`` turns that off, as deploy/ does: Jaeger takes traces only, Prometheus scrapes
    /metrics; the period is ``OTEL_METRIC_EXPORT_INTERVAL``, default 60 s).

    Two request counters: ``gateway_requests_total{model,route,code}`` counts client
    requests with the status the client got (also those refused before routing: 400,
    401, 404, 429 ...), recorded by the HTTP layer; ``gateway_upstream_attempts_total
    {model,upstream,code}`` counts attempts on upstreams (a retried request has several).

Call ``await telemetry.shutdown()`` on exit: nothing is registered with ``atexit``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.observability.instruments import Attributes, Counter, Histogram, Spec, prom_labels

__all__ = [
    "Telemetry",
    "client_span_attributes",
    "provider_name",
    "request_parameter_attributes",
    "response_attributes",
    "server_address_port",
    "span_name",
    "status_code",
]

# --------------------------------------------------------------------------------------
# Attribute names. GenAI semantic conventions v1.41.0 (+ the stable server.* / error.*).
# --------------------------------------------------------------------------------------
ATTR_GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
ATTR_GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
ATTR_GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
ATTR_GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
ATTR_GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
ATTR_GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
ATTR_GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
ATTR_GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
ATTR_GEN_AI_REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
ATTR_GEN_AI_REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
ATTR_GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
ATTR_GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
#: bool; in the v1.41 registry (``gen_ai.request.stream``).
ATTR_GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
ATTR_GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
ATTR_GEN_AI_RESPONSE_ID = "gen_ai.response.id"
#: string[] (one reason per choice).
ATTR_GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
#: double, seconds; span-level twin of the time_to_first_chunk metric.
ATTR_GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
ATTR_GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
ATTR_GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
#: Opt-in content capture (only when ``Telemetry.capture_content``).
ATTR_GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
ATTR_GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
ATTR_SERVER_ADDRESS = "server.address"
ATTR_SERVER_PORT = "server.port"
ATTR_ERROR_TYPE = "error.type"

# Gateway-specific span attributes.
ATTR_UPSTREAM = "gateway.upstream.name"
ATTR_ROUTE_STRATEGY = "gateway.route.strategy"
ATTR_ROUTE_REASON = "gateway.route.reason"
#: JSON string ``{"upstream": score, ...}``.
ATTR_ROUTE_CANDIDATES = "gateway.route.candidates"
ATTR_QUEUE_WAIT_MS = "gateway.queue.wait_ms"
ATTR_RETRY_COUNT = "gateway.retry.count"
ATTR_ATTEMPT = "gateway.attempt"
ATTR_OUTPUT_TOKENS_PER_SECOND = "gateway.output_tokens_per_second"
ATTR_REQUEST_COST_USD = "gateway.request.cost_usd"  # what the request cost (gateway/cost.py)

TOKEN_TYPE_INPUT = "input"
TOKEN_TYPE_OUTPUT = "output"
_INPUT_TOKENS: Attributes = ((ATTR_GEN_AI_TOKEN_TYPE, TOKEN_TYPE_INPUT),)
_OUTPUT_TOKENS: Attributes = ((ATTR_GEN_AI_TOKEN_TYPE, TOKEN_TYPE_OUTPUT),)

# Bucket boundaries advised by the GenAI semconv.
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
TTFC_BUCKETS: tuple[float, ...] = DURATION_BUCKETS
TOKEN_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)

# The instruments (OTel names; the Prometheus names derive from name and unit: instruments.prom_name).
DURATION = Spec("gen_ai.client.operation.duration", "s", "GenAI operation duration.", DURATION_BUCKETS)
TOKEN_USAGE = Spec("gen_ai.client.token.usage", "{token}", "Number of input and output tokens used.", TOKEN_BUCKETS)
TIME_TO_FIRST_CHUNK = Spec(
    "gen_ai.client.operation.time_to_first_chunk", "s",
    "Time to receive the first chunk, measured from when the client issues the "
    "generation request to when the first chunk is received in the response stream.",
    TTFC_BUCKETS,
)
REQUESTS = Spec("gateway.requests", "{request}",
                "Client requests answered by the gateway, by model, route and the HTTP status the client got.")
ATTEMPTS = Spec("gateway.upstream.attempts", "{attempt}",
                "Attempts on upstreams, by model, upstream and HTTP status (a retried request has several).")
EJECTIONS = Spec("gateway.ejections", "{ejection}", "Upstream ejections decided by this replica.")
PREEMPTIONS = Spec("gateway.preemptions", "{preemption}", "Attempts preempted for a request of a class with targets (resumed), by upstream.")
BATCH_LINES = Spec("gateway.batch.lines", "{line}", "Batch lines given their final result, by outcome.")


def input_messages_json(messages: Any) -> str:
    """OpenAI chat messages in the GenAI semconv shape of gen_ai.input.messages (role + typed parts)."""
    out = []
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict):
            continue
        parts: list[dict[str, Any]] = []
        c = m.get("content")
        if isinstance(c, str):
            parts.append({"type": "text", "content": c})
        elif isinstance(c, list):
            for p in c:
                if isinstance(p, dict) and p.get("type") == "text":
                    parts.append({"type": "text", "content": p.get("text", "")})
                elif isinstance(p, dict):
                    parts.append({"type": str(p.get("type", "unknown"))})
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {}
            parts.append({"type": "tool_call", "id": call.get("id"), "name": fn.get("name"), "arguments": fn.get("arguments")})
        if m.get("role") == "tool":
            parts = [{"type": "tool_call_response", "id": m.get("tool_call_id"), "response": c}]
        out.append({"role": m.get("role"), "parts": parts})
    return json.dumps(out)


def output_messages_json(text: str, finish_reason: str | None) -> str:
    """The assistant's streamed/returned text as gen_ai.output.messages."""
    msg = {"role": "assistant", "parts": [{"type": "text", "content": text}], "finish_reason": finish_reason or "stop"}
    return json.dumps([msg])


@functools.lru_cache(maxsize=256)  # a handful of kinds, looked up on every attempt
def provider_name(kind: str) -> str:
    """Map a fleet provider kind ("openai", "azure", "anthropic") to ``gen_ai.provider.name``, from the
    provider registry (gateway.upstream). Values that already are semconv values pass through; unknown ones
    (an ``engine`` such as "vllm") are returned lower-cased: the semconv allows custom values.
    """
    from gateway.upstream import PROVIDERS  # late: keeps this module importable without the adapters

    k = (kind or "").strip().lower()
    for p in PROVIDERS.values():
        if k == p.kind or k in p.aliases:
            return p.telemetry_name
    return k or PROVIDERS["openai"].telemetry_name


@functools.lru_cache(maxsize=1024)  # per upstream URL: parsed once, not on every attempt
def server_address_port(base_url: str) -> tuple[str, int]:
    """``server.address`` and ``server.port`` of an upstream URL (the port defaults by scheme, as the
    convention asks for the port the client connected to)."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


def _operation_attrs(
    operation: str, provider: str, request_model: str, response_model: str | None, server_address: str | None,
    server_port: int | None,
) -> Attributes:
    """The attribute set of one upstream operation's series (made once per distinct set: Telemetry._operation_attrs)."""
    attrs: Attributes = ((ATTR_GEN_AI_OPERATION_NAME, operation), (ATTR_GEN_AI_PROVIDER_NAME, provider_name(provider)))
    if request_model:
        attrs += ((ATTR_GEN_AI_REQUEST_MODEL, request_model),)
    if response_model:
        attrs += ((ATTR_GEN_AI_RESPONSE_MODEL, response_model),)
    if server_address:
        attrs += ((ATTR_SERVER_ADDRESS, server_address),)
        if server_port is not None:
            attrs += ((ATTR_SERVER_PORT, int(server_port)),)
    return attrs


_STATUS_WORDS = {"rate_limited": 429, "client_disconnected": 499, "preempted": 503}


def status_code(error_type: str | None) -> int:
    """HTTP status behind an ``error.type`` value (the ``code`` label): None -> 200, "429" -> 429,
    "upstream_503" -> 503, "rate_limited" -> 429, "*timeout*" -> 504, other upstream failures -> 502."""
    if not error_type:
        return 200
    e = str(error_type)
    if e.isdigit():
        return int(e)
    m = re.search(r"(\d{3})$", e)
    if m:
        return int(m.group(1))
    if e in _STATUS_WORDS:
        return _STATUS_WORDS[e]
    return 504 if "timeout" in e else 502


_REQUEST_PARAMS: tuple[tuple[str, str], ...] = (
    ("temperature", ATTR_GEN_AI_REQUEST_TEMPERATURE),
    ("top_p", ATTR_GEN_AI_REQUEST_TOP_P),
    ("top_k", ATTR_GEN_AI_REQUEST_TOP_K),
    ("seed", ATTR_GEN_AI_REQUEST_SEED),
    ("frequency_penalty", ATTR_GEN_AI_REQUEST_FREQUENCY_PENALTY),
    ("presence_penalty", ATTR_GEN_AI_REQUEST_PRESENCE_PENALTY),
)


def request_parameter_attributes(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``gen_ai.request.*`` attributes of a canonical (OpenAI-shaped) body: only the values the client set,
    with the types the convention asks for (numbers, int seed, string[] stop sequences, bool stream)."""
    out: dict[str, Any] = {}
    for key, attr in _REQUEST_PARAMS:
        v = body.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[attr] = int(v) if key in ("seed", "top_k") else float(v)
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(mt, int) and not isinstance(mt, bool):
        out[ATTR_GEN_AI_REQUEST_MAX_TOKENS] = mt
    stop = body.get("stop")
    if isinstance(stop, str):
        out[ATTR_GEN_AI_REQUEST_STOP_SEQUENCES] = [stop]
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        out[ATTR_GEN_AI_REQUEST_STOP_SEQUENCES] = list(stop)
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n != 1:
        out[ATTR_GEN_AI_REQUEST_CHOICE_COUNT] = n
    out[ATTR_GEN_AI_REQUEST_STREAM] = bool(body.get("stream"))
    return out


def client_span_attributes(
    *, operation: str, provider: str, request_model: str, base_url: str, body: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Everything a CLIENT (per-attempt) span gets at its start: operation, provider name (pass the upstream's
    :func:`gateway.upstream.telemetry_provider_name`), the model sent upstream, server.address/port and the
    request parameters. The SERVER span gets the same provider name and request parameters."""
    host, port = server_address_port(base_url)
    attrs: dict[str, Any] = {
        ATTR_GEN_AI_OPERATION_NAME: operation,
        ATTR_GEN_AI_PROVIDER_NAME: provider_name(provider),
        ATTR_GEN_AI_REQUEST_MODEL: request_model,
        ATTR_SERVER_ADDRESS: host,
        ATTR_SERVER_PORT: port,
    }
    if body is not None:
        attrs.update(request_parameter_attributes(body))
    return attrs


def response_attributes(
    *,
    response_model: str | None,
    response_id: str | None,
    finish_reasons: list[str] | None,
    input_tokens: int | None,
    output_tokens: int | None,
    ttfc_s: float | None,
) -> dict[str, Any]:
    """Span attributes of a finished response. Pass only what the upstream really returned: no synthesized
    response id, the upstream's model name (not the client's alias). ``ttfc_s`` is the convention's
    ``gen_ai.response.time_to_first_chunk`` in seconds (streams only)."""
    attrs: dict[str, Any] = {}
    if response_model:
        attrs[ATTR_GEN_AI_RESPONSE_MODEL] = response_model
    if response_id:
        attrs[ATTR_GEN_AI_RESPONSE_ID] = response_id
    if finish_reasons:
        attrs[ATTR_GEN_AI_RESPONSE_FINISH_REASONS] = list(finish_reasons)
    if input_tokens is not None:
        attrs[ATTR_GEN_AI_USAGE_INPUT_TOKENS] = int(input_tokens)
    if output_tokens is not None:
        attrs[ATTR_GEN_AI_USAGE_OUTPUT_TOKENS] = int(output_tokens)
    if ttfc_s is not None:
        attrs[ATTR_GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = round(float(ttfc_s), 6)
    return attrs


def span_name(operation: str, request_model: str | None) -> str:
    """Span name the GenAI semconv asks for: ``"{operation} {model}"``."""
    return f"{operation} {request_model}" if request_model else operation


# --------------------------------------------------------------------------------------
# Propagation
# --------------------------------------------------------------------------------------
_CI_HEADERS = (CIMultiDict, CIMultiDictProxy)


class _CaseInsensitiveGetter(Getter[Mapping[str, str]]):
    """Header getter that works for plain dicts (any case) and multidicts alike."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None and not isinstance(carrier, _CI_HEADERS):  # a multidict's get() already ignores case
            lk = key.lower()
            for k in carrier.keys():
                if isinstance(k, str) and k.lower() == lk:
                    value = carrier[k]
                    break
        if value is None:
            return None
        return [value] if isinstance(value, str) else list(value)

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _CaseInsensitiveGetter()
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACEPARENT = "traceparent"  # W3C Trace Context: without it there is no parent to continue
#: What `Telemetry.extract` returns for headers without a traceparent (compare by identity: nothing to continue).
NO_CONTEXT = Context()


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _env_flag(name: str) -> bool:
    return _env(name).lower() in ("1", "true", "yes", "on")


def _otlp_metrics_wanted() -> bool:
    """OTLP metric push follows the standard variables (``OTEL_METRICS_EXPORTER`` defaults to otlp). A trace-only
    backend such as Jaeger rejects metrics: deployments that point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at one set
    ``OTEL_METRICS_EXPORTER=none`` and let Prometheus scrape /metrics (see deploy/)."""
    if _env("OTEL_METRICS_EXPORTER").lower() == "none":
        return False
    return bool(_env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


def _histogram(spec: Spec, meter: Meter | None) -> Histogram:
    """A lean histogram, with its SDK twin when metrics are pushed over OTLP (``meter`` given)."""
    if meter is None:
        return Histogram(spec)
    return Histogram(spec, meter.create_histogram(spec.name, unit=spec.unit, description=spec.description,
                                                  explicit_bucket_boundaries_advisory=list(spec.buckets)))


# --------------------------------------------------------------------------------------
# Telemetry
# --------------------------------------------------------------------------------------
class Telemetry:
    """Tracer + GenAI metrics for the gateway. See the module docstring."""

    def __init__(
        self,
        service_name: str = "llm-gateway",
        *,
        capture_content: bool = False,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.service_name = _env("OTEL_SERVICE_NAME") or service_name
        #: Opt-in recording of prompts/completions on spans. Also switched on by
        #: OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.
        self.capture_content = bool(capture_content) or _env_flag(
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
        )
        # Resource.create() also merges OTEL_RESOURCE_ATTRIBUTES.
        self.resource = Resource.create({"service.name": self.service_name})
        self._shutdown_done = False

        self._init_tracing(span_exporter)
        self._init_metrics()

    def _init_tracing(self, span_exporter: SpanExporter | None) -> None:
        otlp_traces = bool(
            _env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        ) and _env("OTEL_TRACES_EXPORTER").lower() != "none"
        exporter = span_exporter
        if exporter is None and otlp_traces:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        self.tracer_provider: TracerProvider | None = None
        if exporter is not None:
            self.tracer_provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
            delay = None if _env("OTEL_BSP_SCHEDULE_DELAY") else 200
            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(exporter, schedule_delay_millis=delay)
            )
            self.tracer: trace.Tracer = self.tracer_provider.get_tracer("gateway")
        else:
            # Non-recording: returns the parent's span (so context passes through) or
            # INVALID_SPAN; no ids generated, no attributes stored.
            self.tracer = trace.NoOpTracer()
        #: True when spans are recorded and exported.
        self.tracing_enabled = self.tracer_provider is not None

    def _init_metrics(self) -> None:
        """The lean instruments (instruments.py) always; the SDK's MeterProvider, with SDK twins of the
        instruments, only when metrics are pushed over OTLP: /metrics is rendered from the lean ones."""
        #: True when metrics are also pushed over OTLP (besides the /metrics scrape).
        self.otlp_metrics = _otlp_metrics_wanted()
        self.meter_provider: MeterProvider | None = None
        meter = self._otlp_meter() if self.otlp_metrics else None
        self._duration, self._tokens, self._ttfc = (_histogram(s, meter) for s in (DURATION, TOKEN_USAGE, TIME_TO_FIRST_CHUNK))
        #: Attribute sets of record_operation by its label values, made once each: (attrs, with token type input,
        #: with token type output). As many entries as the histograms have series.
        self._operation_attrs: dict[tuple, tuple[Attributes, Attributes, Attributes]] = {}
        self._requests = Counter(REQUESTS, ("model", "route", "code"))
        self._attempts = Counter(ATTEMPTS, ("model", "upstream", "code"))
        self._ejections = Counter(EJECTIONS, ("upstream",))
        self._batch_lines = Counter(BATCH_LINES, ("outcome",))
        self._preemptions = Counter(PREEMPTIONS, ("upstream",))
        counters = (self._requests, self._attempts, self._ejections, self._batch_lines, self._preemptions)
        #: In /metrics order.
        self._instruments: tuple[Histogram | Counter, ...] = (self._duration, self._tokens, self._ttfc, *counters)
        if meter is not None:
            for c in counters:
                meter.create_observable_counter(c.spec.name, callbacks=[c.observe], unit=c.spec.unit,
                                                description=c.spec.description)

    def _otlp_meter(self) -> Meter:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        # Without tracing there is never a sampled span, so the default trace-based exemplar filter keeps nothing,
        # yet it is consulted on every record (~20% of a histogram record's CPU): switched off then.
        self.meter_provider = MeterProvider(
            resource=self.resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())],
            shutdown_on_exit=False, exemplar_filter=None if self.tracing_enabled else AlwaysOffExemplarFilter(),
        )
        return self.meter_provider.get_meter("gateway")

    # ---- propagation ------------------------------------------------------------------
    def extract(self, headers: Mapping[str, str]) -> Context:
        """Context from the client's W3C ``traceparent``/``tracestate`` headers (most requests have none: then the
        empty context at once, as the propagator would return it)."""
        if _GETTER.get(headers, _TRACEPARENT) is None:
            return NO_CONTEXT
        return _PROPAGATOR.extract(headers, getter=_GETTER)

    def inject(self, headers: dict[str, str], context: Context | None = None) -> None:
        """Write ``traceparent`` (and ``tracestate``) for the current (or given) context."""
        _PROPAGATOR.inject(headers, context=context)

    # ---- metrics --------------------------------------------------------------------
    def record_operation(
        self,
        *,
        operation: str,
        request_model: str,
        response_model: str | None,
        provider: str,
        upstream: str,
        server_address: str | None,
        duration_s: float,
        ttft_s: float | None,
        input_tokens: int | None,
        output_tokens: int | None,
        error_type: str | None,
        code: int | str | None = None,
        server_port: int | None = None,
    ) -> None:
        """Record one finished upstream attempt (call once per attempt; the HTTP layer counts requests).

        * ``provider``: a semconv ``gen_ai.provider.name`` value (use :func:`provider_name`);
          a raw kind is mapped too.
        * ``ttft_s``: only for streaming calls (the semconv says not to report
          time_to_first_chunk otherwise): pass None for non-streaming ones.
        * ``input_tokens``/``output_tokens``: None when unknown (not recorded).
        * ``error_type``: the ``error.type`` value when the operation failed, e.g.
          ``"timeout"``, ``"429"``, ``"500"``, an exception class name; None on success.
        * ``code``: the attempt's HTTP status, the ``code`` label of
          ``gateway_upstream_attempts_total``. Default: :func:`status_code` of ``error_type``.
        * ``duration_s``: from the attempt's start (not the client request's).
        """
        key = (operation, provider, request_model, response_model, server_address, server_port)
        sets = self._operation_attrs.get(key)
        if sets is None:
            attrs = _operation_attrs(*key)
            sets = self._operation_attrs[key] = (attrs, attrs + _INPUT_TOKENS, attrs + _OUTPUT_TOKENS)
        attrs = sets[0]
        duration_attrs = attrs + ((ATTR_ERROR_TYPE, str(error_type)),) if error_type else attrs
        self._duration.record(max(0.0, float(duration_s)), duration_attrs)
        if ttft_s is not None:
            self._ttfc.record(max(0.0, float(ttft_s)), attrs)
        if input_tokens is not None:
            self._tokens.record(int(input_tokens), sets[1])
        if output_tokens is not None:
            self._tokens.record(int(output_tokens), sets[2])
        status = code if code is not None else status_code(error_type)
        self._attempts.add((request_model or "", upstream or "", str(status)))

    def record_request(self, *, route: str, model: str, code: int) -> None:
        """Count one client request with the status it got (``gateway_requests_total{model,route,code}``).

        Called once per request by the HTTP layer, also for requests refused before routing. ``route`` is the
        matched route pattern (bounded), ``model`` a configured model name or "" (never the client's raw
        string: an unknown model must not create a new series)."""
        self._requests.add((model, route, str(code)))

    def record_ejection(self, upstream: str) -> None:
        """Count one ejection of ``upstream`` (``gateway_ejections_total{upstream}``)."""
        self._ejections.add((upstream,))

    def record_preemption(self, upstream: str) -> None:
        """Count one attempt preempted on ``upstream`` (``gateway_preemptions_total{upstream}``)."""
        self._preemptions.add((upstream,))

    def record_batch_line(self, ok: bool) -> None:
        """Count one batch line given its final result (``gateway_batch_lines_total{outcome}``)."""
        self._batch_lines.add(("completed" if ok else "failed",))

    # ---- Prometheus ---------------------------------------------------------------------
    def prometheus_text(self, snapshot: Mapping[str, Any] | None = None) -> str:
        """Prometheus text exposition of the instruments and the live fleet snapshot, rendered by
        prometheus_client; serve it with ``prometheus_client.CONTENT_TYPE_LATEST``."""
        families = [f for f in (i.family() for i in self._instruments) if f is not None]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(families, self.resource, snapshot or {}))
        return generate_latest(registry).decode()

    def cost_text(self, snapshot: Mapping[str, Any], key_spend: Iterable[tuple[str, str, float, float]]) -> str:
        """Cost gauges: $/1M output tokens per upstream, pool, fleet and service class (with each class's spend);
        spend per gateway key (id, name, today, this month, as this replica knows it). Rendered apart from prometheus_text: key spend is admin data the
        fleet snapshot does not carry."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_CostCollector(snapshot, list(key_spend)))
        return generate_latest(registry).decode()

    # ---- lifecycle ----------------------------------------------------------------------
    async def force_flush(self, timeout_s: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._flush_sync, timeout_s)

    def _flush_sync(self, timeout_s: float) -> None:
        ms = int(timeout_s * 1000)
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(ms)
        if self.meter_provider is not None:
            self.meter_provider.force_flush(ms)

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush and shut down the providers in a worker thread (idempotent)."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._shutdown_sync, timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s + 2.0)
        except asyncio.TimeoutError:
            pass

    def _shutdown_sync(self, timeout_s: float) -> None:
        ms = int(timeout_s * 1000)
        if self.tracer_provider is not None:
            try:
                self.tracer_provider.force_flush(ms)
            finally:
                self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown(timeout_millis=ms)




# --------------------------------------------------------------------------------------
# Prometheus exposition: a prometheus_client collector over the SDK instruments and the
# live fleet snapshot (formatting, escaping and the content type are prometheus_client's).
# --------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    if v is None or isinstance(v, str):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


_UPSTREAM_GAUGES: tuple[tuple[str, str, str], ...] = (
    # (family, help, snapshot key)
    ("gateway_upstream_tokens_per_second", "Delivered output tokens per second (recent window).", "tok_s"),
    ("gateway_upstream_decode_tokens_per_second", "Per-stream decode speed after the first token.", "decode_tok_s"),
    ("gateway_upstream_requests_per_second", "Requests per second (recent window).", "rps"),
    ("gateway_upstream_inflight", "Requests in flight on the upstream, fleet-wide.", "inflight"),
    ("gateway_upstream_inflight_local", "Requests in flight on the upstream from this replica.", "inflight_local"),
    ("gateway_upstream_max_concurrency", "Configured concurrency limit of the upstream.", "max_concurrency"),
    ("gateway_upstream_ttft_seconds", "Recent time to first token.", "ttft_s"),
    ("gateway_upstream_errors_per_minute", "Upstream errors per minute (recent window).", "errors_per_min"),
    ("gateway_upstream_rate_limited_per_minute", "Upstream 429 responses per minute (recent window).", "rate_limited_per_min"),
    ("gateway_upstream_weight", "Routing weight of the upstream.", "weight"),
)
_STATES = ("healthy", "ejected", "cooldown", "draining")


def _upstream_families(ups: list[Mapping[str, Any]]) -> Iterator[Metric]:
    for fam_name, help_, key in _UPSTREAM_GAUGES:
        fam = GaugeMetricFamily(fam_name, help_, labels=["upstream"])
        for u in ups:
            if (v := _num(u.get(key))) is not None:
                fam.add_metric([u["name"]], v)
        yield fam
    cap = GaugeMetricFamily(
        "gateway_upstream_capacity_tokens_per_second",
        "Estimated saturation throughput of the upstream (learned capacity model).", labels=["upstream"],
    )
    ejected = GaugeMetricFamily("gateway_upstream_ejected", "1 when the upstream is ejected.", labels=["upstream"])
    state = GaugeMetricFamily(
        "gateway_upstream_state", "Upstream state (one series per state, 1 for the current one).", labels=["upstream", "state"]
    )
    ejections = Metric("gateway_upstream_ejections", "Ejections of the upstream, fleet-wide.", "counter")
    for u in ups:
        curve = u.get("capacity")
        if isinstance(curve, Mapping) and (v := _num(curve.get("saturation_tok_s"))) is not None:
            cap.add_metric([u["name"]], v)
        current = str(u.get("state") or "")
        ejected.add_metric([u["name"]], 1.0 if current == "ejected" else 0.0)
        for s in _STATES if current in _STATES or not current else (*_STATES, current):
            state.add_metric([u["name"], s], 1.0 if s == current else 0.0)
        if (v := _num(u.get("ejections"))) is not None:
            ejections.add_sample("gateway_upstream_ejections_total", {"upstream": str(u["name"])}, v)
    yield from (cap, ejected, state, ejections)
    yield from _limit_families(ups)
    yield from _cache_families(ups)


#: KV-cache affinity figures per upstream (routing/affinity.py, the snapshot's "cache" object), this replica's.
_CACHE_SERIES = (
    ("gateway_upstream_prefix_cache_hit_ratio", "gauge", "Prompt tokens the upstream reported cached / prompt tokens.", "hit_rate"),
    ("gateway_upstream_prefix_cached_tokens", "counter", "Prompt tokens the upstream reported cached.", "cached_tokens"),
    ("gateway_upstream_prefix_predicted_tokens", "counter", "Prompt tokens the prefix index predicted cached.", "predicted_tokens"),
    ("gateway_upstream_engine_prefix_cache_hit_ratio", "gauge", "The engine's own prefix-cache hit rate (vLLM metrics).", "engine_hit_rate"),
)


def _cache_families(ups: list[Mapping[str, Any]]) -> Iterator[Metric]:
    for name, kind, help_, key in _CACHE_SERIES:
        fam = Metric(name, help_, kind)
        for u in ups:
            cache = u.get("cache")
            if isinstance(cache, Mapping) and (v := _num(cache.get(key))) is not None:
                fam.add_sample(name + ("_total" if kind == "counter" else ""), {"upstream": str(u["name"])}, v)
        yield fam


def _limit_families(ups: list[Mapping[str, Any]]) -> Iterator[Metric]:
    used = GaugeMetricFamily(
        "gateway_upstream_rate_limit_used", "Requests (rpm) or tokens (tpm) used in the current minute.", labels=["upstream", "kind"]
    )
    limit = GaugeMetricFamily("gateway_upstream_rate_limit", "Configured per-minute rate limit (rpm or tpm).", labels=["upstream", "kind"])
    for u in ups:
        limits = u.get("limits")
        if not isinstance(limits, Mapping):
            continue
        for kind in ("rpm", "tpm"):
            if (v := _num(limits.get(f"{kind}_used"))) is not None:
                used.add_metric([u["name"], kind], v)
            if (v := _num(limits.get(kind))) is not None:
                limit.add_metric([u["name"], kind], v)
    yield from (used, limit)


def _process_families(snap: Mapping[str, Any]) -> Iterator[Metric]:
    qd = snap.get("queue_depth")
    fam = GaugeMetricFamily("gateway_queue_depth", "Requests waiting in the admission queue, by model.", labels=["model"])
    for model, depth in (qd.items() if isinstance(qd, Mapping) else ()):
        if (v := _num(depth)) is not None:
            fam.add_metric([str(model)], v)
    yield fam
    redis = snap.get("redis")
    if redis is not None:
        yield GaugeMetricFamily(
            "gateway_redis_up", "1 when the shared Redis state store is reachable (0 when degraded or disabled).",
            value=1.0 if redis == "ok" else 0.0,
        )
    if replica := snap.get("replica"):
        info = GaugeMetricFamily("gateway_replica_info", "Replica identity.", labels=["replica", "redis"])
        info.add_metric([str(replica), str(redis)], 1.0)
        yield info


def _slo_families(slo: Mapping[str, Any]) -> Iterator[Metric]:
    """Per service class, per pool and per upstream: SLO attainment, goodput and tok/s over the SLO window."""
    specs = (
        ("gateway_slo_attainment_ratio", "Share of requests meeting their service class targets (recent window).", "attainment"),
        ("gateway_goodput_tokens_per_second", "Output tok/s of requests that met their class targets.", "goodput_tok_s"),
        ("gateway_class_tokens_per_second", "Output tok/s by service class (recent window).", "tok_s"),
    )
    for scope, key in (("model", "classes"), ("upstream", "upstreams")):
        rows = slo.get(key)
        if not isinstance(rows, Mapping):
            continue
        for fam_name, help_, field in specs:
            fam = GaugeMetricFamily(f"{fam_name}" if scope == "model" else f"{fam_name}_by_upstream", help_,
                                    labels=[scope, "service_class"])
            for name, by_class in rows.items():
                for cls, figs in by_class.items():
                    if (v := _num(figs.get(field))) is not None:
                        fam.add_metric([str(name), str(cls)], v)
            yield fam


def _class_cost_families(classes: Any) -> Iterator[Metric]:
    """Per pool and service class (state/class_cost.py, this replica's requests): live USD per 1M output tokens
    over the class-cost window, and the spend and output tokens charged since start as counters, so that
    sum(rate(spend)) / sum(rate(tokens)) * 1e6 is the fleet's $/1M per class over any range."""
    labels = ["model", "service_class"]
    live = GaugeMetricFamily("gateway_class_cost_usd_per_1m_output_tokens",
                             "USD per 1M output tokens charged to a service class's requests (recent window).", labels=labels)
    spend = Metric("gateway_class_spend_usd", "USD charged to a service class's requests since start.", "counter")
    tokens = Metric("gateway_class_charged_output_tokens", "Output tokens charged to a service class since start.", "counter")
    for model, by_class in (classes.items() if isinstance(classes, Mapping) else ()):
        for cls, f in (by_class.items() if isinstance(by_class, Mapping) else ()):
            if not isinstance(f, Mapping):
                continue
            if (v := _num(f.get("usd_per_1m_output"))) is not None:
                live.add_metric([str(model), str(cls)], v)
            lab = {"model": str(model), "service_class": str(cls)}
            if (v := _num(f.get("spend_usd"))) is not None:
                spend.add_sample("gateway_class_spend_usd_total", lab, v)
            if (v := _num(f.get("output_tokens"))) is not None:
                tokens.add_sample("gateway_class_charged_output_tokens_total", lab, v)
    yield from (live, spend, tokens)


class _CostCollector:
    def __init__(self, snap: Mapping[str, Any], key_spend: list[tuple[str, str, float, float]]) -> None:
        self._snap = snap
        self._spend = key_spend

    def collect(self) -> Iterator[Metric]:
        per_1m = GaugeMetricFamily("gateway_cost_usd_per_1m_output_tokens",
                                   "Live USD per 1M output tokens (scope: upstream, pool or fleet).", labels=["scope", "name"])
        for u in self._snap.get("upstreams") or ():
            if isinstance(u, Mapping) and (v := _num(u.get("usd_per_1m_output"))) is not None:
                per_1m.add_metric(["upstream", str(u["name"])], v)
        c = self._snap.get("cost") or {}
        for model, pv in (c.get("pools_usd_per_1m_output") or {}).items():
            if (v := _num(pv)) is not None:
                per_1m.add_metric(["pool", str(model)], v)
        if (v := _num(c.get("fleet_usd_per_1m_output"))) is not None:
            per_1m.add_metric(["fleet", "fleet"], v)
        yield per_1m
        yield from _class_cost_families(c.get("classes"))
        spend = GaugeMetricFamily("gateway_key_spend_usd", "Spend of a gateway API key in the current UTC day / month.",
                                  labels=["key_id", "key_name", "period"])
        for kid, name, today, month in self._spend:
            spend.add_metric([kid, name, "day"], today)
            spend.add_metric([kid, name, "month"], month)
        yield spend


class _Collector:
    """One scrape's view: the instruments' families (cumulative), then the fleet snapshot's gauges."""

    def __init__(self, families: list[Metric], resource: Resource, snapshot: Mapping[str, Any]) -> None:
        self._families = families
        self._resource = resource
        self._snap = snapshot

    def collect(self) -> Iterator[Metric]:
        # target_info carries the resource, as the OTel -> Prometheus mapping does.
        info = GaugeMetricFamily("target_info", "Target metadata", labels=sorted(prom_labels(self._resource.attributes)))
        info.add_metric([v for _, v in sorted(prom_labels(self._resource.attributes).items())], 1.0)
        yield info
        yield from self._families
        ups = [u for u in (self._snap.get("upstreams") or []) if isinstance(u, Mapping) and u.get("name")]
        if self._snap:
            yield from _upstream_families(ups)
            yield from _process_families(self._snap)
            if isinstance(self._snap.get("slo"), Mapping):
                yield from _slo_families(self._snap["slo"])
