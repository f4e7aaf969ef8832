"""What an upstream sends back cannot hurt the gateway: compressed bodies are decoded, oversized bodies and endless
SSE events end in a clean 502 (the upstream is not ejected for them), and the event loop stays responsive."""

from __future__ import annotations

import asyncio
import gzip
import json
import resource
import time

import aiohttp
import openai
from aiohttp import web

from gateway.config import FleetConfig, ModelConfig, UpstreamConfig

ANSWER = {"id": "c1", "object": "chat.completion", "model": "plain", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}]}


def fleet(url: str) -> FleetConfig:
    return FleetConfig(upstreams={"plain": UpstreamConfig(base_url=url)}, models={"m": ModelConfig(upstreams=["plain"])})


async def test_gzip_compressed_upstream_bodies_and_streams_are_decoded(start_upstream, start_gateway):
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=gzip.compress(json.dumps(ANSWER).encode()),
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        chunks = [{"id": "c1", "object": "chat.completion.chunk", "model": "plain",
                   "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in ("hi", " there")]
        chunks.append({"id": "c1", "object": "chat.completion.chunk", "model": "plain",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return web.Response(body=gzip.compress(sse.encode()),
                            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"})

    gw = await start_gateway(fleet(await start_upstream(chat)))
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "x"}]
    r = await c.chat.completions.create(model="m", messages=msgs)
    assert r.choices[0].message.content == "hi there"
    stream = await c.chat.completions.create(model="m", messages=msgs, stream=True)
    assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices]) == "hi there"
    assert gw.runtime.health.success_probability(gw.proxy.fleet.upstreams["plain"]) == 1.0


async def test_huge_upstream_body_is_a_clean_502_with_bounded_memory_and_a_live_loop(start_upstream, start_gateway):
    piece = b"x" * (1 << 20)

    async def chat(request: web.Request) -> web.StreamResponse:  # 200 MB of a body without usage
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            for _ in range(200):
                await resp.write(piece)
        except (ConnectionResetError, RuntimeError):
            pass  # the gateway hung up, as it should
        return resp

    gw = await start_gateway(fleet(await start_upstream(chat)), max_response_bytes=16 << 20)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    health: list[float] = []

    async def probe() -> None:
        async with aiohttp.ClientSession() as s:
            while True:
                t0 = time.monotonic()
                async with s.get(gw.url + "/healthz") as r:
                    assert r.status == 200
                health.append(time.monotonic() - t0)
                await asyncio.sleep(0.02)

    prober = asyncio.create_task(probe())
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) as r:
            status, err = r.status, (await r.json())["error"]
    prober.cancel()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert status == 502 and err["code"] == "upstream_response_too_large"
    assert grown_mb < 200, f"RSS grew by {grown_mb:.0f} MB"
    assert health and sorted(health)[len(health) // 2] < 0.1, "health checks stay fast while the body is refused"
    u = gw.proxy.fleet.upstreams["plain"]
    assert gw.runtime.health.available(u, time.time()), "a client-sized answer does not eject the upstream"


async def test_sse_event_without_terminator_is_bounded(start_upstream, start_gateway):
    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b"data: {")
            for _ in range(64):
                await resp.write(b"x" * (1 << 20))  # one event that never ends
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    gw = await start_gateway(fleet(await start_upstream(chat)), max_event_bytes=4 << 20)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions",
                          json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "upstream_response_too_large"
