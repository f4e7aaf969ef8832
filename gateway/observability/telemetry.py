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
    boundaries) plus gateway counters, kept in an in-memory reader for
    ``GET /metrics`` (:meth:`Telemetry.prometheus_text`), and also pushed over
    OTLP/HTTP when an OTLP endpoint is configured (``OTEL_METRICS_EXPORTER=none``
    turns that off; the period is ``OTEL_METRIC_EXPORT_INTERVAL``, default 60 s).

Call ``await telemetry.shutdown()`` on exit: nothing is registered with ``atexit``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge as _GaugeData,
)
from opentelemetry.sdk.metrics.export import (
    Histogram as _HistogramData,
)
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.export import (
    Sum as _SumData,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "Telemetry",
    "provider_name",
    "span_name",
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
ATTR_GEN_AI_SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
ATTR_SERVER_ADDRESS = "server.address"
ATTR_SERVER_PORT = "server.port"
ATTR_ERROR_TYPE = "error.type"
ATTR_HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"

# Gateway-specific span attributes.
ATTR_UPSTREAM = "gateway.upstream.name"
ATTR_ROUTE_STRATEGY = "gateway.route.strategy"
ATTR_ROUTE_REASON = "gateway.route.reason"
#: JSON string ``{"upstream": score, ...}``.
ATTR_ROUTE_CANDIDATES = "gateway.route.candidates"
ATTR_QUEUE_WAIT_MS = "gateway.queue.wait_ms"
ATTR_RETRY_COUNT = "gateway.retry.count"
ATTR_ATTEMPT = "gateway.attempt"
ATTR_TTFT_MS = "gateway.ttft_ms"
ATTR_OUTPUT_TOKENS_PER_SECOND = "gateway.output_tokens_per_second"
ATTR_REQUEST_COST_USD = "gateway.request.cost_usd"  # what the request cost (gateway/cost.py)

# gen_ai.operation.name well-known values.
OP_CHAT = "chat"
OP_TEXT_COMPLETION = "text_completion"
OP_EMBEDDINGS = "embeddings"

# gen_ai.provider.name well-known values.
PROVIDER_OPENAI = "openai"
PROVIDER_AZURE_OPENAI = "azure.ai.openai"
PROVIDER_AZURE_AI_INFERENCE = "azure.ai.inference"
PROVIDER_ANTHROPIC = "anthropic"
PROVIDER_AWS_BEDROCK = "aws.bedrock"

TOKEN_TYPE_INPUT = "input"
TOKEN_TYPE_OUTPUT = "output"

#: error.type fallback value from the semconv for errors with no better name.
ERROR_TYPE_OTHER = "_OTHER"
ERROR_TYPE_TIMEOUT = "timeout"

#: Content-Type for ``GET /metrics`` (Prometheus text exposition format 0.0.4).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Metric names (instrument names; the Prometheus names are derived from them).
METRIC_OPERATION_DURATION = "gen_ai.client.operation.duration"
METRIC_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"
METRIC_GATEWAY_REQUESTS = "gateway.requests"
METRIC_GATEWAY_EJECTIONS = "gateway.ejections"

# Bucket boundaries advised by the GenAI semconv.
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)
TTFC_BUCKETS: tuple[float, ...] = DURATION_BUCKETS
TOKEN_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)

_PROVIDER_KINDS = {
    "openai": PROVIDER_OPENAI,
    "azure": PROVIDER_AZURE_OPENAI,
    "azure_openai": PROVIDER_AZURE_OPENAI,
    "azure-openai": PROVIDER_AZURE_OPENAI,
    "azure.openai": PROVIDER_AZURE_OPENAI,
    "anthropic": PROVIDER_ANTHROPIC,
    "bedrock": PROVIDER_AWS_BEDROCK,
}


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


def provider_name(kind: str) -> str:
    """Map a fleet provider kind ("openai", "azure", "anthropic") to ``gen_ai.provider.name``.

    Values that already are semconv values pass through; unknown kinds are returned
    lower-cased (the semconv allows custom values).
    """
    k = (kind or "").strip().lower()
    return _PROVIDER_KINDS.get(k, k or PROVIDER_OPENAI)


def span_name(operation: str, request_model: str | None) -> str:
    """Span name the GenAI semconv asks for: ``"{operation} {model}"``."""
    return f"{operation} {request_model}" if request_model else operation


