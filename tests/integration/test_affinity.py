"""KV-cache affinity through a real gateway: two prefix-caching GPU simulators (identical engines, so only the
cache tells them apart) over loopback, the real openai SDK as the client, the engine-metrics scraper on."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.sim import SimConfig
from gateway.sim.kv_engine import KvEngine
from gateway.sim.server import WORDS
from gateway.sim.virtual import capacity_hint
from tests.conftest import StartGateway, StartSims

pytestmark = pytest.mark.timeout(60)

SIM = SimConfig(name="kv", mode="gpu", preset="a10g-llama8b", slots=16, kv_cache_tokens=60_000)


def text(words: int, salt: int) -> str:
    return "".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(words))


def twin_fleet(ports: dict[str, int], affinity: bool) -> FleetConfig:
    hint = capacity_hint(SIM)
    ups = {
        n: UpstreamConfig(name=n, base_url=f"http://127.0.0.1:{p}/v1", metrics_url=f"http://127.0.0.1:{p}/metrics",
                          max_concurrency=SIM.slots, capacity=hint)
        for n, p in ports.items()
    }
    return FleetConfig(upstreams=ups, models={"m": ModelConfig(upstreams=list(ups), strategy="throughput", affinity=affinity)})


async def converse(client: openai.AsyncOpenAI, salt: int, turns: int, key: str | None) -> list[tuple[str, int, int]]:
    """One conversation: a 1,200-word system prompt of its own, growing history; (upstream, prompt, cached) per turn."""
    msgs: list[Any] = [{"role": "system", "content": f"You are assistant {salt}. " + text(1200, salt)}]
    out = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"turn {t}: " + text(20, salt + t)})
        extra = {"prompt_cache_key": key} if key else {}
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=msgs, max_tokens=8, extra_body=extra)
        r = raw.parse()
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        out.append((raw.headers["x-gateway-upstream"], r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens or 0))
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
    return out


async def run(start_sims: StartSims, start_gateway: StartGateway, affinity: bool) -> tuple[list, dict, dict]:
    sims = await start_sims({"gpu-a": SIM, "gpu-b": SIM})
    gw = await start_gateway(twin_fleet(sims.ports, affinity))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    try:
        # Four conversations at once: the load they put on the engines makes a prefix-blind router alternate.
        convs = await asyncio.gather(*(converse(client, 100 * i, 5, f"c{i}" if i % 2 else None) for i in range(4)))
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/v1/gateway/upstreams") as r:
            snap = {u["name"]: u for u in (await r.json())["upstreams"]}
    finally:
        await client.close()
    engines = {n: sims.apps[n]["sim"] for n in ("gpu-a", "gpu-b")}
    assert all(isinstance(e, KvEngine) for e in engines.values())
    hits = {n: (e.prefix_hits, e.prefix_queries) for n, e in engines.items()}
    return convs, snap, hits


async def test_multi_turn_conversations_stay_on_one_upstream_and_hit_its_cache(
    start_sims: StartSims, start_gateway: StartGateway
) -> None:
    convs, snap, hits = await run(start_sims, start_gateway, affinity=True)
    for turns in convs:
        assert len({u for u, _, _ in turns}) == 1, turns  # the whole conversation on one engine
        for (_, prev_prompt, _), (_, _, cached) in zip(turns, turns[1:]):
            assert cached >= (prev_prompt - 1) // 16 * 16 - 16, turns  # every later turn reuses the history
    assert len({turns[0][0] for turns in convs}) == 2  # and the conversations are spread over both engines
    total_cached = sum(c for turns in convs for _, _, c in turns)
    seen = {n: s["cache"] for n, s in snap.items()}
    assert sum(c["cached_tokens"] for c in seen.values()) == total_cached
    assert all(c["requests"] > 0 and c["hit_rate"] > 0.5 and c["predicted_tokens"] > 0 for c in seen.values()), seen
    assert all(c["ttft_miss_ms"] is None for c in seen.values())  # non-streamed: no TTFT split recorded
    # The gateway's figures agree with the engines' own counters.
    engine_rate = sum(h for h, _ in hits.values()) / sum(q for _, q in hits.values())
    assert engine_rate > 0.6


async def busy_turns(gw_url: str, affinity_on: bool) -> list[tuple[str, int, int]]:
    """One conversation whose every later turn arrives while another request (a different prompt) runs on the
    engine the conversation started on: the load says 'go elsewhere', the cache says 'stay'."""
    client = openai.AsyncOpenAI(base_url=gw_url + "/v1", api_key="x", max_retries=0)
    msgs: list[Any] = [{"role": "system", "content": "You are the busy one. " + text(1200, 7)}]
    out = []
    try:
        for t in range(4):
            msgs.append({"role": "user", "content": f"turn {t}: " + text(20, t)})
            background = None
            if t > 0:
                bg = [{"role": "user", "content": f"unrelated {t}"}]
                background = asyncio.create_task(client.chat.completions.create(model="m", messages=bg, max_tokens=60))
                async with aiohttp.ClientSession() as http:
                    for _ in range(100):  # until the gateway dispatched it
                        async with http.get(gw_url + "/v1/gateway/upstreams") as r:
                            if sum(u["inflight"] for u in (await r.json())["upstreams"]):
                                break
                        await asyncio.sleep(0.02)
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=msgs, max_tokens=8)
            r = raw.parse()
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            out.append((raw.headers["x-gateway-upstream"], r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens or 0))
            msgs.append({"role": "assistant", "content": r.choices[0].message.content})
            if background is not None:
                await background
    finally:
        await client.close()
    return out


@pytest.mark.parametrize("affinity", [True, False])
async def test_cache_outweighs_a_little_load_and_blind_routing_loses_it(
    start_sims: StartSims, start_gateway: StartGateway, affinity: bool
) -> None:
    sims = await start_sims({"gpu-a": SIM, "gpu-b": SIM})
    gw = await start_gateway(twin_fleet(sims.ports, affinity))
    turns = await busy_turns(gw.url, affinity)
    first = turns[0][0]
    if affinity:
        assert all(u == first for u, _, _ in turns), turns
        assert all(c >= 1200 for _, _, c in turns[1:]), turns
    else:  # the same workload with affinity off (the pool's config switch): each turn flees the busy engine
        assert all(u != first for u, _, _ in turns[1:]), turns
        assert turns[1][2] == 0, turns  # a full prefill: the other engine never saw this conversation
