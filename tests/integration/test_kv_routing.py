"""The gateway keeps a KV-bound engine out of preemption: capacity learned from its vllm:cache_config_info, in-flight
KV tokens (prompt + expected output) held under it, while the same load sent directly makes the engine preempt."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import openai

from gateway.config import FleetConfig
from gateway.sim.reference import calibrated_sims
from tests.integration.test_sim_kv import conversation, metric_samples

PROMPT_WORDS = 1000
OUTPUT = 120
CONCURRENT = 6


def _sim() -> Any:
    # The A10G preset with a ~4,200-token KV cache: four 1,000-token prompts fit at admission, their outputs do not.
    return replace(calibrated_sims(kv_scale=0.1)["slow-gpu"], slots=16)


async def _burst(base_url: str, model: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
    try:
        rs = await asyncio.gather(*(
            client.chat.completions.create(model=model, messages=conversation(PROMPT_WORDS, "Go on.", salt=i),
                                           max_tokens=OUTPUT)
            for i in range(CONCURRENT)))
        assert all(r.usage is not None and r.usage.completion_tokens == OUTPUT for r in rs)
    finally:
        await client.close()


async def test_direct_load_preempts_but_through_the_gateway_it_does_not(start_sims: Any, start_gateway: Any) -> None:
    direct = await start_sims({"kv": _sim()})
    async with aiohttp.ClientSession() as http:
        await _burst(direct.url("kv") + "/v1", "sim-slow")
        assert (await metric_samples(http, direct.url("kv")))["vllm:num_preemptions_total"] > 0

        fleet = await start_sims({"kv": _sim()})
        cfg = FleetConfig.model_validate({
            "upstreams": {"kv": {"kind": "gpu", "base_url": fleet.url("kv") + "/v1", "model": "sim-slow",
                                 "metrics_url": fleet.url("kv") + "/metrics", "max_concurrency": 16}},
            "models": {"m": {"upstreams": ["kv"]}},
        })
        gw = await start_gateway(cfg, queue_timeout=60)
        u = gw.proxy.fleet.upstreams["kv"]
        engine = fleet.apps["kv"]["sim"]
        for _ in range(50):  # the scraper learns the capacity from vllm:cache_config_info
            if u.kv_capacity:
                break
            await asyncio.sleep(0.1)
        assert u.kv_capacity == engine.kv.num_blocks * engine.kv.block_size
        await _burst(gw.url + "/v1", "m")
        assert (await metric_samples(http, fleet.url("kv")))["vllm:num_preemptions_total"] == 0
        assert engine.completed == CONCURRENT and u.endpoint.kv_local == 0