# --------------------------------------------------------------------------------------
# Propagation
# --------------------------------------------------------------------------------------
class _CaseInsensitiveGetter(Getter[Mapping[str, str]]):
    """Header getter that works for plain dicts (any case) and multidicts alike."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
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


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _env_flag(name: str) -> bool:
    return _env(name).lower() in ("1", "true", "yes", "on")


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

        # ---- traces -------------------------------------------------------------
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

        # ---- metrics ------------------------------------------------------------
        self._reader = InMemoryMetricReader()
        readers: list[MetricReader] = [self._reader]
        otlp_metrics = bool(
            _env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        ) and _env("OTEL_METRICS_EXPORTER").lower() != "none"
        if otlp_metrics:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        self.meter_provider = MeterProvider(
            resource=self.resource, metric_readers=readers, shutdown_on_exit=False
        )
        meter = self.meter_provider.get_meter("gateway")
        self._duration = meter.create_histogram(
            METRIC_OPERATION_DURATION,
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self._tokens = meter.create_histogram(
            METRIC_TOKEN_USAGE,
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        )
        self._ttfc = meter.create_histogram(
            METRIC_TIME_TO_FIRST_CHUNK,
            unit="s",
            description=(
                "Time to receive the first chunk, measured from when the client issues the "
                "generation request to when the first chunk is received in the response stream."
            ),
            explicit_bucket_boundaries_advisory=list(TTFC_BUCKETS),
        )
        self._requests = meter.create_counter(
            METRIC_GATEWAY_REQUESTS,
            unit="{request}",
            description="Requests finished by the gateway, by model, upstream and HTTP status code.",
        )
        self._ejections = meter.create_counter(
            METRIC_GATEWAY_EJECTIONS,
            unit="{ejection}",
            description="Upstream ejections decided by this replica.",
        )

    # ---- propagation ------------------------------------------------------------------
    def extract(self, headers: Mapping[str, str]) -> Context:
        """Context from the client's W3C ``traceparent``/``tracestate`` headers."""
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
        """Record one finished upstream operation (call once per client request).

        * ``provider``: a semconv ``gen_ai.provider.name`` value (use :func:`provider_name`);
          a raw kind is mapped too.
        * ``ttft_s``: only for streaming calls (the semconv says not to report
          time_to_first_chunk otherwise): pass None for non-streaming ones.
        * ``input_tokens``/``output_tokens``: None when unknown (not recorded).
        * ``error_type``: the ``error.type`` value when the operation failed, e.g.
          ``"timeout"``, ``"429"``, ``"500"``, an exception class name; None on success.
        * ``code``: HTTP status returned to the client, the ``code`` label of
          ``gateway.requests``. Default: 200 on success, else ``error_type`` when it is a
          numeric status, else ``"error"``.
        """
        attrs: dict[str, Any] = {
            ATTR_GEN_AI_OPERATION_NAME: operation,
            ATTR_GEN_AI_PROVIDER_NAME: provider_name(provider),
        }
        if request_model:
            attrs[ATTR_GEN_AI_REQUEST_MODEL] = request_model
        if response_model:
            attrs[ATTR_GEN_AI_RESPONSE_MODEL] = response_model
        if server_address:
            attrs[ATTR_SERVER_ADDRESS] = server_address
            if server_port is not None:
                attrs[ATTR_SERVER_PORT] = int(server_port)
        duration_attrs = attrs
        if error_type:
            duration_attrs = {**attrs, ATTR_ERROR_TYPE: str(error_type)}
        self._duration.record(max(0.0, float(duration_s)), duration_attrs)
        if ttft_s is not None:
            self._ttfc.record(max(0.0, float(ttft_s)), attrs)
        if input_tokens is not None:
            self._tokens.record(int(input_tokens), {**attrs, ATTR_GEN_AI_TOKEN_TYPE: TOKEN_TYPE_INPUT})
        if output_tokens is not None:
            self._tokens.record(
                int(output_tokens), {**attrs, ATTR_GEN_AI_TOKEN_TYPE: TOKEN_TYPE_OUTPUT}
            )
        if code is None:
            if not error_type:
                code = 200
            elif str(error_type).isdigit():
                code = error_type
            else:
                code = "error"
        self._requests.add(
            1, {"model": request_model or "", "upstream": upstream or "", "code": str(code)}
        )

    def record_ejection(self, upstream: str) -> None:
        """Count one ejection of ``upstream`` (``gateway_ejections_total{upstream}``)."""
        self._ejections.add(1, {"upstream": upstream})

    # ---- Prometheus ---------------------------------------------------------------------
    def prometheus_text(self, snapshot: Mapping[str, Any] | None = None) -> str:
        """Prometheus text exposition (format 0.0.4) of the SDK metrics + live gauges.

        Serve with ``Content-Type: text/plain; version=0.0.4; charset=utf-8``.
        """
        fams = _Families()
        try:
            data = self._reader.get_metrics_data()
        except Exception:  # reader shut down
            data = None
        _render_sdk_metrics(fams, data, self.resource)
        if snapshot:
            _render_snapshot(fams, snapshot)
        return fams.render()

    def cost_text(self, snapshot: Mapping[str, Any], key_spend: Iterable[tuple[str, str, float, float]]) -> str:
        """Cost gauges (issue 13), rendered apart from prometheus_text: $/1M output tokens per upstream, pool and
        fleet; spend per gateway key (id, name, today, this month, as this replica knows it)."""
        fams = _Families()
        _render_cost(fams, snapshot, key_spend)
        return fams.render()

    # ---- lifecycle ----------------------------------------------------------------------
    async def force_flush(self, timeout_s: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._flush_sync, timeout_s)

    def _flush_sync(self, timeout_s: float) -> None:
        ms = int(timeout_s * 1000)
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(ms)
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
        self.meter_provider.shutdown(timeout_millis=ms)


