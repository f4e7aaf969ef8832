"""GET /metrics on a live gateway after real traffic: GenAI histograms and per-upstream gauges."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import openai


async def test_metrics_after_traffic(gateway):
    c = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)

    async def one(i: int) -> None:
        s = await c.chat.completions.create(
            model="fleet-model", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8, stream=True
        )
        async for _ in s:
            pass

    await asyncio.gather(*(one(i) for i in range(12)))
    await gateway.sync()  # one fleet-sync cycle folds the counts into the windows
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        async with s.get(gateway.url + "/dashboard") as r:
            assert r.status == 200 and "<canvas" in await r.text()
    assert re.search(r'^gen_ai_client_token_usage_bucket\{.*gen_ai_token_type="output".*\} \d+', text, re.M)
    counts = re.findall(r"^gen_ai_client_operation_duration_seconds_count\{.*\} ([0-9.]+)$", text, re.M)
    assert sum(float(x) for x in counts) == 12  # one series per response model (upstream)
    assert "gen_ai_client_operation_time_to_first_chunk_seconds_bucket" in text
    m = re.findall(r'^gateway_upstream_tokens_per_second\{upstream="([^"]+)"\} ([0-9.]+)', text, re.M)
    assert {u for u, _ in m} == {"fast-gpu", "slow-gpu", "hosted"}
    assert sum(float(v) for _, v in m) > 0
    assert re.search(r'^gateway_upstream_inflight\{upstream="fast-gpu"\} 0', text, re.M)
    assert re.search(r'^gateway_queue_depth\{model="fleet-model"\} 0', text, re.M)
    assert "gateway_upstream_ejections_total" in text
