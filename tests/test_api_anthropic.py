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
