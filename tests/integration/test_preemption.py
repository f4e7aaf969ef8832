"""Preemption with resumption over loopback, through the real simulator: interactive requests take the slots of
running batch answers, and the batch clients (OpenAI SDK, streamed and not) still get one seamless answer."""

from __future__ import annotations

import asyncio

import aiohttp
import openai

from gateway.config import FleetConfig
from gateway.routing import classes
from gateway.sim import SimConfig
from gateway.tokens import count_text

MSGS = [{"role": "user", "content": "Tell me a long story about the sea and the ships that sail on it."}]
BATCH_TOKENS = 200


def fleet(url: str) -> FleetConfig:
    # t(n) = 0.01 + 0.005 n s per token: a 44 tok/s floor (+3% margin) allows n <= 2 sequences.
    return FleetConfig.model_validate({
        "upstreams": {"gpu": {"base_url": url + "/v1", "model": "sim-gpu", "max_concurrency": 16,
                              "capacity": {"a": 0.01, "b": 0.005, "ttft": 0.05}}},
        "models": {"m": {"upstreams": ["gpu"], "classes": {
            "interactive": {"min_tok_s": 44.0, "wait_s": 30.0},
            "batch": {"priority": 10, "min_share": 0.1, "max_preemptions": 2},
        }}},
    })


async def both_running(sim_url: str) -> None:
    """Wait until the simulator runs two sequences (the interactive limit), a little after the last one started."""
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            async with s.get(sim_url + "/sim/stats") as r:
                if (await r.json())["running"] == 2:
                    await asyncio.sleep(0.3)
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("the two batch answers never ran together")


async def test_preempted_batch_answers_resume_seamlessly(start_sims, start_gateway, monkeypatch):
    monkeypatch.setattr(classes, "PREEMPT_ROOM", 0)  # batch at the interactive limit: every arrival preempts
    sims = await start_sims({"gpu": SimConfig(name="sim-gpu", mode="gpu", base_step=0.01, per_seq=0.005, slots=16)})
    gw = await start_gateway(fleet(sims.url("gpu")))
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    batch = {"X-Gateway-Class": "batch"}
    probe = await client.chat.completions.create(model="m", messages=MSGS, max_tokens=1)
    prompt_tokens = probe.usage.prompt_tokens

    async def streamed() -> tuple[list, str]:
        stream = await client.chat.completions.create(
            model="m", messages=MSGS, max_tokens=BATCH_TOKENS, stream=True, stream_options={"include_usage": True},
            extra_headers=batch,
        )
        chunks = [c async for c in stream]
        return chunks, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    async def whole():
        return await client.chat.completions.create(model="m", messages=MSGS, max_tokens=BATCH_TOKENS, extra_headers=batch)

    async def preempting(victim):
        """A filler batch answer, then `victim` (it has written less: the cheaper to preempt), then an interactive
        request: it takes the victim's slot."""
        filler = asyncio.create_task(whole())
        await asyncio.sleep(0.5)
        task = asyncio.create_task(victim())
        await both_running(sims.url("gpu"))
        r = await client.chat.completions.create(model="m", messages=MSGS, max_tokens=8)
        assert r.choices[0].message.content
        assert count_text((await filler).choices[0].message.content) == BATCH_TOKENS
        return await task

    # A stream: one role chunk, one id/created/model throughout, every token once, usage of the whole answer.
    chunks, text = await preempting(streamed)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert count_text(text) == BATCH_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert (usage.completion_tokens, usage.prompt_tokens) == (BATCH_TOKENS, prompt_tokens)
    # A body: the whole answer's content and usage.
    body = await preempting(whole)
    assert count_text(body.choices[0].message.content) == BATCH_TOKENS and body.choices[0].finish_reason == "length"
    assert (body.usage.completion_tokens, body.usage.prompt_tokens) == (BATCH_TOKENS, prompt_tokens)
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        metrics = await r.text()
    assert 'gateway_preemptions_total{upstream="gpu"} 2.0' in metrics, [ln for ln in metrics.splitlines() if "gateway_preempt" in ln]
