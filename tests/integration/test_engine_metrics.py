"""External load on a GPU server, read from its Prometheus metrics, is planned around."""

from __future__ import annotations

import asyncio

import aiohttp

from gateway.sync.engine_metrics import parse_load


def test_parse_vllm_and_sglang():
    text = """# HELP vllm:num_requests_running x
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_waiting{model_name="a"} 2
vllm:kv_cache_usage_perc{model_name="a"} 0.5
"""
    assert parse_load(text) == (3.0, 2.0)
    assert parse_load("sglang:num_running_reqs 7\nsglang:num_queue_reqs 1\n") == (7.0, 1.0)
    assert parse_load("other_metric 1\n") is None


async def test_scraper_sees_load_from_other_clients(sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config())
    fast = gw.proxy.fleet.upstreams["fast-gpu"]
    body = {"model": "x", "stream": True, "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        # Six streams straight to the GPU server, bypassing the gateway.
        resps = [await s.post(sim_fleet.url("fast-gpu") + "/v1/chat/completions", json=body) for _ in range(6)]
        for r in resps:
            await r.content.readline()
        for _ in range(40):
            await asyncio.sleep(0.1)
            if fast.external_load >= 6:
                break
        assert fast.external_load == 6
        assert fast.load == 6 and fast.inflight == 0
        for r in resps:
            r.close()
