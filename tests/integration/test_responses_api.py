"""The Responses API (POST /v1/responses) through the gateway, driven by the real openai SDK, served by
OpenAI-compatible simulators and by an Anthropic simulator (translated to chat completions and back)."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.http.api import RUNTIME
from gateway.sim import SimConfig
from tests.conftest import free_port

TOOLS = [{
    "type": "function", "name": "weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]


def client(gw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0)


@pytest.fixture
async def anthropic_gateway(start_sims, start_gateway):
    sims = await start_sims({"claude": SimConfig(name="claude-up")})
    fleet = FleetConfig(
        upstreams={"claude": UpstreamConfig(provider="anthropic", base_url=sims.url("claude"), model="claude-up")},
        models={"claude-fleet": ModelConfig(upstreams=["claude"])},
    )
    return await start_gateway(fleet)


@pytest.fixture(params=["openai", "anthropic"])
async def target(request, gateway, anthropic_gateway):
    """(gateway, model) for an OpenAI-compatible pool and for an Anthropic upstream."""
    if request.param == "openai":
        return gateway, "fleet-model"
    return anthropic_gateway, "claude-fleet"


async def test_responses_non_streamed(target):
    gw, model = target
    r = await client(gw).responses.create(model=model, input="hello STOP_AFTER_5", instructions="be brief", max_output_tokens=50)
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert len(r.output_text.split()) == 5
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage is not None and r.usage.output_tokens == 5 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + 5
    assert r.instructions == "be brief" and r.max_output_tokens == 50


async def test_responses_streamed(target):
    gw, model = target
    stream = await client(gw).responses.create(model=model, input="hi", max_output_tokens=7, stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"  # stopped by max_output_tokens, as OpenAI reports it
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 7
    final = events[-1].response
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == "".join(deltas) and final.usage.output_tokens == 7
    assert "response.output_text.done" in kinds and "response.output_item.done" in kinds


async def test_responses_stream_helper_completed(target):
    gw, model = target
    async with client(gw).responses.stream(model=model, input="hi STOP_AFTER_3") as stream:
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(texts) and len(texts) == 3


async def test_responses_tool_call_round_trip(target):
    gw, model = target
    c = client(gw)
    r = await c.responses.create(model=model, input="CALL_TOOL now", tools=TOOLS)
    call = next(o for o in r.output if o.type == "function_call")
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}
    # Streamed: the arguments arrive as function_call_arguments events.
    stream = await c.responses.create(model=model, input="CALL_TOOL now", tools=TOOLS, stream=True)
    events = [e async for e in stream]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"city": "Paris"}
    assert events[-1].type == "response.completed"
    assert next(o for o in events[-1].response.output if o.type == "function_call").call_id
    # The tool result goes back with previous_response_id: the gateway supplies the earlier turns.
    r2 = await c.responses.create(
        model=model, previous_response_id=r.id, max_output_tokens=5,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert r2.previous_response_id == r.id and len(r2.output_text.split()) == 5
    assert r2.status == "incomplete" and r2.incomplete_details.reason == "max_output_tokens"
    if model == "fleet-model":  # (the Anthropic simulator does not count tool_result text as input)
        assert r2.usage.input_tokens > r.usage.input_tokens  # the earlier turn (with its tool call) was sent again


async def test_previous_response_id_in_redis(sim_fleet, start_gateway, redis_client, redis_prefix):
    gw = await start_gateway(sim_fleet.config(), redis_url="redis://127.0.0.1:6379/0", redis_prefix=redis_prefix)
    c = client(gw)
    r1 = await c.responses.create(model="fleet-model", input="my name is Ada STOP_AFTER_2")
    await gw.app[RUNTIME].responses.drain()
    stored = json.loads(await redis_client.get(f"{redis_prefix}:resp:{r1.id}"))
    assert stored[0] == {"role": "user", "content": "my name is Ada STOP_AFTER_2"}
    assert stored[-1]["role"] == "assistant" and stored[-1]["content"] == r1.output_text
    ttl = await redis_client.ttl(f"{redis_prefix}:resp:{r1.id}")
    assert 0 < ttl <= 24 * 3600
    r2 = await c.responses.create(model="fleet-model", input="what is my name?", previous_response_id=r1.id)
    assert r2.usage.input_tokens > r1.usage.input_tokens  # the earlier turn was sent again
    with pytest.raises(openai.BadRequestError) as e:
        await c.responses.create(model="fleet-model", input="x", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id" and "not found" in e.value.body["message"]
    r3 = await c.responses.create(model="fleet-model", input="secret", store=False)
    await gw.app[RUNTIME].responses.drain()
    assert await redis_client.get(f"{redis_prefix}:resp:{r3.id}") is None


async def test_responses_refuses_what_it_cannot_honour(gateway):
    c = client(gateway)
    with pytest.raises(openai.BadRequestError) as e:
        await c.responses.create(model="fleet-model", input="x", tools=[{"type": "web_search"}])
    assert "function tools" in e.value.body["message"] and e.value.body["param"] == "tools[0]"
    with pytest.raises(openai.BadRequestError) as e:
        await c.responses.create(model="fleet-model", input="x", extra_body={"background": True})
    assert "background" in e.value.body["message"] and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError):
        await c.responses.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        await c.responses.create(model="fleet-model", input=[])
    assert e.value.body["param"] == "input"


async def test_responses_parameters_an_anthropic_upstream_cannot_honour(anthropic_gateway):
    """Named as the client sent them (text.format, not the canonical response_format)."""
    with pytest.raises(openai.BadRequestError) as e:
        await client(anthropic_gateway).responses.create(
            model="claude-fleet", input="x", text={"format": {"type": "json_object"}}, reasoning={"effort": "low"}
        )
    assert e.value.body["code"] == "unsupported_parameter"
    assert "text.format" in e.value.body["message"] and "reasoning.effort" in e.value.body["message"]


async def test_stream_broken_after_first_byte_ends_as_response_failed(start_sims, start_gateway):
    """After the first event no retry is possible: the client gets response.failed, valid for the SDK."""
    import aiohttp

    sims = await start_sims({"s": SimConfig(name="s")})
    fleet = FleetConfig(upstreams={"s": UpstreamConfig(base_url=sims.url("s") + "/v1")}, models={"m": ModelConfig(upstreams=["s"])})
    gw = await start_gateway(fleet)
    async with aiohttp.ClientSession() as s, s.post(sims.url("s") + "/sim/faults", json={"fail_streams_after": 3}) as r:
        assert r.status == 200
    events = [e async for e in await client(gw).responses.create(model="m", input="hi", max_output_tokens=20, stream=True)]
    assert events[0].type == "response.created"
    assert len([e for e in events if e.type == "response.output_text.delta"]) == 3
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"


async def test_responses_are_measured_and_traced(start_sims, start_gateway, otlp_receiver, monkeypatch):
    from gateway.state.upstream_rates import OUT

    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    sims = await start_sims({"s": SimConfig(name="s")})
    fleet = FleetConfig(upstreams={"s": UpstreamConfig(base_url=sims.url("s") + "/v1", model="m-up")},
                        models={"m": ModelConfig(upstreams=["s"])})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    gw = await start_gateway(fleet)
    stream = await client(gw).responses.create(
        model="m", input="hi", max_output_tokens=4, stream=True,
        extra_headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert [e.type async for e in stream][-1] == "response.incomplete"
    assert gw.proxy.fleet.upstreams["s"].window_sum(OUT) == 4  # measured like any chat call
    spans = await otlp_receiver.wait_for(lambda s: s["trace_id"] == trace, count=2, timeout=10)
    srv = next(s for s in spans if s["kind"] == "SERVER")
    assert srv["attributes"]["gen_ai.usage.output_tokens"] == 4
    assert srv["attributes"]["gen_ai.response.model"] == "m-up"
    assert any(s["kind"] == "CLIENT" for s in spans)


class NativeResponsesUpstream:
    """A hand-written upstream serving /v1/responses itself (as OpenAI does), with its own response ids; it
    records the bodies it receives."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def handle(self, request):
        from aiohttp import web

        from gateway.dialects.responses import ChatStreamToResponses, chat_to_response, responses_request_to_chat

        body = await request.json()
        self.bodies.append(body)
        _, meta = responses_request_to_chat({k: v for k, v in body.items() if k not in ("previous_response_id", "tools")})
        meta.id = f"resp_native_{len(self.bodies)}"
        words = ["one", " two", " three"]
        usage = {"prompt_tokens": 4, "completion_tokens": len(words)}
        if not body.get("stream"):
            chat = {"model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}]}
            return web.json_response(chat_to_response(chat, meta))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        enc = ChatStreamToResponses(meta)
        for w in words:
            await resp.write(enc.feed({"model": body["model"], "choices": [{"index": 0, "delta": {"content": w}}]}))
        await resp.write(enc.feed({"model": body["model"], "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        await resp.write(enc.feed({"model": body["model"], "choices": [], "usage": usage}) + enc.done())
        await resp.write_eof()
        return resp


async def test_native_pass_through_to_upstreams_serving_the_responses_api(start_gateway):
    from aiohttp import web

    from gateway.state.upstream_rates import OUT

    up = NativeResponsesUpstream()
    app = web.Application()
    app.router.add_post("/v1/responses", up.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        fleet = FleetConfig(
            upstreams={"native": UpstreamConfig(base_url=f"http://127.0.0.1:{port}/v1", model="up-model", responses_api=True)},
            models={"m": ModelConfig(upstreams=["native"])},
        )
        gw = await start_gateway(fleet)
        c = client(gw)
        r = await c.responses.create(model="m", input="hi", metadata={"k": "v"})
        assert r.id == "resp_native_1" and r.output_text == "one two three"  # the upstream's own response
        assert up.bodies[-1]["model"] == "up-model" and up.bodies[-1]["metadata"] == {"k": "v"}  # the client's body
        stream = await c.responses.create(model="m", input="again", previous_response_id=r.id, stream=True)
        events = [e async for e in stream]
        assert events[-1].type == "response.completed" and events[-1].response.id == "resp_native_2"
        assert up.bodies[-1]["previous_response_id"] == "resp_native_1"  # the upstream's own state, passed through
        assert gw.proxy.fleet.upstreams["native"].window_sum(OUT) == 6  # measured from the decoded events
        # What the gateway cannot translate (a built-in tool) still reaches an upstream that serves it natively.
        r = await c.responses.create(model="m", input="search", tools=[{"type": "web_search"}])
        assert r.id == "resp_native_3" and up.bodies[-1]["tools"] == [{"type": "web_search"}]
    finally:
        await runner.cleanup()
