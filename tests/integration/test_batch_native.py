"""Batches forwarded to a hosted provider's native Batch API (gateway/batch/native.py), end to end: the official
openai SDK against a real gateway, real Redis, and the hosted simulator's own Files + Batches API on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp
import openai
import pytest

from gateway.config import FleetConfig
from gateway.cost import Tokens, request_cost_micros
from gateway.sim.batches import NATIVE
from gateway.sim.reference import sims_with
from tests.conftest import REDIS_URL
from tests.integration.test_batch import chat_line, client, jsonl, lines_of, upload, wait_final

UPSTREAM_KEY = "sk-upstream-native-secret-0001"
ADMIN = "adm_native_batch_key_1"


def native_fleet(sim_fleet, poll_s: float = 0.1) -> FleetConfig:
    """The reference fleet whose pool forwards batches to the hosted upstream (which needs its API key)."""
    raw = sim_fleet.config().model_dump()
    raw["upstreams"]["hosted"]["api_key_env"] = "GW_TEST_NATIVE_KEY"
    raw["models"]["fleet-model"]["native_batch"] = {"upstream": "hosted", "poll_s": poll_s, "poll_max_s": 0.5}
    return FleetConfig.model_validate(raw)


@pytest.fixture
async def fleet(start_sims, monkeypatch):
    monkeypatch.setenv("GW_TEST_NATIVE_KEY", UPSTREAM_KEY)
    return await start_sims(sims_with(hosted={"api_key": UPSTREAM_KEY}))


async def keys(gw, *names: str) -> list[dict]:
    out = []
    async with aiohttp.ClientSession() as s:
        for name in names:
            async with s.post(gw.url + "/admin/keys", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 201
                out.append(await r.json())
    return out


async def test_forwarded_batch_round_trip(fleet, start_gateway, redis_client, redis_prefix):
    gw = await start_gateway(native_fleet(fleet), redis_url=REDIS_URL, redis_prefix=redis_prefix,
                             require_api_key=True, admin_key=ADMIN, batch_sweep_interval=0.5)
    alice_rec, bob_rec = await keys(gw, "alice", "bob")
    alice, bob = client(gw.url, alice_rec["key"]), client(gw.url, bob_rec["key"])
    rows = [chat_line(i) for i in range(20)] + [chat_line(99, model="no-such-model")]  # one line fails locally
    b = await alice.batches.create(input_file_id=await upload(alice, jsonl(rows)), endpoint="/v1/chat/completions",
                                   completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await bob.batches.retrieve(b.id)
    done, seen = await wait_final(alice, b.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 21 and done.request_counts.completed == 20 and done.request_counts.failed == 1
    out, err = await lines_of(alice, done.output_file_id), await lines_of(alice, done.error_file_id)
    ids = Counter(o["custom_id"] for o in out + err)
    assert ids == Counter(r["custom_id"] for r in rows)  # every custom_id exactly once
    assert [e["error"]["code"] for e in err] == ["model_not_found"]
    for o in out:  # answered by the hosted sim, with the upstream's model name rewritten into each line
        assert o["response"]["status_code"] == 200 and o["response"]["body"]["model"] == "sim-hosted"
        assert o["response"]["body"]["choices"][0]["message"]["content"]
    # The provider saw one upload (the 20 runnable lines, model rewritten) and one batch, which completed.
    native = fleet.apps["hosted"][NATIVE]
    [sim_batch] = native.batches.values()
    assert sim_batch.status == "completed" and sim_batch.counts == {"total": 20, "completed": 20, "failed": 0}
    sent = [json.loads(ln) for ln in native.files[sim_batch.input_file_id].content.splitlines()]
    assert sorted(x["custom_id"] for x in sent) == sorted(r["custom_id"] for r in rows[:20])
    assert {x["body"]["model"] for x in sent} == {"sim-hosted"}
    for name in ("fast-gpu", "slow-gpu"):  # nothing ran on the fleet's own servers
        assert fleet.apps[name]["sim"].completed == 0
    # Charged once per line to alice, at the hosted upstream's batch prices.
    price = gw.runtime.fleet.config.upstreams["hosted"].price
    want = sum(request_cost_micros(price, Tokens(u["prompt_tokens"], 0, u["completion_tokens"]), batch=True)
               for u in (o["response"]["body"]["usage"] for o in out))
    assert want > 0 and round(gw.runtime.ledger.spent(alice_rec["id"])[0] * 1e6) == want
    with pytest.raises(openai.NotFoundError):
        await bob.files.content(done.output_file_id)
    # The upstream key is nowhere in what the gateway stored.
    async for k in redis_client.scan_iter(f"{redis_prefix}:bb:*"):
        if (await redis_client.type(k)) == b"hash":
            assert UPSTREAM_KEY.encode() not in b"".join(v for v in (await redis_client.hgetall(k)).values())


async def test_cancel_reaches_the_provider(fleet, start_gateway, redis_client, redis_prefix):
    gw = await start_gateway(native_fleet(fleet), redis_url=REDIS_URL, redis_prefix=redis_prefix, batch_sweep_interval=0.5)
    c = client(gw.url)
    rows = [chat_line(i, max_tokens=60) for i in range(48)]  # ~1.4 s each on the hosted sim, 8 at a time
    b = await c.batches.create(input_file_id=await upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while (await c.batches.retrieve(b.id)).request_counts.completed < 1:  # the provider's progress, mirrored
        assert time.monotonic() < deadline, "the provider completed nothing"
        await asyncio.sleep(0.1)
    assert (await c.batches.cancel(b.id)).status == "cancelling"
    done, _ = await wait_final(c, b.id, timeout=30)
    assert done.status == "cancelled", done
    [sim_batch] = fleet.apps["hosted"][NATIVE].batches.values()
    assert sim_batch.status == "cancelled"
    out, err = await lines_of(c, done.output_file_id), await lines_of(c, done.error_file_id)
    assert Counter(o["custom_id"] for o in out + err) == Counter(r["custom_id"] for r in rows)
    assert 1 <= len(out) < len(rows) and {e["error"]["code"] for e in err} == {"batch_cancelled"}
    assert done.request_counts.completed == len(out) and done.request_counts.failed == len(err)


@pytest.mark.parametrize("id_recorded", [True, False])
async def test_another_replica_takes_over_the_provider_batch(fleet, start_gateway, redis_client, redis_prefix, id_recorded):
    """The replica driving a native batch dies after submitting it: once its lease is gone (expiry, simulated by
    deleting it), another replica's sweeper polls the same provider batch (nothing is submitted twice), also when
    the replica died before recording the provider's batch id (found again by its metadata)."""
    settings = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix, "batch_sweep_interval": 0.3}
    a = await start_gateway(native_fleet(fleet), **settings)
    c = client(a.url)
    rows = [chat_line(i, max_tokens=30) for i in range(32)]
    b = await c.batches.create(input_file_id=await upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while not await redis_client.hget(f"{redis_prefix}:bb:{b.id}", "up_batch"):
        assert time.monotonic() < deadline, "never submitted"
        await asyncio.sleep(0.05)
    await a.stop()
    assert await redis_client.delete(f"{redis_prefix}:bb:{b.id}:nat") == 1  # the dead replica's lease
    if not id_recorded:
        assert await redis_client.hdel(f"{redis_prefix}:bb:{b.id}", "up_batch") == 1
    other = await start_gateway(native_fleet(fleet), **settings)
    done, _ = await wait_final(client(other.url), b.id, timeout=30)
    assert done.status == "completed" and done.request_counts.completed == len(rows)
    assert len(fleet.apps["hosted"][NATIVE].batches) == 1
    out = await lines_of(client(other.url), done.output_file_id)
    assert Counter(o["custom_id"] for o in out) == Counter(r["custom_id"] for r in rows)


async def test_sim_batch_api_embeddings_and_bad_input(start_sims):
    """The simulator's native batch API on its own: embeddings lines are answered like /v1/embeddings; a malformed
    input file fails the batch with its errors, as a provider's validation does."""
    sims = await start_sims(sims_with())
    base = f"http://127.0.0.1:{sims.ports['hosted']}/v1"
    good = jsonl([{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "x", "input": f"t{i}"}}
                  for i in range(3)])
    async with aiohttp.ClientSession() as s:
        async def run(data: bytes) -> dict:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", data, filename="in.jsonl")
            async with s.post(base + "/files", data=form) as r:
                fid = (await r.json())["id"]
            async with s.post(base + "/batches", json={"input_file_id": fid, "endpoint": "/v1/embeddings",
                                                       "completion_window": "24h"}) as r:
                bid = (await r.json())["id"]
            for _ in range(100):
                async with s.get(f"{base}/batches/{bid}") as r:
                    ub = await r.json()
                if ub["status"] in ("completed", "failed"):
                    return ub
                await asyncio.sleep(0.05)
            raise AssertionError(ub)

        ub = await run(good)
        assert ub["status"] == "completed" and ub["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        async with s.get(f"{base}/files/{ub['output_file_id']}/content") as r:
            out = [json.loads(ln) for ln in (await r.read()).splitlines()]
        assert sorted(o["custom_id"] for o in out) == ["e0", "e1", "e2"]
        assert all(len(o["response"]["body"]["data"][0]["embedding"]) == 8 for o in out)
        bad = await run(good + b"{not json\n")
        assert bad["status"] == "failed" and bad["errors"]["data"][0]["line"] == 4
