"""Where tok/s is measured: progress samples during long streams, tiktoken counts when usage is missing."""

from __future__ import annotations

import asyncio
import json

import openai
from aiohttp import web

from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.state.upstream_rates import OUT


async def test_long_stream_reports_decode_speed_before_it_ends(gateway):
    fast = gateway.proxy.fleet.upstreams["fast-gpu"]
    for u in gateway.proxy.fleet.upstreams.values():
        if u.name != "fast-gpu":
            u.set_weight(0)
    c = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    stream = await c.chat.completions.create(
        model="fleet-model", messages=[{"role": "user", "content": "x"}], max_tokens=400, stream=True
    )
    seen_mid_stream = []
    n = 0
    async for ch in stream:
        n += 1
        if n == 250:  # ~2 s into a ~3.5 s stream
            seen_mid_stream = [s for s in fast.learned.samples if s.ttft < 0] + [s for s in fast.learned.pending if s.ttft < 0]
    assert seen_mid_stream, "no progress sample while the stream was running"
    s = seen_mid_stream[0]
    assert 0.9 <= s.n <= 1.1  # mean concurrency over the interval: just this stream
    assert 0.006 < s.tpot < 0.02  # sim-fast: 0.008 + 0.0004*1 s per token, plus loop jitter


async def test_tokens_counted_with_tiktoken_when_upstream_sends_no_usage(start_gateway, start_upstream):
    words = [" the", " model", " is", " fast", " and", " good"]

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream_options"]["include_usage"] is True  # asked, but this server ignores it
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for w in words:
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "plain", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.01)
        done = {"id": "c1", "object": "chat.completion.chunk", "model": "plain", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        return resp

    url = await start_upstream(chat)
    fleet = FleetConfig(upstreams={"plain": UpstreamConfig(base_url=url)}, models={"m": ModelConfig(upstreams=["plain"])})
    gw = await start_gateway(fleet)
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    stream = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == "".join(words)
    up = gw.proxy.fleet.upstreams["plain"]
    assert up.window_sum(OUT) == 6
    sample = (list(up.learned.samples) + up.learned.pending)[-1]
    assert sample.output_tokens == 6 and sample.ttft > 0
