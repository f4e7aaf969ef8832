"""Batches survive a replica killed with SIGKILL mid-batch and a Redis restart mid-batch: every custom_id ends up
exactly once across the output and error files. A line whose replica dies again and again is not retried forever."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import IO

import aiohttp
import openai
import pytest
import yaml

from gateway.batch.keys import GROUP
from tests.conftest import REDIS_URL, free_port
from tests.integration.test_batch import chat_line, client, jsonl, lines_of, upload, wait_final
from tests.redis_server import RedisServer

N_LINES = 120


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


async def start_replica(tmp: Path, fleet: dict, redis_url: str, prefix: str, name: str,
                        extra_env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    cfg = tmp / "fleet.yaml"
    cfg.write_text(yaml.safe_dump(fleet, sort_keys=False))
    port = free_port()
    env = {**os.environ, "GATEWAY_REDIS_URL": redis_url, "GATEWAY_REDIS_PREFIX": prefix, "GATEWAY_REPLICA_ID": name,
           "GATEWAY_BATCH_CLAIM_IDLE": "2", "GATEWAY_BATCH_SWEEP_INTERVAL": "0.5", "GATEWAY_BATCH_WORKERS": "4",
           "GATEWAY_SHUTDOWN_GRACE": "1", "GATEWAY_LOG_LEVEL": "WARNING", **(extra_env or {})}
    with _log_file(tmp / f"{name}.log") as log:  # the child keeps its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port), "--config", str(cfg), "--workers", "1",
            stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while True:
            assert proc.returncode is None, (tmp / f"{name}.log").read_text()
            try:
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        return proc, url
            except (aiohttp.ClientError, OSError):
                pass
            assert time.monotonic() < deadline, "replica did not become ready"
            await asyncio.sleep(0.1)


def exactly_once(out: list[dict], err: list[dict]) -> None:
    ids = [x["custom_id"] for x in out + err]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(N_LINES)), f"{len(ids)} results, {len(set(ids))} distinct"


@pytest.mark.parametrize("files", ["redis", "dir"])
async def test_kill_9_of_one_replica_mid_batch(sim_fleet, tmp_path, files):
    """With "dir" both replicas share one files directory: the input B uploaded is read by A, which builds the
    output files after B died."""
    env = {"GATEWAY_BATCH_FILES_DIR": str(tmp_path / "files")} if files == "dir" else {}
    redis = RedisServer()
    await redis.start()
    prefix = f"gwtest-{uuid.uuid4().hex[:8]}"
    fleet = sim_fleet.config().model_dump(mode="json", exclude={"upstreams": {"__all__": {"name"}}})
    procs = []
    try:
        for name in ("rep-a", "rep-b"):
            procs.append(await start_replica(tmp_path, fleet, redis.url, prefix, name, env))
        (_, url_a), (proc_b, url_b) = procs
        c = client(url_b)
        rows = [chat_line(i, max_tokens=40) for i in range(N_LINES)]
        b = await c.batches.create(input_file_id=await upload(c, jsonl(rows)), endpoint="/v1/chat/completions",
                                   completion_window="24h")
        deadline = time.monotonic() + 60
        while (await c.batches.retrieve(b.id)).request_counts.completed < 20:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        proc_b.send_signal(signal.SIGKILL)  # lines it had claimed stay pending until replica A reclaims them
        await proc_b.wait()
        assert (await client(url_a).batches.retrieve(b.id)).request_counts.completed < N_LINES  # really mid-batch
        ca = client(url_a)
        done, _ = await wait_final(ca, b.id, timeout=120)
        assert done.status == "completed", done
        out, err = await lines_of(ca, done.output_file_id), await lines_of(ca, done.error_file_id)
        exactly_once(out, err)
        assert done.request_counts.completed == len(out) == N_LINES and not err
        assert "reclaimed" in (tmp_path / "rep-a.log").read_text()  # A took over the lines B was running
        if env:
            names = {p.name for p in (tmp_path / "files" / prefix).iterdir()}
            assert done.output_file_id in names and not [n for n in names if n.endswith(".part")]
    finally:
        for p, _ in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGKILL)
                await p.wait()
        await redis.kill()


async def test_redis_restart_mid_batch(sim_fleet, start_gateway, tmp_path):
    redis = RedisServer(appendonly_dir=str(tmp_path))
    await redis.start()
    prefix = f"gwtest-{uuid.uuid4().hex[:8]}"
    try:
        gws = [await start_gateway(sim_fleet.config(), redis_url=redis.url, redis_prefix=prefix, batch_claim_idle=2.0,
                                   batch_sweep_interval=0.5, batch_workers=4) for _ in range(2)]
        c = client(gws[0].url)
        rows = [chat_line(i, max_tokens=40) for i in range(N_LINES)]
        b = await c.batches.create(input_file_id=await upload(c, jsonl(rows)), endpoint="/v1/chat/completions",
                                   completion_window="24h")
        deadline = time.monotonic() + 60
        while (await c.batches.retrieve(b.id)).request_counts.completed < 20:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await c.batches.retrieve(b.id)).request_counts.completed < N_LINES  # really mid-batch
        await redis.kill()
        await asyncio.sleep(1.5)  # lines finish while Redis is away; their results wait
        await redis.start()
        done, _ = await _wait_final_through_outage(c, b.id)
        assert done.status == "completed", done
        out, err = await lines_of(c, done.output_file_id), await lines_of(c, done.error_file_id)
        exactly_once(out, err)
        assert done.request_counts.completed + done.request_counts.failed == N_LINES
    finally:
        await redis.kill()


async def _wait_final_through_outage(c: openai.AsyncOpenAI, bid: str):
    """The gateway may answer 503 for a moment while it reconnects to Redis."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return await wait_final(c, bid, timeout=120)
        except openai.APIStatusError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.5)


