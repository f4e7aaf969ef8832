"""Batch and Files APIs end to end with the official openai SDK, against real gateways, simulators and Redis.

Tests taking `backend` run once with file contents in Redis and once in a directory (GATEWAY_BATCH_FILES_DIR)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from gateway.http.batch_api import BATCH
from gateway.tools import top
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


@pytest.fixture(params=["redis", "dir"])
def backend(request, tmp_path) -> dict:
    """Gateway settings selecting one content store."""
    return {} if request.param == "redis" else {"batch_files_dir": str(tmp_path / "files")}


@pytest.fixture
async def gw(redis_client, redis_prefix, sim_fleet, start_gateway, backend):
    """A gateway on the shared Redis (torn down before the test keys are deleted)."""
    return await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix,
                               batch_claim_idle=2.0, batch_sweep_interval=0.5, **backend)


def content_dir(backend: dict, prefix: str) -> Path | None:
    return Path(backend["batch_files_dir"]) / prefix if backend else None


async def stored(backend: dict, redis_client, prefix: str, fid: str) -> bytes | None:
    """A file's content as the backend holds it, read behind the gateway's back (None: not stored)."""
    d = content_dir(backend, prefix)
    if d is not None:
        return (d / fid).read_bytes() if (d / fid).exists() else None
    chunks = await redis_client.lrange(f"{prefix}:bf:{fid}:c", 0, -1)
    return b"".join(chunks) if chunks else None


async def leftovers(backend: dict, redis_client, prefix: str) -> list:
    """Everything a file upload may leave in the backend: content keys/files and temporaries."""
    d = content_dir(backend, prefix)
    if d is not None:
        return sorted(p.name for p in d.iterdir())
    return [k async for k in redis_client.scan_iter(f"{prefix}:bf:*")]


async def test_sdk_round_trip(gw, backend, redis_client, redis_prefix):
    c = client(gw.url)
    rows = [chat_line(i) for i in range(30)]
    f = await c.files.create(file=("in.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(jsonl(rows)) and f.filename == "in.jsonl"
    assert await stored(backend, redis_client, redis_prefix, f.id) == jsonl(rows)  # in the configured backend
    assert await gw.app[BATCH].files.content.size(f.id) == f.bytes
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
    assert len(await stored(backend, redis_client, redis_prefix, b.output_file_id) or b"") == out_file.bytes > 0
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        metrics = await r.text()
    assert 'gateway_batch_lines_total{outcome="completed"} 30' in metrics, [m for m in metrics.splitlines() if "batch" in m]
    deleted = await c.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        await c.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        await c.files.content(f.id)
    assert await stored(backend, redis_client, redis_prefix, f.id) is None  # the content went with it


async def upload(c: openai.AsyncOpenAI, data: bytes, name: str = "in.jsonl") -> str:
    return (await c.files.create(file=(name, io.BytesIO(data)), purpose="batch")).id


async def test_cancel_lets_running_lines_finish(redis_client, redis_prefix, sim_fleet, start_gateway, backend):
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, batch_workers=2, **backend)
    c = client(gw.url)
    rows = [chat_line(i, max_tokens=60) for i in range(40)]
    b = await c.batches.create(input_file_id=await upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while (await c.batches.retrieve(b.id)).request_counts.completed < 2:
        assert time.monotonic() < deadline, "no line completed"
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as s:  # the progress summary the dashboard and `gateway top` read
        async with s.get(gw.url + "/v1/gateway/batches") as r:
            summary = await r.json()
    [mine] = [x for x in summary["batches"] if x["id"] == b.id]
    assert mine["status"] == "in_progress" and mine["total"] == 40 and mine["completed"] >= 2 and mine["pending"] > 0
    assert mine["tokens_per_second"] > 0 and mine["eta_seconds"] > 0
    frame = io.StringIO()
    assert await asyncio.to_thread(top.main, ["--url", gw.url, "--once"], out=frame) == 0
    [row] = [ln for ln in frame.getvalue().splitlines() if b.id in ln]
    assert "in_progress" in row and "/40" in row
    cb = await c.batches.cancel(b.id)
    assert cb.status == "cancelling" and cb.cancelling_at
    b, _ = await wait_final(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at
    out, err = await lines_of(c, b.output_file_id), await lines_of(c, b.error_file_id)
    assert 2 <= len(out) < 40 and len(out) + len(err) == 40
    assert b.request_counts.completed == len(out) and b.request_counts.failed == len(err)
    assert sorted(x["custom_id"] for x in out + err) == sorted(r["custom_id"] for r in rows)
    assert all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in err)
    with pytest.raises(openai.APIStatusError) as ei:  # a final batch cannot be cancelled
        await c.batches.cancel(b.id)
    assert ei.value.status_code == 409


async def test_list_pagination(gw):
    c = client(gw.url)
    fid = await upload(c, jsonl([chat_line(0)]))
    ids = []
    for _ in range(5):
        ids.append((await c.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")).id)
    page = await c.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    page2 = await c.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in page2.data] == ids[::-1][2:4]
    every = [b.id async for b in c.batches.list(limit=2)]  # the SDK's auto-pagination follows `after`
    assert every == ids[::-1]
    files = [f.id async for f in c.files.list(limit=1)]
    assert fid in files
    for bid in ids:
        await wait_final(c, bid)


async def test_bad_files_and_batches(gw):
    c = client(gw.url)
    with pytest.raises(openai.BadRequestError) as ei:
        await c.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert ei.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError):
        await c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    fid = await upload(c, jsonl([chat_line(0)]))
    with pytest.raises(openai.BadRequestError) as ei:
        await c.batches.create(input_file_id=fid, endpoint="/v1/responses", completion_window="24h")  # type: ignore[arg-type]
    assert ei.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as ei:
        await c.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="1h")  # type: ignore[arg-type]
    assert ei.value.body["param"] == "completion_window"
    with pytest.raises(openai.NotFoundError):
        await c.batches.retrieve("batch_nope")
    empty = await upload(c, b"\n\n")
    b = await c.batches.create(input_file_id=empty, endpoint="/v1/chat/completions", completion_window="24h")
    b, _ = await wait_final(c, b.id)
    assert b.status == "failed" and b.errors.data[0].code == "empty_file"


async def test_bad_lines_fail_the_batch_with_line_numbers(gw):
    c = client(gw.url)
    good = chat_line(0)
    rows = [
        json.dumps(good).encode(),
        b"{not json",
        json.dumps({**chat_line(2), "custom_id": None}).encode(),
        json.dumps(good).encode(),  # duplicate custom_id
        json.dumps({**chat_line(4), "method": "GET"}).encode(),
        json.dumps({**chat_line(5), "url": "/v1/embeddings"}).encode(),
    ]
    b = await c.batches.create(input_file_id=await upload(c, b"\n".join(rows) + b"\n"), endpoint="/v1/chat/completions",
                               completion_window="24h")
    b, _ = await wait_final(c, b.id)
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    got = [(e.line, e.code, e.param) for e in b.errors.data]
    assert got == [(2, "invalid_json_line", None), (3, "missing_required_parameter", "custom_id"),
                   (4, "duplicate_custom_id", "custom_id"), (5, "invalid_method", "method"), (6, "invalid_url", "url")]


async def test_unknown_model_and_oversize_body_fail_only_their_line(redis_client, redis_prefix, sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, max_body_bytes=2000)
    c = client(gw.url)
    big = chat_line(2)
    big["body"]["messages"][0]["content"] = "x" * 3000
    rows = [chat_line(0), chat_line(1, model="no-such-model"), big]
    b = await c.batches.create(input_file_id=await upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h")
    b, _ = await wait_final(c, b.id)
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (1, 2)
    err = {e["custom_id"]: e for e in await lines_of(c, b.error_file_id)}
    assert err["req-1"]["error"]["code"] == "model_not_found" and err["req-2"]["error"]["code"] == "request_too_large"
    assert [o["custom_id"] for o in await lines_of(c, b.output_file_id)] == ["req-0"]


async def test_file_limits(redis_client, redis_prefix, sim_fleet, start_gateway, backend):
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix,
                             batch_max_file_bytes=10_000, batch_max_lines=5, **backend)
    c = client(gw.url)
    with pytest.raises(openai.APIStatusError) as ei:
        await upload(c, b"x" * 20_000)
    assert ei.value.status_code == 413 and ei.value.body["code"] == "file_too_large"
    with pytest.raises(openai.BadRequestError) as ei:
        await upload(c, jsonl([chat_line(i) for i in range(6)]))
    assert ei.value.body["code"] == "too_many_requests"
    assert [f async for f in c.files.list()] == []  # nothing half-stored
    assert await leftovers(backend, redis_client, redis_prefix) == []


async def test_objects_belong_to_their_key(redis_client, redis_prefix, sim_fleet, start_gateway, backend):
    admin = "adm_batch_test_key_1"
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix,
                             require_api_key=True, admin_key=admin, **backend)
    keys = []
    async with aiohttp.ClientSession() as s:
        for name in ("alice", "bob"):
            async with s.post(gw.url + "/admin/keys", json={"name": name}, headers={"Authorization": f"Bearer {admin}"}) as r:
                assert r.status == 201
                keys.append((await r.json())["key"])
    alice, bob = client(gw.url, keys[0]), client(gw.url, keys[1])
    fid = await upload(alice, jsonl([chat_line(0), chat_line(1)]))
    b = await alice.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (bob.files.retrieve(fid), bob.files.content(fid), bob.files.delete(fid), bob.batches.retrieve(b.id),
                 bob.batches.cancel(b.id),
                 bob.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            await call
    assert [x async for x in bob.batches.list()] == [] and [x async for x in bob.files.list()] == []
    with pytest.raises(openai.AuthenticationError):
        await client(gw.url, "sk-wrong").files.list()
    done, _ = await wait_final(alice, b.id)  # the worker runs alice's lines although it holds no client key
    assert done.status == "completed" and done.request_counts.completed == 2
    with pytest.raises(openai.NotFoundError):
        await bob.files.content(done.output_file_id)
    assert len(await lines_of(alice, done.output_file_id)) == 2


async def test_ten_thousand_lines_upload_and_validate_fast(redis_client, redis_prefix, sim_fleet, start_gateway, backend):
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, batch_workers=0, **backend)
    c = client(gw.url)
    data = jsonl([chat_line(i) for i in range(10_000)])
    t0 = time.monotonic()
    fid = await upload(c, data)
    b = await c.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(400):
        if (b := await c.batches.retrieve(b.id)).status != "validating":
            break
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert b.status == "in_progress" and b.request_counts.total == 10_000
    assert elapsed < 10, f"upload + validation took {elapsed:.1f}s"
    assert await redis_client.xlen(f"{redis_prefix}:bq") == 10_000
    assert await stored(backend, redis_client, redis_prefix, fid) == data
    if not backend:
        chunks = await redis_client.lrange(f"{redis_prefix}:bf:{fid}:c", 0, -1)
        assert len(chunks) >= 2 and max(map(len, chunks)) < 2 * 1024 * 1024  # stored in bounded chunks of whole lines
    else:  # the 1 MiB reads of the directory store cut lines: validation found all 10,000 whole all the same
        assert len(data) > 1 << 20 and await leftovers(backend, redis_client, redis_prefix) == [fid]


async def test_lines_left_at_the_completion_window_expire(redis_client, redis_prefix, sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, batch_workers=2)
    c = client(gw.url)
    rows = [chat_line(i, max_tokens=60) for i in range(30)]
    b = await c.batches.create(input_file_id=await upload(c, jsonl(rows)), endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while (await c.batches.retrieve(b.id)).request_counts.completed < 2:
        assert time.monotonic() < deadline, "no line completed"
        await asyncio.sleep(0.1)
    await redis_client.hset(f"{redis_prefix}:bb:{b.id}", "expires_at", int(time.time()) - 1)  # the 24 h are over
    b, _ = await wait_final(c, b.id)
    assert b.status == "expired" and b.expired_at
    out, err = await lines_of(c, b.output_file_id), await lines_of(c, b.error_file_id)
    assert len(out) >= 2 and len(out) + len(err) == 30 and err
    assert all(e["error"]["code"] == "batch_expired" for e in err)


async def test_a_span_per_line_parents_the_request_span(redis_client, redis_prefix, sim_fleet, start_gateway, otlp_receiver,
                                                        monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix)
    c = client(gw.url)
    b = await c.batches.create(input_file_id=await upload(c, jsonl([chat_line(0), chat_line(1)])),
                               endpoint="/v1/chat/completions", completion_window="24h")
    await wait_final(c, b.id)
    lines = await otlp_receiver.wait_for(lambda s: s["name"] == f"batch_line {b.id}", count=2)
    assert sorted(s["attributes"]["gateway.batch.custom_id"] for s in lines) == ["req-0", "req-1"]
    assert all(s["attributes"]["gateway.batch.id"] == b.id and s["attributes"]["http.response.status_code"] == 200
               for s in lines)
    ids = {s["span_id"] for s in lines}
    served = await otlp_receiver.wait_for(lambda s: s["kind"] == "SERVER" and s["parent_span_id"] in ids, count=2)
    assert {s["trace_id"] for s in served} == {s["trace_id"] for s in lines}


async def test_uploads_are_not_bound_by_the_request_body_limit(redis_client, redis_prefix, sim_fleet, start_gateway, backend):
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, max_body_bytes=50_000, **backend)
    c = client(gw.url)
    data = jsonl([chat_line(i) for i in range(3000)])  # ~500 kB: ten times the JSON body limit
    f = await c.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.bytes == len(data) and (await c.files.content(f.id)).content == data


async def test_malformed_uploads_get_openai_errors(gw, redis_client, redis_prefix, backend):
    mp = {"Content-Type": "multipart/form-data; boundary=xx"}
    purpose = b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    file_part = b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{}\n'
    cases = [
        ({"Content-Type": "multipart/form-data"}, b"garbage", "invalid_request"),  # no boundary
        (mp, b"garbage", "invalid_request"),
        (mp, purpose + b"--xx--\r\n", "missing_required_parameter"),
        (mp, file_part + b"\r\n--xx--\r\n", "missing_required_parameter"),
        (mp, purpose + file_part, "invalid_request"),  # cut off before the closing boundary
        ({"Content-Type": "application/json"}, b"{}", "invalid_request"),
    ]
    async with aiohttp.ClientSession() as s:
        for headers, body, code in cases:
            async with s.post(gw.url + "/v1/files", data=body, headers=headers) as r:
                err = (await r.json())["error"]
                assert r.status == 400 and err["code"] == code and err["type"] == "invalid_request_error", (body, err)
    assert [k async for k in redis_client.scan_iter(f"{redis_prefix}:bf:*")] == []  # nothing half-stored
    assert await leftovers(backend, redis_client, redis_prefix) == []


async def test_consumers_of_long_gone_replicas_are_pruned(gw, redis_client, redis_prefix):
    from gateway.batch.keys import GROUP

    worker = gw.app[BATCH].worker
    queue = f"{redis_prefix}:bq"
    await redis_client.xgroup_createconsumer(queue, GROUP, "dead-replica")
    await asyncio.sleep(0.1)
    assert await worker.prune_consumers(idle_s=0.05) == 1
    names = {c["name"] for c in await redis_client.xinfo_consumers(queue, GROUP)}
    assert b"dead-replica" not in names


async def test_upload_memory_does_not_grow_with_the_file(gw):
    import tracemalloc

    c = client(gw.url)
    pad = "x" * 2000
    data = jsonl([{**chat_line(i), "body": {"model": MODEL, "messages": [{"role": "user", "content": pad}]}} for i in range(10_000)])
    assert len(data) > 20_000_000
    tracemalloc.start()
    try:
        f = await c.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f.bytes == len(data)
    # client and server share this process: the whole upload path allocated far less than the 20 MB file
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB for a {len(data) / 1e6:.1f} MB file"


async def test_cancel_while_validating(gw, redis_client, redis_prefix):
    c = client(gw.url)
    fid = await upload(c, jsonl([chat_line(i) for i in range(3000)]))
    b = await c.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    cb = await c.batches.cancel(b.id)  # validation of 3,000 lines is still under way
    assert cb.status == "cancelled" and cb.cancelled_at and cb.cancelling_at, cb
    lease, queue = f"{redis_prefix}:bb:{b.id}:val", f"{redis_prefix}:bq"
    for _ in range(100):  # validation stops; whatever it queued before it saw the cancel is dropped by the workers
        if not await redis_client.exists(lease) and await redis_client.xlen(queue) == 0:
            break
        await asyncio.sleep(0.1)
    assert not await redis_client.exists(lease) and await redis_client.xlen(queue) == 0
    b = await c.batches.retrieve(b.id)
    assert b.status == "cancelled" and b.output_file_id is None and b.request_counts.completed == 0
    ttl = await redis_client.ttl(f"{redis_prefix}:bb:{b.id}:res")
    assert ttl == -2 or ttl > 0  # absent or expiring with the batch, never kept forever


async def test_retention_removes_files_and_their_contents(redis_client, redis_prefix, sim_fleet, start_gateway, backend):
    gw = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, batch_retention=3,
                             batch_sweep_interval=0.5, batch_files_sweep_interval=0.2, **backend)
    c = client(gw.url)
    fid = await upload(c, jsonl([chat_line(0), chat_line(1)]))
    b = await c.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    b, _ = await wait_final(c, b.id)
    assert b.status == "completed"
    ids = [fid, b.output_file_id]
    assert all([await stored(backend, redis_client, redis_prefix, x) for x in ids])
    deadline = time.monotonic() + 20
    while [x for x in ids if await stored(backend, redis_client, redis_prefix, x) is not None]:
        assert time.monotonic() < deadline, f"contents still stored: {await leftovers(backend, redis_client, redis_prefix)}"
        await asyncio.sleep(0.2)
    for x in ids:
        with pytest.raises(openai.NotFoundError):
            await c.files.retrieve(x)
    assert [f async for f in c.files.list()] == [] and await leftovers(backend, redis_client, redis_prefix) == []


async def test_replicas_share_one_files_directory(redis_client, redis_prefix, sim_fleet, start_gateway, tmp_path):
    shared = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix, "batch_files_dir": str(tmp_path / "shared")}
    api = await start_gateway(sim_fleet.config(), batch_workers=0, **shared)
    runner = await start_gateway(sim_fleet.config(), batch_sweep_interval=0.5, **shared)
    ca, cr = client(api.url), client(runner.url)
    data = jsonl([chat_line(i) for i in range(20)])
    fid = await upload(ca, data)
    assert (await cr.files.content(fid)).content == data
    b = await cr.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    done, _ = await wait_final(ca, b.id)
    assert done.status == "completed" and len(await lines_of(ca, done.output_file_id)) == 20  # written by the runner
    await ca.files.delete(done.output_file_id)
    with pytest.raises(openai.NotFoundError):
        await cr.files.content(done.output_file_id)
    assert sorted(p.name for p in (tmp_path / "shared" / redis_prefix).iterdir()) == [fid]
