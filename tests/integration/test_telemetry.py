"""Telemetry: OTLP export to a real receiver, W3C propagation, Prometheus text."""

from __future__ import annotations

import asyncio
import re

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.utils import floatToGoString

from gateway.observability import telemetry as tm
from gateway.observability.telemetry import Telemetry, provider_name, span_name
from tests.otlp_receiver import OTLPReceiver

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"

_OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)


@pytest.fixture(autouse=True)
def _clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _OTEL_VARS:
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------
# Prometheus text parsing (strict enough to catch format errors)
# ---------------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(v: str) -> str:
    out, i = [], 0
    while i < len(v):
        c = v[i]
        if c == "\\" and i + 1 < len(v):
            n = v[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(n, "\\" + n))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_prom(text: str) -> tuple[dict[str, str], dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """-> (types by family, help by family, samples [(name, labels, value)])."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        assert line, "blank line in exposition"
        if line.startswith("# HELP "):
            name, _, h = line[7:].partition(" ")
            assert name not in helps, f"duplicate HELP for {name}"
            helps[name] = h
            continue
        if line.startswith("# TYPE "):
            name, _, t = line[7:].partition(" ")
            assert name not in types, f"duplicate TYPE for {name}"
            assert t in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = t
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        labels: dict[str, str] = {}
        body = m.group(3) or ""
        pos = 0
        while pos < len(body):
            lm = _LABEL.match(body, pos)
            assert lm, f"bad labels in {line!r} at {body[pos:]!r}"
            labels[lm.group(1)] = _unescape(lm.group(2))
            pos = lm.end()
        samples.append((m.group(1), labels, float(m.group(4))))
    # every sample belongs to a declared family
    for name, _, _ in samples:
        fam = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or (fam in types and types[fam] == "histogram"), f"no TYPE for {name}"
    return types, helps, samples


def _find(samples, name, **labels):
    return [
        (lbl, v)
        for n, lbl, v in samples
        if n == name and all(lbl.get(k) == str(val) for k, val in labels.items())
    ]


def _one(samples, name, **labels) -> float:
    found = _find(samples, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0][1]


SNAPSHOT = {
    "replica": "host-123-ab12cd",
    "redis": "ok",
    "time": 1764000000.0,
    "queue_depth": {"fleet-model": 0, 'we"ird\\model': 7},
    "upstreams": [
        {
            "name": "fast-gpu", "provider": "openai", "kind": "gpu", "models": ["fleet-model"],
            "weight": 1.0, "state": "healthy", "inflight": 12, "inflight_local": 6,
            "max_concurrency": 64, "tok_s": 812.5, "rps": 3.1, "ttft_s": 0.083,
            "decode_tok_s": 70.2, "errors_per_min": 0.0, "rate_limited_per_min": 0.0,
            "ejections": 0,
            "capacity": {"a": 0.008, "b": 0.0004, "saturation_tok_s": 2500.0, "samples": 240},
            "limits": {"rpm": None, "tpm": None, "rpm_used": 0, "tpm_used": 0},
        },
        {
            "name": 'slow "cpu"\\pool\nB', "provider": "azure", "kind": "cpu", "models": ["fleet-model"],
            "weight": 0.25, "state": "ejected", "inflight": 0, "inflight_local": 0,
            "max_concurrency": 8, "tok_s": 0.0, "rps": 0.0, "ttft_s": None,
            "decode_tok_s": None, "errors_per_min": 4.5, "rate_limited_per_min": 1.0,
            "ejections": 3,
            "capacity": {"a": None, "b": None, "saturation_tok_s": None, "samples": 0},
            "limits": {"rpm": 600, "tpm": 100000, "rpm_used": 12, "tpm_used": 3456},
        },
    ],
}
ODD_NAME = 'slow "cpu"\\pool\nB'


# ---------------------------------------------------------------------------------------
# OTLP export to the real receiver
# ---------------------------------------------------------------------------------------
async def test_span_exported_with_attributes_and_client_parent(
    otlp_receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-under-test")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    tel = Telemetry()
    try:
        assert tel.tracing_enabled
        ctx = tel.extract({"Traceparent": TRACEPARENT, "tracestate": "vendor=x"})
        with tel.tracer.start_as_current_span(
            span_name("chat", "fleet-model"),
            context=ctx,
            kind=SpanKind.CLIENT,
            attributes={
                tm.ATTR_GEN_AI_OPERATION_NAME: "chat",
                tm.ATTR_GEN_AI_PROVIDER_NAME: provider_name("azure"),
                tm.ATTR_GEN_AI_REQUEST_MODEL: "fleet-model",
                tm.ATTR_GEN_AI_REQUEST_MAX_TOKENS: 256,
                tm.ATTR_GEN_AI_REQUEST_STREAM: True,
            },
        ) as span:
            span.set_attribute(tm.ATTR_UPSTREAM, "fast-gpu")
            span.set_attribute(tm.ATTR_ROUTE_STRATEGY, "throughput")
            span.set_attribute(tm.ATTR_ROUTE_CANDIDATES, '{"fast-gpu": 1.5, "slow": 0.2}')
            span.set_attribute(tm.ATTR_QUEUE_WAIT_MS, 1.25)
            span.set_attribute(tm.ATTR_GEN_AI_RESPONSE_FINISH_REASONS, ["stop"])
            span.set_attribute(tm.ATTR_GEN_AI_USAGE_OUTPUT_TOKENS, 42)
            span.set_attribute(tm.ATTR_ERROR_TYPE, "timeout")
            span.set_status(Status(StatusCode.ERROR, "upstream timed out"))
            headers: dict[str, str] = {}
            tel.inject(headers)
            my_span_id = format(span.get_span_context().span_id, "016x")

        assert headers["traceparent"] == f"00-{CLIENT_TRACE_ID}-{my_span_id}-01"
        assert headers["tracestate"] == "vendor=x"

        [got] = await otlp_receiver.wait_for(lambda s: s["name"] == "chat fleet-model", timeout=15)
        assert got["trace_id"] == CLIENT_TRACE_ID
        assert got["parent_span_id"] == CLIENT_SPAN_ID
        assert got["span_id"] == my_span_id
        assert got["kind"] == "CLIENT"
        assert got["status_code"] == "ERROR"
        assert got["status_message"] == "upstream timed out"
        assert got["resource"]["service.name"] == "gw-under-test"
        assert got["scope"] == "gateway"
        a = got["attributes"]
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "azure.ai.openai"
        assert a["gen_ai.request.model"] == "fleet-model"
        assert a["gen_ai.request.max_tokens"] == 256
        assert a["gen_ai.request.stream"] is True
        assert a["gen_ai.response.finish_reasons"] == ["stop"]
        assert a["gen_ai.usage.output_tokens"] == 42
        assert a["gateway.upstream.name"] == "fast-gpu"
        assert a["gateway.route.strategy"] == "throughput"
        assert a["gateway.route.candidates"] == '{"fast-gpu": 1.5, "slow": 0.2}'
        assert a["gateway.queue.wait_ms"] == 1.25
        assert a["error.type"] == "timeout"
        assert ("/v1/traces", "application/x-protobuf", "") in otlp_receiver.requests
    finally:
        await tel.shutdown()


async def test_gzip_export_and_otlp_metrics(otlp_receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    tel = Telemetry("svc-from-arg")
    with tel.tracer.start_as_current_span("root span", kind=SpanKind.SERVER):
        pass
    tel.record_operation(
        operation="chat", request_model="fleet-model", response_model="fleet-model-v2",
        provider="openai", upstream="fast-gpu", server_address="gpu1.internal", server_port=8000,
        duration_s=1.5, ttft_s=0.2, input_tokens=100, output_tokens=300, error_type=None,
    )
    tel.record_request(route="/v1/chat/completions", model="fleet-model", code=404)
    # shutdown flushes both providers (in a thread, so this loop can serve the receiver)
    await asyncio.wait_for(tel.shutdown(), 20)
    [root] = await otlp_receiver.wait_for(lambda s: s["name"] == "root span")
    assert root["parent_span_id"] == ""
    assert root["kind"] == "SERVER"
    assert root["resource"]["service.name"] == "svc-from-arg"

    metrics = await otlp_receiver.wait_for_metric(lambda m: m["name"] == tm.DURATION.name)
    dur = metrics[0]
    assert dur["type"] == "histogram" and dur["unit"] == "s"
    [dp] = dur["data_points"]
    assert dp["explicit_bounds"] == list(tm.DURATION_BUCKETS)
    assert dp["count"] == 1 and dp["sum"] == pytest.approx(1.5)
    assert dp["attributes"] == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fleet-model", "gen_ai.response.model": "fleet-model-v2",
        "server.address": "gpu1.internal", "server.port": 8000,
    }
    [tok] = [m for m in otlp_receiver.metrics if m["name"] == tm.TOKEN_USAGE.name]
    assert tok["unit"] == "{token}"
    by_type = {p["attributes"]["gen_ai.token.type"]: p for p in tok["data_points"]}
    assert by_type["input"]["sum"] == 100 and by_type["output"]["sum"] == 300
    assert by_type["output"]["explicit_bounds"] == list(tm.TOKEN_BUCKETS)
    [ttfc] = [m for m in otlp_receiver.metrics if m["name"] == tm.TIME_TO_FIRST_CHUNK.name]
    assert ttfc["data_points"][0]["explicit_bounds"] == list(tm.TTFC_BUCKETS)
    # the per-request counters are exported too (observable counters over the in-memory counts)
    [req] = [m for m in otlp_receiver.metrics if m["name"] == tm.REQUESTS.name]
    assert req["type"] == "sum" and req["data_points"] == [
        {"attributes": {"model": "fleet-model", "route": "/v1/chat/completions", "code": "404"}, "value": 1}
    ]
    [att] = [m for m in otlp_receiver.metrics if m["name"] == tm.ATTEMPTS.name]
    assert att["data_points"] == [{"attributes": {"model": "fleet-model", "upstream": "fast-gpu", "code": "200"}, "value": 1}]
    encodings = {(path, enc) for path, _, enc in otlp_receiver.requests}
    assert ("/v1/traces", "gzip") in encodings and ("/v1/metrics", "gzip") in encodings


async def test_traces_exporter_none_disables_tracing(otlp_receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    tel = Telemetry()
    assert not tel.tracing_enabled
    with tel.tracer.start_as_current_span("x") as span:
        assert not span.is_recording()
    await tel.shutdown()
    await asyncio.sleep(0.3)
    assert otlp_receiver.requests == []


# ---------------------------------------------------------------------------------------
# Propagation
# ---------------------------------------------------------------------------------------
async def test_inject_produces_traceparent_from_current_span() -> None:
    exporter = InMemorySpanExporter()
    tel = Telemetry(span_exporter=exporter)
    headers: dict[str, str] = {}
    tel.inject(headers)
    assert "traceparent" not in headers  # no current span
    with tel.tracer.start_as_current_span("proxy", kind=SpanKind.SERVER) as span:
        sc = span.get_span_context()
        tel.inject(headers)
    # sampled; SDK 1.45 also sets the W3C level-2 "random trace id" flag (0x02)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[13]", headers["traceparent"])
    assert headers["traceparent"] == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
    # explicit context, e.g. one extracted from the client
    out: dict[str, str] = {}
    tel.inject(out, context=tel.extract({"traceparent": TRACEPARENT}))
    assert out["traceparent"] == TRACEPARENT
    await tel.shutdown()
    assert [s.name for s in exporter.get_finished_spans()] == ["proxy"]


async def test_extract_is_case_insensitive_and_tolerates_garbage() -> None:
    tel = Telemetry(span_exporter=InMemorySpanExporter())
    try:
        for hdrs in ({"traceparent": TRACEPARENT}, {"TraceParent": TRACEPARENT}):
            sc = trace.get_current_span(tel.extract(hdrs)).get_span_context()
            assert f"{sc.trace_id:032x}" == CLIENT_TRACE_ID and f"{sc.span_id:016x}" == CLIENT_SPAN_ID
            assert sc.is_remote
        for bad in ({}, {"traceparent": "garbage"}, {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"}):
            assert not trace.get_current_span(tel.extract(bad)).get_span_context().is_valid
    finally:
        await tel.shutdown()


async def test_without_exporter_spans_are_non_recording_and_context_passes_through() -> None:
    tel = Telemetry()
    assert not tel.tracing_enabled
    ctx = tel.extract({"traceparent": TRACEPARENT})
    with tel.tracer.start_as_current_span("chat m", context=ctx) as span:
        assert not span.is_recording()
        span.set_attribute("ignored", 1)  # must be a harmless no-op
        headers: dict[str, str] = {}
        tel.inject(headers)
    # the client's trace goes on at the upstream, unchanged
    assert headers["traceparent"] == TRACEPARENT
    with tel.tracer.start_as_current_span("no parent") as span:
        headers = {}
        tel.inject(headers)
    assert headers == {}
    await tel.shutdown()


def test_provider_name_and_span_name() -> None:
    assert provider_name("openai") == "openai"
    assert provider_name("azure") == "azure.ai.openai"
    assert provider_name("Anthropic") == "anthropic"
    assert provider_name("azure.ai.openai") == "azure.ai.openai"
    assert provider_name("vllm") == "vllm"
    assert span_name("chat", "gpt-4o") == "chat gpt-4o"
    assert span_name("embeddings", None) == "embeddings"


# ---------------------------------------------------------------------------------------
# Prometheus exposition
# ---------------------------------------------------------------------------------------
async def test_prometheus_histograms_counters() -> None:
    tel = Telemetry()
    common = dict(operation="chat", request_model="fleet-model", provider="openai", upstream="fast-gpu", server_address="gpu1")
    tel.record_operation(**common, response_model="fleet-model", duration_s=0.05, ttft_s=0.03,
                         input_tokens=10, output_tokens=200, error_type=None)
    tel.record_operation(**common, response_model="fleet-model", duration_s=3.0, ttft_s=1.0,
                         input_tokens=10, output_tokens=5000, error_type=None)
    tel.record_operation(**common, response_model=None, duration_s=60.0, ttft_s=None,
                         input_tokens=None, output_tokens=None, error_type="timeout", code=504)
    tel.record_operation(**common, response_model=None, duration_s=0.2, ttft_s=None,
                         input_tokens=None, output_tokens=None, error_type="429")
    tel.record_ejection("fast-gpu")
    tel.record_ejection("fast-gpu")
    text = tel.prometheus_text({})
    assert tel.prometheus_text({}) == text  # cumulative: reading does not reset anything
    await tel.shutdown()
    types, helps, samples = parse_prom(text)

    dur = "gen_ai_client_operation_duration_seconds"
    tok = "gen_ai_client_token_usage"
    ttfc = "gen_ai_client_operation_time_to_first_chunk_seconds"
    assert types[dur] == "histogram" and types[tok] == "histogram" and types[ttfc] == "histogram"
    assert helps[dur] == "GenAI operation duration."
    assert types["gateway_upstream_attempts_total"] == "counter"
    assert types["gateway_ejections_total"] == "counter"

    ok = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai",
          "gen_ai_request_model": "fleet-model", "gen_ai_response_model": "fleet-model",
          "server_address": "gpu1"}
    buckets = [(lbl["le"], v) for lbl, v in _find(samples, f"{dur}_bucket", **ok)]
    assert [le for le, _ in buckets] == [floatToGoString(b) for b in tm.DURATION_BUCKETS] + ["+Inf"]
    assert all("error_type" not in lbl for lbl, _ in _find(samples, f"{dur}_bucket", **ok))
    counts = dict(buckets)
    assert counts["0.04"] == 0 and counts["0.08"] == 1 and counts["2.56"] == 1
    assert counts["5.12"] == 2 and counts["81.92"] == 2 and counts["+Inf"] == 2
    assert _one(samples, f"{dur}_sum", **ok) == pytest.approx(3.05)
    assert _one(samples, f"{dur}_count", **ok) == 2
    # cumulative, non-decreasing
    vals = [v for _, v in buckets]
    assert vals == sorted(vals)

    # errors carry error.type (only on the duration histogram), without a response model
    err = _find(samples, f"{dur}_count", error_type="timeout")
    assert len(err) == 1 and err[0][1] == 1 and "gen_ai_response_model" not in err[0][0]
    assert _one(samples, f"{dur}_bucket", error_type="timeout", le="40.96") == 0
    assert _one(samples, f"{dur}_bucket", error_type="timeout", le="81.92") == 1
    assert not [lbl for n, lbl, _ in samples if n.startswith(tok) and "error_type" in lbl]

    out = _find(samples, f"{tok}_bucket", gen_ai_token_type="output")
    assert [lbl["le"] for lbl, _ in out][:3] == ["1.0", "4.0", "16.0"]
    assert _one(samples, f"{tok}_bucket", gen_ai_token_type="output", le="256.0") == 1
    assert _one(samples, f"{tok}_bucket", gen_ai_token_type="output", le="4096.0") == 1
    assert _one(samples, f"{tok}_bucket", gen_ai_token_type="output", le="16384.0") == 2
    assert _one(samples, f"{tok}_sum", gen_ai_token_type="output") == 5200
    assert _one(samples, f"{tok}_count", gen_ai_token_type="input") == 2
    assert _one(samples, f"{tok}_sum", gen_ai_token_type="input") == 20

    # time to first chunk: only the two streamed (ttft given) operations
    assert _one(samples, f"{ttfc}_count") == 2
    assert _one(samples, f"{ttfc}_sum") == pytest.approx(1.03)
    assert _one(samples, f"{ttfc}_bucket", le="0.04") == 1

    assert _one(samples, "gateway_upstream_attempts_total", model="fleet-model", upstream="fast-gpu", code="200") == 2
    assert _one(samples, "gateway_upstream_attempts_total", code="504") == 1
    assert _one(samples, "gateway_upstream_attempts_total", code="429") == 1
    assert _one(samples, "gateway_ejections_total", upstream="fast-gpu") == 2
    assert _one(samples, "target_info", service_name="llm-gateway") == 1


async def test_prometheus_snapshot_gauges_and_escaping() -> None:
    tel = Telemetry()
    text = tel.prometheus_text(SNAPSHOT)
    await tel.shutdown()
    types, helps, samples = parse_prom(text)
    # raw escaping of the odd name: \ -> \\, " -> \", newline -> \n
    assert 'upstream="slow \\"cpu\\"\\\\pool\\nB"' in text
    assert 'model="we\\"ird\\\\model"' in text
    for fam in (
        "gateway_upstream_tokens_per_second", "gateway_upstream_inflight", "gateway_upstream_ttft_seconds",
        "gateway_upstream_ejected", "gateway_upstream_weight", "gateway_upstream_capacity_tokens_per_second",
        "gateway_queue_depth", "gateway_redis_up",
    ):
        assert types[fam] == "gauge", fam
        assert helps[fam], fam
    assert types["gateway_upstream_ejections_total"] == "counter"

    g = lambda fam, up: _one(samples, fam, upstream=up)  # noqa: E731
    assert g("gateway_upstream_tokens_per_second", "fast-gpu") == 812.5
    assert g("gateway_upstream_inflight", "fast-gpu") == 12
    assert g("gateway_upstream_ttft_seconds", "fast-gpu") == pytest.approx(0.083)
    assert g("gateway_upstream_ejected", "fast-gpu") == 0
    assert g("gateway_upstream_ejections_total", "fast-gpu") == 0
    assert g("gateway_upstream_weight", "fast-gpu") == 1.0
    assert g("gateway_upstream_capacity_tokens_per_second", "fast-gpu") == 2500.0
    # the escaped label parses back to the original name
    assert g("gateway_upstream_ejected", ODD_NAME) == 1
    assert g("gateway_upstream_ejections_total", ODD_NAME) == 3
    assert g("gateway_upstream_weight", ODD_NAME) == 0.25
    assert g("gateway_upstream_tokens_per_second", ODD_NAME) == 0
    # unknown values are omitted, not rendered as 0 / NaN
    assert not _find(samples, "gateway_upstream_ttft_seconds", upstream=ODD_NAME)
    assert not _find(samples, "gateway_upstream_capacity_tokens_per_second", upstream=ODD_NAME)
    assert _one(samples, "gateway_upstream_state", upstream=ODD_NAME, state="ejected") == 1
    assert _one(samples, "gateway_upstream_state", upstream=ODD_NAME, state="healthy") == 0
    assert _one(samples, "gateway_upstream_rate_limit", upstream=ODD_NAME, kind="tpm") == 100000
    assert not _find(samples, "gateway_upstream_rate_limit", upstream="fast-gpu")
    assert _one(samples, "gateway_queue_depth", model="fleet-model") == 0
    assert _one(samples, "gateway_queue_depth", model='we"ird\\model') == 7
    assert _one(samples, "gateway_redis_up") == 1

    tel2 = Telemetry()
    degraded = {**SNAPSHOT, "redis": "degraded"}
    _, _, samples2 = parse_prom(tel2.prometheus_text(degraded))
    assert _one(samples2, "gateway_redis_up") == 0
    # an empty / missing snapshot still renders valid text
    parse_prom(tel2.prometheus_text({}))
    parse_prom(tel2.prometheus_text({"upstreams": [{"name": "x"}], "queue_depth": {}}))
    await tel2.shutdown()
