"""The inbound Anthropic Messages API, driven by the real anthropic SDK, served by OpenAI-wire upstreams."""

from __future__ import annotations

import anthropic
import pytest


def client(gw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-ant-test", max_retries=0)


async def test_messages_non_streamed(gateway):
    m = await client(gateway).messages.create(
        model="claude-fleet",  # an alias of fleet-model
        max_tokens=50,
        system="be brief",
        messages=[{"role": "user", "content": "hello STOP_AFTER_6"}],
    )
    assert m.type == "message" and m.role == "assistant"
    assert m.stop_reason == "end_turn"
    assert len(m.content[0].text.split()) == 6
    assert m.usage.output_tokens == 6 and m.usage.input_tokens > 0


async def test_messages_streamed(gateway):
    async with client(gateway).messages.stream(
        model="fleet-model", max_tokens=9, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        parts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert len(parts) == 9
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 9


async def test_messages_tool_use(gateway):
    tools = [{"name": "weather", "description": "w", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    m = await client(gateway).messages.create(
        model="fleet-model", max_tokens=50, tools=tools, messages=[{"role": "user", "content": "CALL_TOOL now"}]
    )
    assert m.stop_reason == "tool_use"
    block = next(b for b in m.content if b.type == "tool_use")
    assert block.name == "weather" and block.input == {"city": "Paris"}
    async with client(gateway).messages.stream(
        model="fleet-model", max_tokens=50, tools=tools, messages=[{"role": "user", "content": "CALL_TOOL now"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert next(b for b in final.content if b.type == "tool_use").input == {"city": "Paris"}


async def test_messages_errors_are_clear(gateway):
    c = client(gateway)
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.create(model="fleet-model", max_tokens=5, messages=[])
    assert "messages" in str(e.value)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])


async def test_anthropic_client_to_anthropic_upstream_is_relayed_untouched(start_sims, start_gateway):
    """Same dialect on both sides: no translation, the upstream's frames reach the client as they are."""
    import aiohttp

    from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
    from gateway.sim import SimConfig
    from gateway.state.upstream_rates import OUT

    sims = await start_sims({"claude": SimConfig(name="claude-up")})
    fleet = FleetConfig(
        upstreams={"claude": UpstreamConfig(provider="anthropic", base_url=sims.url("claude"), model="claude-up")},
        models={"claude-fleet": ModelConfig(upstreams=["claude"])},
    )
    gw = await start_gateway(fleet)
    c = client(gw)
    m = await c.messages.create(model="claude-fleet", max_tokens=20, messages=[{"role": "user", "content": "STOP_AFTER_4"}])
    assert m.model == "claude-up"  # the upstream's own response, not a re-encoded one
    assert m.usage.output_tokens == 4
    async with aiohttp.ClientSession() as s:
        body = {"model": "claude-fleet", "max_tokens": 5, "stream": True, "top_k": 3, "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(gw.url + "/v1/messages", json=body) as r:
            raw = await r.text()
    events = [line[7:] for line in raw.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "ping" in events  # a translated stream would not carry the upstream's ping
    assert events.count("content_block_delta") == 5
    async with c.messages.stream(model="claude-fleet", max_tokens=7, messages=[{"role": "user", "content": "x"}]) as st:
        final = await st.get_final_message()
    assert final.usage.output_tokens == 7
    up = gw.proxy.fleet.upstreams["claude"]
    assert up.window_sum(OUT) == 4 + 5 + 7  # measured all the same


async def test_stop_sequences_must_be_a_list(gateway):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        body = {"model": "fleet-model", "max_tokens": 5, "stop_sequences": "END", "messages": [{"role": "user", "content": "x"}]}
        async with s.post(gateway.url + "/v1/messages", json=body) as r:
            assert r.status == 400
            err = await r.json()
    assert err["type"] == "error" and "stop_sequences" in err["error"]["message"]