# --------------------------------------------------------------------------------------
# Prometheus text rendering
# --------------------------------------------------------------------------------------
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")
_MULTI_US = re.compile(r"__+")
_UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes",
    "MiBy": "mebibytes", "GiBy": "gibibytes", "KBy": "kilobytes", "MBy": "megabytes",
    "GBy": "gigabytes", "bit": "bits", "m": "meters", "V": "volts", "A": "amperes",
    "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius", "Hz": "hertz",
    "%": "percent",
}
_PER_WORDS = {"s": "second", "m": "minute", "min": "minute", "h": "hour", "d": "day"}


def _metric_name(name: str) -> str:
    n = _MULTI_US.sub("_", _NAME_BAD.sub("_", name))
    if n and n[0].isdigit():
        n = "_" + n
    return n


def _label_name(name: str) -> str:
    n = _MULTI_US.sub("_", _LABEL_BAD.sub("_", str(name)))
    if not n or n[0].isdigit():
        n = "_" + n
    return n


def _unit_suffix(unit: str | None, is_gauge: bool) -> str:
    """OTel unit -> Prometheus suffix ("s" -> "seconds", "{token}" -> "")."""
    if not unit:
        return ""
    unit = re.sub(r"\{[^}]*\}", "", unit).strip()
    if not unit:
        return ""
    if unit == "1":
        return "ratio" if is_gauge else ""
    main, _, per = unit.partition("/")
    parts = []
    if main:
        parts.append(_UNIT_WORDS.get(main, main))
    if per:
        parts.append("per_" + _PER_WORDS.get(per, _UNIT_WORDS.get(per, per)))
    return _metric_name("_".join(parts)).strip("_")


def _prom_name(name: str, unit: str | None, *, is_gauge: bool) -> str:
    base = _metric_name(name)
    suffix = _unit_suffix(unit, is_gauge)
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base


def _fmt_value(v: float | int | bool) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if f.is_integer() and abs(f) < 1e15:
        return f"{f:.1f}"
    return repr(f)


def _escape_label_value(v: Any) -> str:
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, (list, tuple)):
        s = json.dumps(list(v))
    else:
        s = str(v)
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(s: str) -> str:
    return s.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(items: Iterable[tuple[str, Any]]) -> str:
    parts = []
    seen: set[str] = set()
    for k, v in items:
        if v is None:
            continue
        ln = _label_name(k)
        if ln in seen:
            continue
        seen.add(ln)
        parts.append(f'{ln}="{_escape_label_value(v)}"')
    return "{" + ",".join(parts) + "}" if parts else ""


class _Families:
    """Ordered metric families: name -> (type, help, sample lines)."""

    def __init__(self) -> None:
        self._fams: dict[str, tuple[str, str, list[str]]] = {}

    def family(self, name: str, typ: str, help_: str) -> list[str] | None:
        fam = self._fams.get(name)
        if fam is None:
            fam = (typ, help_, [])
            self._fams[name] = fam
        elif fam[0] != typ:
            return None  # name clash with a different type: drop the newcomer
        return fam[2]

    def render(self) -> str:
        out: list[str] = []
        for name, (typ, help_, lines) in self._fams.items():
            if not lines:
                continue
            out.append(f"# HELP {name} {_escape_help(help_ or name)}")
            out.append(f"# TYPE {name} {typ}")
            out.extend(lines)
        return "\n".join(out) + "\n" if out else ""


