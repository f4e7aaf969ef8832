"""The inbound OpenAI API, driven by the real openai SDK through the gateway to simulator upstreams."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.state.upstream_rates import OUT


def client(gw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0)


async def test_chat_non_streamed(gateway):
    r = await client(gateway).chat.completions.create(
        model="fleet-model", messages=[{"role": "user", "content": "hello STOP_AFTER_7"}]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 7
    assert len(r.choices[0].message.content.split()) == 7


async def test_chat_streamed_with_usage(gateway):
    stream = await client(gateway).chat.completions.create(
        model="fleet-model",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                text.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert len(text) == 12
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12


async def test_stream_without_usage_drops_usage_chunk(gateway):
    """The gateway asks upstreams for usage; a client that did not ask must not see the extra chunk."""
    async with aiohttp.ClientSession() as s:
        async with s.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "fleet-model", "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]},
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            body = await r.text()
    frames = [f[6:] for f in body.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all(c["choices"] for c in chunks)
    assert not any("usage" in c and c["usage"] for c in chunks)


async def test_completions_and_embeddings_and_models(gateway):
    c = client(gateway)
    r = await c.completions.create(model="fleet-model", prompt="say STOP_AFTER_4", max_tokens=10)
    assert r.usage.completion_tokens == 4 and r.choices[0].text
    e = await c.embeddings.create(model="fleet-model", input=["a", "b"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8
    models = await c.models.list()
    ids = {m.id async for m in models}
    assert {"fleet-model", "gpt-4o-mini"} <= ids


async def test_alias_routes_to_pool(gateway):
    r = await client(gateway).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "STOP_AFTER_2"}]
    )
    assert r.usage.completion_tokens == 2


async def test_errors_are_openai_shaped(gateway):
    c = client(gateway)
    with pytest.raises(openai.NotFoundError) as ei:
        await c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as ei:
        await c.chat.completions.create(model="fleet-model", messages=[])
    assert ei.value.body["param"] == "messages"
    async with aiohttp.ClientSession() as s:
        for payload, status in ((b"{nope", 400), (b"[1,2]", 400), (b"", 400), (b'{"model": 5, "messages": []}', 400)):
            async with s.post(gateway.url + "/v1/chat/completions", data=payload) as r:
                assert r.status == status
                err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error" and err["message"]
        async with s.post(gateway.url + "/v1/chat/completions", data=b"x" * (5 * 1024 * 1024)) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "body_too_large"
        async with s.get(gateway.url + "/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()


async def test_tool_calls_pass_through(gateway):
    r = await client(gateway).chat.completions.create(
        model="fleet-model",
        messages=[{"role": "user", "content": "CALL_TOOL please"}],
        tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Paris"}


async def test_client_disconnect_cancels_upstream(gateway, sim_fleet):
    """A client that goes away mid-stream frees the upstream's slot and the gateway's in-flight count."""
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "fleet-model", "stream": True, "max_tokens": 5000, "messages": [{"role": "user", "content": "x"}]},
        )
        await r.content.readline()
        up = next(u for u in gateway.proxy.fleet.upstreams.values() if u.inflight_local)
        sim = sim_fleet.apps[up.name]["sim"]
        r.close()
    for _ in range(100):
        await asyncio.sleep(0.05)
        if up.inflight_local == 0 and sim.stats()["running"] == 0:
            break
    assert up.inflight_local == 0
    assert sim.stats()["running"] == 0


async def test_azure_and_anthropic_upstreams(start_sims, start_gateway, monkeypatch):
    """Same OpenAI client; the gateway speaks Azure's and Anthropic's wire formats upstream."""
    from gateway.sim import SimConfig

    sims = await start_sims({"az": SimConfig(name="az", api_key="az-key"), "an": SimConfig(name="an", api_key="an-key")})
    monkeypatch.setenv("AZ_KEY", "az-key")
    monkeypatch.setenv("AN_KEY", "an-key")
    fleet = FleetConfig(
        upstreams={
            "az": UpstreamConfig(provider="azure", base_url=sims.url("az"), deployment="d1", api_version="2024-10-21", api_key_env="AZ_KEY"),
            "an": UpstreamConfig(provider="anthropic", base_url=sims.url("an"), model="claude-x", api_key_env="AN_KEY"),
        },
        models={"azure-model": ModelConfig(upstreams=["az"]), "claude": ModelConfig(upstreams=["an"])},
    )
    gw = await start_gateway(fleet)
    c = client(gw)
    r = await c.chat.completions.create(model="azure-model", messages=[{"role": "user", "content": "STOP_AFTER_3"}])
    assert r.usage.completion_tokens == 3
    r = await c.chat.completions.create(model="claude", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "STOP_AFTER_5"}])
    assert r.usage.completion_tokens == 5 and r.model == "claude-x"  # the serving model's own name (README)
    stream = await c.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    async for ch in stream:
        usage = ch.usage or usage
        parts += [x.delta.content for x in ch.choices if x.delta.content]
    assert len(parts) == 6 and usage.completion_tokens == 6
    stats = gw.proxy.fleet.upstreams["an"]
    assert stats.window_sum(OUT) >= 11  # output tokens were measured
