"""A streamed request that needs a retry, traced end to end into a real OTLP/HTTP receiver."""

from __future__ import annotations

import json

import openai

from gateway.config import CapacityHint, FleetConfig, ModelConfig, UpstreamConfig
from gateway.sim import SimConfig

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


async def test_streamed_request_with_retry_emits_genai_spans(start_sims, start_gateway, otlp_receiver, monkeypatch):
    sims = await start_sims({"broken": SimConfig(name="broken", error_rate=1.0), "good": SimConfig(name="good")})
    fleet = FleetConfig(
        upstreams={
            # The broken one looks faster, so the router tries it first.
            "broken": UpstreamConfig(base_url=sims.url("broken") + "/v1", model="m-broken", capacity=CapacityHint(a=0.001)),
            "good": UpstreamConfig(base_url=sims.url("good") + "/v1", model="m-good", capacity=CapacityHint(a=0.01)),
        },
        models={"traced": ModelConfig(upstreams=["broken", "good"])},
    )
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gw-under-test")
    gw = await start_gateway(fleet)
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-secret-client-key", max_retries=0)
    stream = await c.chat.completions.create(
        model="traced",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    n = sum([1 async for ch in stream if ch.choices and ch.choices[0].delta.content])
    assert n == 5

    spans = await otlp_receiver.wait_for(lambda s: s["trace_id"] == CLIENT_TRACE, count=3, timeout=10)
    server = [s for s in spans if s["kind"] == "SERVER"]
    clients = sorted((s for s in spans if s["kind"] == "CLIENT"), key=lambda s: s["attributes"]["gateway.attempt"])
    assert len(server) == 1 and len(clients) == 2
    srv = server[0]
    assert srv["parent_span_id"] == CLIENT_SPAN  # W3C traceparent from the client is honoured
    assert srv["name"] == "chat traced"
    a = srv["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "traced"
    assert a["gen_ai.response.model"] == "m-good"
    assert a["gen_ai.usage.output_tokens"] == 5
    assert a["gen_ai.usage.input_tokens"] >= 1
    assert list(a["gen_ai.response.finish_reasons"]) == ["length"]
    assert a["gateway.upstream.name"] == "good"
    assert a["gateway.retry.count"] == 1
    assert a["gateway.route.strategy"] == "throughput"
    assert "marginal gain" in a["gateway.route.reason"]
    assert set(json.loads(a["gateway.route.candidates"])) == {"good"}  # the retry excluded the failed upstream
    assert "gateway.ttft_ms" not in a  # the convention's attribute, in seconds
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < 10 and a["gateway.output_tokens_per_second"] > 0
    assert "gateway.queue.wait_ms" in a

    first, second = clients
    for cs in clients:
        assert cs["parent_span_id"] == srv["span_id"]
        assert cs["attributes"]["gen_ai.provider.name"] == "openai"
        assert cs["attributes"]["server.address"] == "127.0.0.1"
        assert isinstance(cs["attributes"]["server.port"], int) and cs["attributes"]["server.port"] > 0
    assert first["attributes"]["gateway.upstream.name"] == "broken"
    assert first["attributes"]["error.type"] == "upstream_500"
    assert first["status_code"] == "ERROR"
    assert second["attributes"]["gateway.upstream.name"] == "good"
    # One rule for gen_ai.request.model on every span and metric: the client's model; the upstream's own name apart.
    assert second["attributes"]["gen_ai.request.model"] == srv["attributes"]["gen_ai.request.model"] == "traced"
    assert second["attributes"]["gateway.upstream.model"] == "m-good"
    assert "error.type" not in second["attributes"]
    assert second["attributes"]["gen_ai.usage.output_tokens"] == 5
    dump = json.dumps(spans)
    assert "sk-secret-client-key" not in dump
    assert "hello" not in dump  # content is not captured unless enabled


async def test_content_captured_only_when_enabled(sim_fleet, start_gateway, otlp_receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    gw = await start_gateway(sim_fleet.config(), capture_content=True)
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    r = await c.chat.completions.create(
        model="fleet-model",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "capture me STOP_AFTER_3"}],
    )
    spans = await otlp_receiver.wait_for(lambda s: s["kind"] == "SERVER")
    a = spans[0]["attributes"]
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "capture me STOP_AFTER_3"}]},
    ]
    out = json.loads(a["gen_ai.output.messages"])
    assert out[0]["role"] == "assistant" and out[0]["parts"][0]["content"] == r.choices[0].message.content
    assert out[0]["finish_reason"] == "stop"
