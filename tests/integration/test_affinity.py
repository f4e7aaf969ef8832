"""KV-cache affinity through a real gateway: two prefix-caching GPU simulators (identical engines, so only the
cache tells them apart) over loopback, the real openai SDK as the client, the engine-metrics scraper on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
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


async def ask(http: aiohttp.ClientSession, url: str, msgs: list[dict], max_tokens: int = 8, **extra: Any) -> tuple[str, int, int, str]:
    """A streamed chat completion (streams give the gateway real TTFT and decode samples);
    (upstream that served it, prompt tokens, cached tokens, answer)."""
    body = {"model": "m", "messages": msgs, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        upstream = r.headers["x-gateway-upstream"]
        answer, usage = "", None
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                answer += chunk["choices"][0]["delta"].get("content") or ""
            usage = chunk.get("usage") or usage
    assert usage is not None and usage["prompt_tokens_details"] is not None
    return upstream, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], answer


async def converse(http: aiohttp.ClientSession, url: str, salt: int, turns: int, key: str | None) -> list[tuple[str, int, int]]:
    """One conversation: a 1,200-word system prompt of its own, growing history; (upstream, prompt, cached) per turn."""
    msgs: list[Any] = [{"role": "system", "content": f"You are assistant {salt}. " + text(1200, salt)}]
    out = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"turn {t}: " + text(20, salt + t)})
        extra = {"prompt_cache_key": key} if key else {}
        upstream, prompt, cached, answer = await ask(http, url, msgs, **extra)
        out.append((upstream, prompt, cached))
        msgs.append({"role": "assistant", "content": answer})
    return out


async def test_multi_turn_conversations_stay_on_one_upstream_and_hit_its_cache(
    start_sims: StartSims, start_gateway: StartGateway
) -> None:
    sims = await start_sims({"gpu-a": SIM, "gpu-b": SIM})
    gw = await start_gateway(twin_fleet(sims.ports, True))
    async with aiohttp.ClientSession() as http:
        # Four conversations at once (two with a prompt_cache_key): their load makes a prefix-blind router alternate.
        convs = await asyncio.gather(*(converse(http, gw.url, 100 * i, 5, f"c{i}" if i % 2 else None) for i in range(4)))
        async with http.get(gw.url + "/v1/gateway/upstreams") as r:
            snap = {u["name"]: u for u in (await r.json())["upstreams"]}
        async with http.get(gw.url + "/metrics") as r:
            metrics = await r.text()
    # Conversations stay on their engine and every later turn reuses the history, except that affinity is a cost
    # term, not a rule: when the load gets lopsided (all four on one engine) a turn may move once.
    stayed = [a == b for turns in convs for (a, _, _), (b, _, _) in zip(turns, turns[1:])]
    reused = [c >= (p - 1) // 16 * 16 - 16 for turns in convs for (_, p, _), (_, _, c) in zip(turns, turns[1:])]
    assert sum(stayed) >= len(stayed) - 1 and sum(reused) >= len(reused) - 1, convs
    assert len({turns[0][0] for turns in convs}) == 2  # and the conversations are spread over both engines
    total_cached = sum(c for turns in convs for _, _, c in turns)
    seen = {n: s["cache"] for n, s in snap.items()}
    assert sum(c["cached_tokens"] for c in seen.values()) == total_cached
    assert all(c["requests"] > 0 and c["hit_rate"] > 0.5 and c["predicted_tokens"] > 0 for c in seen.values()), seen
    assert all(c["ttft_hit_ms"] < c["ttft_miss_ms"] for c in seen.values()), seen  # TTFT split by hit / miss
    for u, c in seen.items():  # the same figures on /metrics
        assert f'gateway_upstream_prefix_cached_tokens_total{{upstream="{u}"}} {c["cached_tokens"]}' in metrics
    # The engines' own counters agree.
    engines = [sims.apps[n]["sim"] for n in ("gpu-a", "gpu-b")]
    assert all(isinstance(e, KvEngine) for e in engines)
    assert sum(e.prefix_hits for e in engines) == total_cached


async def busy_turns(gw_url: str) -> list[tuple[str, int, int]]:
    """One conversation whose every later turn arrives while another request (a different prompt) runs on the
    engine the conversation started on: the load says 'go elsewhere', the cache says 'stay'."""
    msgs: list[Any] = [{"role": "system", "content": "You are the busy one. " + text(1200, 7)}]
    out = []
    async with aiohttp.ClientSession() as http:
        for t in range(4):
            msgs.append({"role": "user", "content": f"turn {t}: " + text(20, t)})
            background = None
            if t > 0:
                bg = [{"role": "user", "content": f"unrelated {t}"}]
                background = asyncio.create_task(ask(http, gw_url, bg, max_tokens=60))
                for _ in range(100):  # until the gateway dispatched it
                    async with http.get(gw_url + "/v1/gateway/upstreams") as r:
                        if sum(u["inflight"] for u in (await r.json())["upstreams"]):
                            break
                    await asyncio.sleep(0.02)
            upstream, prompt, cached, answer = await ask(http, gw_url, msgs)
            out.append((upstream, prompt, cached))
            msgs.append({"role": "assistant", "content": answer})
            if background is not None:
                await background
    return out


@pytest.mark.parametrize("affinity", [True, False])
async def test_cache_outweighs_a_little_load_and_blind_routing_loses_it(
    start_sims: StartSims, start_gateway: StartGateway, affinity: bool
) -> None:
    sims = await start_sims({"gpu-a": SIM, "gpu-b": SIM})
    gw = await start_gateway(twin_fleet(sims.ports, affinity))
    turns = await busy_turns(gw.url)
    first = turns[0][0]
    if affinity:
        assert all(u == first for u, _, _ in turns), turns
        assert all(c >= 1200 for _, _, c in turns[1:]), turns
    else:  # the same workload with affinity off (the pool's config switch): the turn flees the busy engine
        assert turns[1][0] != first and turns[1][2] == 0, turns  # a full prefill: that engine never saw it