def _render_sdk_metrics(fams: _Families, data: Any, resource: Resource) -> None:
    # target_info carries the resource, as the OTel -> Prometheus mapping does.
    lines = fams.family("target_info", "gauge", "Target metadata")
    if lines is not None:
        lines.append(f"target_info{_labels(sorted(resource.attributes.items()))} 1")
    if data is None:
        return
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                d = metric.data
                desc = metric.description or ""
                if isinstance(d, _HistogramData):
                    name = _prom_name(metric.name, metric.unit, is_gauge=False)
                    lines = fams.family(name, "histogram", desc)
                    if lines is None:
                        continue
                    for dp in d.data_points:
                        base = list(dp.attributes.items())
                        cum = 0
                        for bound, count in zip(dp.explicit_bounds, dp.bucket_counts):
                            cum += count
                            lbl = _labels([*base, ("le", _fmt_value(float(bound)))])
                            lines.append(f"{name}_bucket{lbl} {cum}")
                        total = sum(dp.bucket_counts)
                        lines.append(f"{name}_bucket{_labels([*base, ('le', '+Inf')])} {total}")
                        lines.append(f"{name}_sum{_labels(base)} {_fmt_value(dp.sum)}")
                        lines.append(f"{name}_count{_labels(base)} {dp.count}")
                elif isinstance(d, _SumData) and d.is_monotonic:
                    name = _prom_name(metric.name, metric.unit, is_gauge=False)
                    if not name.endswith("_total"):
                        name += "_total"
                    lines = fams.family(name, "counter", desc)
                    if lines is None:
                        continue
                    for dp in d.data_points:
                        lines.append(f"{name}{_labels(dp.attributes.items())} {_fmt_value(dp.value)}")
                elif isinstance(d, (_SumData, _GaugeData)):
                    name = _prom_name(metric.name, metric.unit, is_gauge=True)
                    lines = fams.family(name, "gauge", desc)
                    if lines is None:
                        continue
                    for dp in d.data_points:
                        lines.append(f"{name}{_labels(dp.attributes.items())} {_fmt_value(dp.value)}")
                # exponential histograms are not used by the gateway


def _num(v: Any) -> float | int | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


_UPSTREAM_GAUGES: tuple[tuple[str, str, str, str], ...] = (
    # (family, type, help, snapshot key)
    ("gateway_upstream_tokens_per_second", "gauge", "Delivered output tokens per second (recent window).", "tok_s"),
    ("gateway_upstream_decode_tokens_per_second", "gauge", "Per-stream decode speed after the first token.", "decode_tok_s"),
    ("gateway_upstream_requests_per_second", "gauge", "Requests per second (recent window).", "rps"),
    ("gateway_upstream_inflight", "gauge", "Requests in flight on the upstream, fleet-wide.", "inflight"),
    ("gateway_upstream_inflight_local", "gauge", "Requests in flight on the upstream from this replica.", "inflight_local"),
    ("gateway_upstream_max_concurrency", "gauge", "Configured concurrency limit of the upstream.", "max_concurrency"),
    ("gateway_upstream_ttft_seconds", "gauge", "Recent time to first token.", "ttft_s"),
    ("gateway_upstream_errors_per_minute", "gauge", "Upstream errors per minute (recent window).", "errors_per_min"),
    ("gateway_upstream_rate_limited_per_minute", "gauge", "Upstream 429 responses per minute (recent window).", "rate_limited_per_min"),
    ("gateway_upstream_weight", "gauge", "Routing weight of the upstream.", "weight"),
)
_STATES = ("healthy", "ejected", "cooldown", "draining")


