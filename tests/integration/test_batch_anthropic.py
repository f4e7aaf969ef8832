"""Anthropic Message Batches on the batch engine, with the official anthropic SDK."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import anthropic
import pytest

from tests.conftest import REDIS_URL


@pytest.fixture(params=["redis", "dir"])
async def gw(request, redis_client, redis_prefix, sim_fleet, start_gateway, tmp_path):
    """Run once with file contents in Redis, once in a directory (the request list is stored as an input file)."""
    files = {"batch_files_dir": str(tmp_path / "files")} if request.param == "dir" else {}
    return await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, **files)


def req(i: int, model: str = "fleet-model", max_tokens: int = 6) -> dict:
    return {"custom_id": f"m-{i}", "params": {"model": model, "max_tokens": max_tokens,
                                              "messages": [{"role": "user", "content": f"hi {i}"}]}}


async def ended(c: anthropic.AsyncAnthropic, bid: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (b := await c.messages.batches.retrieve(bid)).processing_status != "ended":
        assert time.monotonic() < deadline, b
        await asyncio.sleep(0.2)
    return b


async def test_message_batch_round_trip(gw):
    c = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-ant-test", max_retries=0)
    b = await c.messages.batches.create(requests=[req(i) for i in range(5)] + [req(5, model="nope")])  # type: ignore[list-item]
    assert b.type == "message_batch" and b.processing_status == "in_progress" and b.results_url is None
    b = await ended(c, b.id)
    assert (b.request_counts.succeeded, b.request_counts.errored, b.request_counts.processing) == (5, 1, 0)
    assert b.ended_at is not None and b.results_url.endswith(f"/v1/messages/batches/{b.id}/results")
    results = {r.custom_id: r.result async for r in await c.messages.batches.results(b.id)}
    assert set(results) == {f"m-{i}" for i in range(6)}
    for i in range(5):
        ok = results[f"m-{i}"]
        assert ok.type == "succeeded" and ok.message.type == "message" and ok.message.usage.output_tokens == 6
    bad = results["m-5"]
    assert bad.type == "errored" and bad.error.error.type == "not_found_error"
    listed = [x.id async for x in c.messages.batches.list(limit=1)]
    assert listed == [b.id]


async def test_message_batch_cancel_and_errors(gw):
    c = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-ant-test", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as ei:
        await c.messages.batches.create(requests=[req(0), req(0)])  # type: ignore[list-item]
    assert "duplicate" in ei.value.message and ei.value.body["type"] == "error"
    with pytest.raises(anthropic.BadRequestError):
        await c.messages.batches.create(requests=[])
    with pytest.raises(anthropic.NotFoundError):
        await c.messages.batches.retrieve("msgbatch_nope")
    b = await c.messages.batches.create(requests=[req(i, max_tokens=80) for i in range(60)])  # type: ignore[list-item]
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/messages/batches/{b.id}/results") as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"  # still processing
    cb = await c.messages.batches.cancel(b.id)
    assert cb.processing_status in ("canceling", "ended") and cb.cancel_initiated_at is not None
    b = await ended(c, b.id)
    n = b.request_counts
    assert n.canceled > 0 and n.succeeded + n.canceled + n.errored == 60 and n.processing == 0
    kinds = [r.result.type async for r in await c.messages.batches.results(b.id)]
    assert len(kinds) == 60 and kinds.count("canceled") == n.canceled