@pytest.mark.parametrize("limit", [2, 3])
async def test_a_line_whose_replicas_keep_dying_goes_to_the_error_file(limit, redis_client, redis_prefix, sim_fleet,
                                                                       start_gateway):
    """req-0 is delivered to two replicas that die running it (consumers that claim and never ack); the worker's
    reclaim is its third delivery: past a limit of 2 it is answered in the error file, with 3 it runs."""
    api = await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, batch_workers=0)
    c = client(api.url)
    b = await c.batches.create(input_file_id=await upload(c, jsonl([chat_line(i) for i in range(3)])),
                               endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while (await c.batches.retrieve(b.id)).status == "validating":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    queue = f"{redis_prefix}:bq"
    [[_, [(eid, fields)]]] = await redis_client.xreadgroup(GROUP, "dead-1", {queue: ">"}, count=1)
    assert fields[b"c"] == b"req-0"
    await asyncio.sleep(0.2)
    _, claimed, *_ = await redis_client.xautoclaim(queue, GROUP, "dead-2", 100, "0-0", count=10)
    assert [e for e, _ in claimed] == [eid]
    [pending] = await redis_client.xpending_range(queue, GROUP, min=eid, max=eid, count=1)
    assert pending["times_delivered"] == 2 and pending["consumer"] == b"dead-2"
    await start_gateway(sim_fleet.config(), redis_url=REDIS_URL, redis_prefix=redis_prefix, batch_workers=2,
                        batch_claim_idle=0.5, batch_sweep_interval=0.5, batch_max_deliveries=limit)
    done, _ = await wait_final(c, b.id)
    assert done.status == "completed", done
    out, err = await lines_of(c, done.output_file_id), await lines_of(c, done.error_file_id)
    assert (await redis_client.xpending(queue, GROUP))["pending"] == 0  # acknowledged, never reclaimed again
    if limit == 3:
        assert sorted(o["custom_id"] for o in out) == ["req-0", "req-1", "req-2"] and not err
        return
    assert sorted(o["custom_id"] for o in out) == ["req-1", "req-2"]
    [e] = err
    assert e["custom_id"] == "req-0" and e["response"] is None and e["error"]["code"] == "delivery_limit_reached"
    assert "3 times" in e["error"]["message"] and "GATEWAY_BATCH_MAX_DELIVERIES=2" in e["error"]["message"]
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
