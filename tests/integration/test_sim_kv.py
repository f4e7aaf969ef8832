"""The KV-cache GPU simulator and hosted prompt caching over HTTP: cached_tokens, metrics, preemption, CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.routing import prefix
from gateway.sim import SimConfig, start_sim
from gateway.sim.hosted import HostedModel
from gateway.sim.kv_engine import KvEngine
from gateway.sim.profile import PRESETS
from gateway.sim.server import WORDS, add_sim_arguments, config_from_args

pytestmark = pytest.mark.timeout(30)

Sim = Callable[..., Awaitable[tuple[str, web.AppRunner]]]


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    """Factory: `url, runner = await sim(**SimConfig fields)`; runner.app["sim"] is the live model."""
    runners = []

    async def _start(**kw: Any) -> tuple[str, web.AppRunner]:
        runner, port = await start_sim(SimConfig(**kw))
        runners.append(runner)
        return f"http://127.0.0.1:{port}", runner

    yield _start
    for r in runners:
        await r.cleanup()


def long_text(words: int, salt: int = 0) -> str:
    return "".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(words))


def conversation(system_words: int, question: str, salt: int = 0) -> list[dict[str, str]]:
    return [{"role": "system", "content": long_text(system_words, salt)}, {"role": "user", "content": question}]


async def metric_samples(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(vllm:[a-z_]+)\{[^}]*\} ([0-9.e+-]+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def stream_ttft(client: openai.AsyncOpenAI, messages: list[dict[str, str]]) -> tuple[float, Any]:
    """Stream a chat completion; (seconds to the first content token, final usage)."""
    t0 = time.monotonic()
    ttft, usage = 0.0, None
    stream = await client.chat.completions.create(model="m", messages=messages, max_tokens=3, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if not ttft and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.monotonic() - t0
        usage = chunk.usage or usage
    return ttft, usage


async def test_prefix_cache_hit_reports_cached_tokens_and_cuts_ttft(sim: Sim) -> None:
    url, runner = await sim(preset="a10g-llama8b")  # slow prefill: a miss is long, a hit is not
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "warm"}], max_tokens=1)
    msgs = conversation(3000, "What is the answer?")
    ttft_miss, usage_miss = await stream_ttft(client, msgs)
    ttft_hit, usage_hit = await stream_ttft(client, msgs)
    n = usage_miss.prompt_tokens
    assert n == len(prefix.prompt_token_ids({"messages": msgs})) and n > 3000
    assert usage_miss.prompt_tokens_details.cached_tokens == 0
    assert usage_hit.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    assert ttft_hit < ttft_miss / 3, (ttft_hit, ttft_miss)
    # The next turn extends the conversation: its shared prefix hits (non-streamed usage too).
    turn2 = [*msgs, {"role": "assistant", "content": "Forty-two."}, {"role": "user", "content": "Why?"}]
    r = await client.chat.completions.create(model="m", messages=turn2, max_tokens=2)
    assert r.usage.prompt_tokens_details is not None
    assert (n - 1) // 16 * 16 <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    # What the simulator caches is exactly gateway.routing.prefix's chained hashes of the prompts it saw.
    engine = runner.app["sim"]
    assert isinstance(engine, KvEngine)
    expected = {h for body in ({"messages": [{"role": "user", "content": "warm"}]}, {"messages": msgs},
                               {"messages": turn2}) for h in prefix.prompt_block_hashes(body)[1]}
    assert engine.kv.cached_hashes() == expected
    await client.close()


async def test_anthropic_usage_reports_cache_reads(sim: Sim) -> None:
    url, _ = await sim(preset="h100-llama8b")
    body = {"model": "m", "max_tokens": 2, "system": long_text(500),
            "messages": [{"role": "user", "content": "hello"}]}
    async with aiohttp.ClientSession() as http:
        usages = []
        for _ in range(2):
            async with http.post(url + "/v1/messages", json=body) as r:
                assert r.status == 200
                usages.append((await r.json())["usage"])
    total = len(prefix.prompt_token_ids(body))
    assert usages[0] == {"input_tokens": total, "cache_read_input_tokens": 0, "output_tokens": 2}
    cached = (total - 1) // 16 * 16
    assert usages[1] == {"input_tokens": total - cached, "cache_read_input_tokens": cached, "output_tokens": 2}


async def test_kv_exhaustion_preempts_and_every_request_completes(sim: Sim) -> None:
    url, runner = await sim(kv_cache_tokens=320, base_step=0.002, per_seq=0.0, slots=8)  # 20 blocks
    body = {"model": "m", "max_tokens": 80}
    async with aiohttp.ClientSession() as http:
        before = await metric_samples(http, url)
        assert before["vllm:num_preemptions_total"] == 0 and before["vllm:kv_cache_usage_perc"] == 0

        async def one(i: int) -> dict[str, Any]:
            msgs = [{"role": "user", "content": long_text(50, salt=i)}]
            async with http.post(url + "/v1/chat/completions", json={**body, "messages": msgs}) as r:
                assert r.status == 200
                return await r.json()

        async def watch() -> float:
            peak = 0.0
            while True:
                peak = max(peak, (await metric_samples(http, url))["vllm:kv_cache_usage_perc"])
                if peak > 0.7:
                    return peak
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(one(i) for i in range(4)))
        peak = await asyncio.wait_for(watcher, 5)
        after = await metric_samples(http, url)
    assert all(r["usage"]["completion_tokens"] == 80 and r["choices"][0]["finish_reason"] == "length"
               for r in results)
    assert after["vllm:num_preemptions_total"] > 0 and runner.app["sim"].preemptions > 0
    assert 0.7 < peak <= 1.0 and after["vllm:kv_cache_usage_perc"] == 0.0
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:prefix_cache_queries_total"] >= after["vllm:prefix_cache_hits_total"] >= 0


async def test_request_beyond_the_kv_cache_is_a_clear_400(sim: Sim) -> None:
    url, _ = await sim(kv_cache_tokens=256)
    async with aiohttp.ClientSession() as http:
        msgs = [{"role": "user", "content": long_text(300)}]
        async with http.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 5}) as r:
            err = await r.json()
            assert r.status == 400 and err["error"]["code"] == "context_length_exceeded"
            assert "KV cache" in err["error"]["message"]
        async with http.post(url + "/v1/messages", json={"messages": msgs, "max_tokens": 5}) as r:
            err = await r.json()
            assert r.status == 400 and err["type"] == "error" and err["error"]["type"] == "invalid_request_error"


async def test_metrics_keep_the_names_the_engine_scraper_reads(sim: Sim) -> None:
    from gateway.sync.engine_metrics import parse_load

    url, _ = await sim(preset="h100-llama8b", name="llama")
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as r:
            text = await r.text()
    assert parse_load(text) == (0.0, 0.0)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "generation_tokens_total"):
        assert f'vllm:{name}{{model_name="llama"}} ' in text, name
    blocks = PRESETS["h100-llama8b"].kv_cache_tokens // 16
    assert f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="{blocks}",enable_prefix_caching="True"}} 1' in text


async def test_hosted_prompt_caching(sim: Sim) -> None:
    url, runner = await sim(mode="hosted", ttft=0.6, tok_s=200, prompt_cache_min_tokens=1024)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "warm"}], max_tokens=1)
    msgs = conversation(2000, "Summarise.")
    ttft_miss, miss = await stream_ttft(client, msgs)
    ttft_hit, hit = await stream_ttft(client, msgs)
    assert miss.prompt_tokens_details.cached_tokens == 0
    cached = hit.prompt_tokens_details.cached_tokens
    assert cached >= 1024 and cached % 128 == 0 and cached == miss.prompt_tokens // 128 * 128
    assert ttft_hit < 0.6 * ttft_miss, (ttft_hit, ttft_miss)
    short = conversation(300, "Short one.", salt=3)  # below the threshold: never cached
    for _ in range(2):
        r = await client.chat.completions.create(model="m", messages=short, max_tokens=1)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    model = runner.app["sim"]
    assert isinstance(model, HostedModel) and model.prompt_cache.hits == cached
    async with aiohttp.ClientSession() as http:
        samples = await metric_samples(http, url)
    assert samples["vllm:prefix_cache_hits_total"] == cached
    await client.close()


async def test_default_sims_report_no_cache_details(sim: Sim) -> None:
    """The old slot model and plain hosted sims keep their wire output (no prompt_tokens_details)."""
    for kw in ({}, {"mode": "hosted", "ttft": 0.01, "tok_s": 500}):
        url, _ = await sim(**kw)
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}) as r:
                body = await r.json()
        assert "prompt_tokens_details" not in body["usage"], json.dumps(body)


def test_cli_flags_for_the_kv_engine_and_prompt_caching() -> None:
    p = argparse.ArgumentParser()
    add_sim_arguments(p)
    cfg = config_from_args(p.parse_args(["--preset", "h100-llama8b", "--kv-cache-tokens", "50000",
                                         "--no-chunked-prefill", "--no-prefix-caching", "--spec-k", "4",
                                         "--spec-accept", "0.6", "--max-batched-tokens", "4096",
                                         "--block-size", "32"]))
    assert (cfg.preset, cfg.kv_cache_tokens, cfg.chunked_prefill, cfg.prefix_caching, cfg.spec_k,
            cfg.spec_accept, cfg.max_batched_tokens, cfg.block_size) == (
        "h100-llama8b", 50000, False, False, 4, 0.6, 4096, 32)
    engine = KvEngine(cfg)
    assert engine.capacity_tokens == 50000 // 32 * 32 and engine.budget == 4096 and engine.kv.block_size == 32
    cfg = config_from_args(p.parse_args(["--mode", "hosted", "--prompt-cache-min-tokens", "1024",
                                         "--prompt-cache-ttl", "60", "--prompt-cache-speedup", "0.5"]))
    assert (cfg.prompt_cache_min_tokens, cfg.prompt_cache_ttl, cfg.prompt_cache_speedup) == (1024, 60.0, 0.5)
    with pytest.raises(SystemExit):
        p.parse_args(["--preset", "nope"])
    assert "--spec-k" in p.format_help() and "speculative" in p.format_help()


async def test_calibrated_fleet_behind_the_gateway(start_sims: Any, start_gateway: Any) -> None:
    """The helper fleet serves through a real gateway: requests complete, the engine-metrics scraper
    reads the KV sims, and a repeated long prompt comes back with cached tokens on a GPU upstream."""
    from gateway.sim.reference import calibrated_fleet, calibrated_sims

    sims = calibrated_sims(kv_scale=0.1)
    assert all(s.kv_engine for n, s in sims.items() if n != "hosted")
    fleet = await start_sims(sims)
    gw = await start_gateway(calibrated_fleet(fleet.ports, sims))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    msgs = conversation(1500, "Go on.")
    usages = []
    for _ in range(6):
        r = await client.chat.completions.create(model="fleet-model", messages=msgs, max_tokens=4)
        assert r.usage is not None and r.usage.completion_tokens == 4
        usages.append(r.usage)
    engines = [fleet.apps[n]["sim"] for n in ("fast-gpu", "slow-gpu")]
    assert all(isinstance(e, KvEngine) for e in engines)
    assert sum(e.completed for e in engines) + fleet.apps["hosted"]["sim"].completed == 6
    assert sum(e.prefix_hits for e in engines) + fleet.apps["hosted"]["sim"].prefix_hits > 0
    # The gateway relays the upstreams' usage details; 6 requests over 3 upstreams: at least one repeat hits.
    details = [u.prompt_tokens_details for u in usages]
    assert all(d is not None for d in details) and details[0].cached_tokens == 0  # type: ignore[union-attr]
    assert any(d.cached_tokens for d in details if d is not None)
    await client.close()
