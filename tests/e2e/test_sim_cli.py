"""`gateway sim` with the KV-engine flags, as a real process: serves, caches prefixes, reports vLLM metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import openai
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(40)


async def test_sim_cli_kv_engine_serves_and_caches() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "sim", "--preset", "a10g-llama8b", "--kv-cache-tokens", "20000",
        "--spec-k", "3", "--spec-accept", "0.8", "--slots", "8", "--name", "llama", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=dict(os.environ))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"listening" in line, line
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        msgs = [{"role": "system", "content": " the of and" * 400}, {"role": "user", "content": "hi"}]
        t0 = time.monotonic()
        first = await c.chat.completions.create(model="llama", messages=msgs, max_tokens=20)  # type: ignore[arg-type]
        second = await c.chat.completions.create(model="llama", messages=msgs, max_tokens=20)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 15
        assert first.usage and second.usage and first.usage.completion_tokens == 20
        assert first.usage.prompt_tokens_details and first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details and second.usage.prompt_tokens_details.cached_tokens > 1000
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        assert 'vllm:prefix_cache_hits_total{model_name="llama"} ' in text
        assert 'vllm:num_preemptions_total{model_name="llama"} 0' in text
        assert 'num_gpu_blocks="1250"' in text
        await c.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            # ~0.2 s on a quiet machine; a fresh-clone run on a saturated one once took over 10 s
            await asyncio.wait_for(proc.wait(), 30)


async def test_sim_cli_rejects_inconsistent_kv_settings() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "sim", "--kv-cache-tokens", "0", "--port", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=dict(os.environ))
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and b"needs --kv-cache-tokens or a --preset" in out and b"Traceback" not in out