def _render_snapshot(fams: _Families, snap: Mapping[str, Any]) -> None:
    ups = [u for u in (snap.get("upstreams") or []) if isinstance(u, Mapping) and u.get("name")]
    for fam, typ, help_, key in _UPSTREAM_GAUGES:
        lines = fams.family(fam, typ, help_)
        if lines is None:
            continue
        for u in ups:
            v = _num(u.get(key))
            if v is not None:
                lines.append(f"{fam}{_labels([('upstream', u['name'])])} {_fmt_value(v)}")

    lines = fams.family(
        "gateway_upstream_capacity_tokens_per_second", "gauge",
        "Estimated saturation throughput of the upstream (learned capacity model).",
    )
    if lines is not None:
        for u in ups:
            cap = u.get("capacity")
            v = _num(cap.get("saturation_tok_s")) if isinstance(cap, Mapping) else None
            if v is not None:
                lines.append(
                    f"gateway_upstream_capacity_tokens_per_second{_labels([('upstream', u['name'])])} {_fmt_value(v)}"
                )

    lines = fams.family("gateway_upstream_ejected", "gauge", "1 when the upstream is ejected.")
    if lines is not None:
        for u in ups:
            v = 1 if u.get("state") == "ejected" else 0
            lines.append(f"gateway_upstream_ejected{_labels([('upstream', u['name'])])} {v}")

    lines = fams.family(
        "gateway_upstream_state", "gauge",
        "Upstream state (one series per state, 1 for the current one).",
    )
    if lines is not None:
        for u in ups:
            state = str(u.get("state") or "")
            states = _STATES if state in _STATES or not state else (*_STATES, state)
            for s in states:
                lbl = _labels([("upstream", u["name"]), ("state", s)])
                lines.append(f"gateway_upstream_state{lbl} {1 if s == state else 0}")

    lines = fams.family("gateway_upstream_ejections_total", "counter", "Ejections of the upstream, fleet-wide.")
    if lines is not None:
        for u in ups:
            v = _num(u.get("ejections"))
            if v is not None:
                lines.append(f"gateway_upstream_ejections_total{_labels([('upstream', u['name'])])} {_fmt_value(v)}")

    lim_used = fams.family("gateway_upstream_rate_limit_used", "gauge", "Requests (rpm) or tokens (tpm) used in the current minute.")
    lim_max = fams.family("gateway_upstream_rate_limit", "gauge", "Configured per-minute rate limit (rpm or tpm).")
    for u in ups:
        limits = u.get("limits")
        if not isinstance(limits, Mapping):
            continue
        for kind in ("rpm", "tpm"):
            lbl = _labels([("upstream", u["name"]), ("kind", kind)])
            used = _num(limits.get(f"{kind}_used"))
            if used is not None and lim_used is not None:
                lim_used.append(f"gateway_upstream_rate_limit_used{lbl} {_fmt_value(used)}")
            mx = _num(limits.get(kind))
            if mx is not None and lim_max is not None:
                lim_max.append(f"gateway_upstream_rate_limit{lbl} {_fmt_value(mx)}")

    qd = snap.get("queue_depth")
    lines = fams.family("gateway_queue_depth", "gauge", "Requests waiting in the admission queue, by model.")
    if lines is not None and isinstance(qd, Mapping):
        for model, depth in qd.items():
            v = _num(depth)
            if v is not None:
                lines.append(f"gateway_queue_depth{_labels([('model', model)])} {_fmt_value(v)}")

    redis = snap.get("redis")
    if redis is not None:
        lines = fams.family(
            "gateway_redis_up", "gauge",
            "1 when the shared Redis state store is reachable (0 when degraded or disabled).",
        )
        if lines is not None:
            lines.append(f"gateway_redis_up {1 if redis == 'ok' else 0}")
    replica = snap.get("replica")
    if replica:
        lines = fams.family("gateway_replica_info", "gauge", "Replica identity.")
        if lines is not None:
            lines.append(f"gateway_replica_info{_labels([('replica', replica), ('redis', redis)])} 1")


def _render_cost(fams: _Families, snap: Mapping[str, Any], key_spend: Iterable[tuple[str, str, float, float]]) -> None:
    per_1m = fams.family("gateway_cost_usd_per_1m_output_tokens", "gauge",
                         "Live USD per 1M output tokens (scope: upstream, pool or fleet).")
    if per_1m is None:
        return
    for u in snap.get("upstreams") or ():
        v = _num(u.get("usd_per_1m_output")) if isinstance(u, Mapping) else None
        if v is not None:
            per_1m.append(f"gateway_cost_usd_per_1m_output_tokens{_labels([('scope', 'upstream'), ('name', u['name'])])} {_fmt_value(v)}")
    c = snap.get("cost") or {}
    for model, v in (c.get("pools_usd_per_1m_output") or {}).items():
        if _num(v) is not None:
            per_1m.append(f"gateway_cost_usd_per_1m_output_tokens{_labels([('scope', 'pool'), ('name', model)])} {_fmt_value(v)}")
    fv = _num(c.get("fleet_usd_per_1m_output"))
    if fv is not None:
        per_1m.append(f"gateway_cost_usd_per_1m_output_tokens{_labels([('scope', 'fleet'), ('name', 'fleet')])} {_fmt_value(fv)}")
    spend = fams.family("gateway_key_spend_usd", "gauge", "Spend of a gateway API key in the current UTC day / month.")
    for kid, name, today, month in key_spend:
        for period, v in (("day", today), ("month", month)):
            spend.append(f"gateway_key_spend_usd{_labels([('key_id', kid), ('key_name', name), ('period', period)])} {_fmt_value(v)}")  # type: ignore[union-attr]
