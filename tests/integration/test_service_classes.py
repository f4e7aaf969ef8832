"""Service classes over loopback: two replicas sharing Redis keep the interactive limit exact; the class is chosen
by header or service_tier and validated; the client sees its own speed."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from gateway.config import FleetConfig
from gateway.sim import SimConfig

from ..conftest import REDIS_URL


def one_gpu_fleet(url: str, floor: float) -> FleetConfig:
    # t(n) = 0.01 + 0.005 n seconds per token: a floor of 36 tok/s allows n <= (0.0278 - 0.01) / 0.005 = 3.56, i.e. 3
    # (with room for an 18% slower simulator on a busy machine).
    return FleetConfig.model_validate({
        "upstreams": {"gpu": {"base_url": url + "/v1", "model": "sim-gpu", "max_concurrency": 16,
                              "capacity": {"a": 0.01, "b": 0.005, "ttft": 0.05}}},
        "models": {"m": {"upstreams": ["gpu"], "classes": {"interactive": {"min_tok_s": floor, "wait_s": 30.0}}}},
    })


async def test_two_replicas_keep_the_interactive_limit_exact(start_sims, start_gateway, redis_prefix, redis_client):
    sims = await start_sims({"gpu": SimConfig(name="sim-gpu", mode="gpu", base_step=0.01, per_seq=0.005, slots=16)})
    cfg = one_gpu_fleet(sims.url("gpu"), floor=36.0)
    common = dict(redis_url=REDIS_URL, redis_prefix=redis_prefix, flush_interval=0.05)
    gws = [await start_gateway(cfg, **common) for _ in range(2)]
    for gw in (*gws, gws[0]):  # both replicas heartbeat: each knows the other is there
        await gw.sync()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}

    async def one(session: aiohttp.ClientSession, gw_url: str) -> int:
        async with session.post(gw_url + "/v1/chat/completions", json=body) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession() as s:
        statuses = await asyncio.gather(*(one(s, gws[i % 2].url) for i in range(12)))
        async with s.get(sims.url("gpu") + "/sim/stats") as r:
            stats = await r.json()
    assert statuses == [200] * 12
    assert stats["inflight_peak"] <= 3, f"interactive limit n_f = 3 exceeded across replicas: {stats['inflight_peak']}"
    assert stats["completed"] == 12


async def test_class_selection_errors_and_speed_headers(sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config())
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "hello"}]
    raw = await client.chat.completions.with_raw_response.create(model="fleet-model", messages=msgs, max_tokens=8)
    h = raw.headers
    assert h["x-gateway-class"] == "interactive" and h["x-gateway-upstream"] in sim_fleet.ports
    assert float(h["x-gateway-latency-ms"]) > 0 and "x-request-id" in h
    raw = await client.chat.completions.with_raw_response.create(
        model="fleet-model", messages=msgs, max_tokens=8, service_tier="flex"
    )
    assert raw.headers["x-gateway-class"] == "batch"
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model="fleet-model", messages=msgs, max_tokens=8, extra_headers={"X-Gateway-Class": "platinum"}
        )
    assert e.value.code == "invalid_service_class"
    # Streams: the SDK reads straight through the SSE comment that carries the request's own speed.
    stream = await client.chat.completions.create(model="fleet-model", messages=msgs, max_tokens=8, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    async with aiohttp.ClientSession() as s, s.post(
        gw.url + "/v1/chat/completions", json={"model": "fleet-model", "messages": msgs, "max_tokens": 8, "stream": True},
        headers={"x-request-id": "req-abc"},
    ) as r:
        body = await r.read()
        assert r.headers["x-request-id"] == "req-abc" and r.headers["x-gateway-class"] == "interactive"
    assert b"\n: gateway upstream=" in b"\n" + body and b"ttft_ms=" in body
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/v1/gateway/upstreams") as r:
        snap = await r.json()
    assert snap["slo"]["classes"]["fleet-model"]["interactive"]["requests"] >= 2


async def test_a_keys_default_class_applies_unless_the_request_names_one(sim_fleet, start_gateway):
    admin = {"Authorization": "Bearer adm-secret"}
    gw = await start_gateway(sim_fleet.config(), admin_key="adm-secret", require_api_key=True)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/admin/keys", json={"name": "offline", "service_class": "batch"}, headers=admin) as r:
            assert r.status == 201
            key = (await r.json())["key"]
        async with s.post(gw.url + "/admin/keys", json={"name": "bad", "service_class": "not a class"}, headers=admin) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "service_class"
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    msgs = [{"role": "user", "content": "hello"}]
    raw = await client.chat.completions.with_raw_response.create(model="fleet-model", messages=msgs, max_tokens=4)
    assert raw.headers["x-gateway-class"] == "batch"
    raw = await client.chat.completions.with_raw_response.create(
        model="fleet-model", messages=msgs, max_tokens=4, extra_headers={"X-Gateway-Class": "interactive"}
    )
    assert raw.headers["x-gateway-class"] == "interactive"
