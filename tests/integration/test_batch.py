"""Batch and Files APIs end to end with the official openai SDK, against real gateways, simulators and Redis."""

from __future__ import annotations

import asyncio
import io
import json
import time

import openai
import pytest

from tests.conftest import REDIS_URL

MODEL = "fleet-model"


def client(url: str, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def chat_line(i: int, model: str = MODEL, max_tokens: int = 8) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": max_tokens}}


async def wait_final(c: openai.AsyncOpenAI, bid: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    seen = set()
    while time.monotonic() < deadline:
        b = await c.batches.retrieve(bid)
        seen.add(b.status)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b, seen
        await asyncio.sleep(0.2)
    raise AssertionError(f"batch {bid} not final after {timeout}s (statuses seen {seen})")


async def lines_of(c: openai.AsyncOpenAI, fid: str | None) -> list[dict]:
    if fid is None:
        return []
    content = await c.files.content(fid)
    return [json.loads(ln) for ln in content.content.splitlines() if ln.strip()]


@pytest.fixture
async def gw(sim_fleet, start_gateway, redis_prefix, redis_client):
    return await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix,
                               batch_claim_idle=2.0, batch_sweep_interval=0.5)


async def test_sdk_round_trip(gw):
    c = client(gw.url)
    rows = [chat_line(i) for i in range(30)]
    f = await c.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(rows)) and f.filename == "in.jsonl"
    assert (await c.files.retrieve(f.id)).id == f.id
    assert (await c.files.content(f.id)).content == jsonl(rows)
    b = await c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"job": "t1"})
    assert b.status == "validating" and b.metadata == {"job": "t1"}
    b, seen = await wait_final(c, b.id)
    assert b.status == "completed", b
    assert b.request_counts.total == 30 and b.request_counts.completed == 30 and b.request_counts.failed == 0
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.error_file_id is None
    out = await lines_of(c, b.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(r["custom_id"] for r in rows)
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        assert o["response"]["body"]["choices"][0]["message"]["content"]
        assert o["response"]["request_id"]
    out_file = await c.files.retrieve(b.output_file_id)
    assert out_file.purpose == "batch_output"
    deleted = await c.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        await c.files.retrieve(f.id)
