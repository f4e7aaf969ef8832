"""`batch` scenario: a 2,000-line batch (200 with --quick) on the reference fleet while interactive traffic runs.

Two phases on one fleet: interactive traffic alone (half the bench concurrency, so capacity is left free), then
the same traffic with the batch submitted at the start. Reported: batch completion time and tok/s, interactive
TTFT/tok/s beside the run without the batch, and the batch's share of the capacity interactive traffic left free
(fleet tok/s measured at the simulators minus interactive tok/s, against the analytic saturated optimum minus the
interactive baseline: an estimate, since batch lines and interactive requests differ in max_tokens under --quick).
Until the proxy gives batch lines their own service class, the interactive columns show what the batch costs them.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from gateway.tools import bench as B
from gateway.tools.scenarios import scenario

BATCH_WORKERS = 64
SATURATED = 256  # concurrency past every upstream's slots


def _batch_file(lines: int, prompt_tokens: int, max_tokens: int) -> bytes:
    content = ("the " * prompt_tokens).strip()
    rows = (
        {"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": B.MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}}
        for i in range(lines)
    )
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


async def _submit(s: aiohttp.ClientSession, url: str, data: bytes) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", data, filename="bench.jsonl", content_type="application/jsonl")
    async with s.post(url + "/v1/files", data=form) as r:
        r.raise_for_status()
        fid = (await r.json())["id"]
    body = {"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    async with s.post(url + "/v1/batches", json=body) as r:
        r.raise_for_status()
        return (await r.json())["id"]


async def _wait(s: aiohttp.ClientSession, url: str, bid: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        async with s.get(f"{url}/v1/batches/{bid}") as r:
            b = await r.json()
        if b["status"] in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
            return b
        await asyncio.sleep(0.5)


def _fleet_tok_s(r: dict) -> float:
    return sum(u["tok_s"] for u in r["upstreams"].values())


@scenario("batch", render=lambda r: _render(r))
async def run(bench: Any) -> dict:
    o = bench.o
    lines = 200 if o.quick else 2000
    batch_max_tokens = 32 if o.quick else o.max_tokens
    sims, gw = await _start(bench)
    inter = [B.Target(t.url, t.body, max(1, t.workers // 2)) for t in bench._gw_targets(gw)]
    try:
        alone = await B.run_phase(inter, o.warmup, o.duration, sims=sims, gateway=gw)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            t0 = time.monotonic()
            bid = await _submit(s, gw.url, _batch_file(lines, o.prompt_tokens, batch_max_tokens))
            mixed = await B.run_phase(inter, o.warmup, o.duration, sims=sims, gateway=gw)
            final = await _wait(s, gw.url, bid, timeout=60 if o.quick else 900)
            took = time.monotonic() - t0
    finally:
        await bench._teardown(gw, sims)
        await B._redis_cleanup(o.redis_url, gw.redis_prefix)
    return _result(bench, lines, batch_max_tokens, alone, mixed, final, took)


async def _start(bench: Any) -> tuple[B.SimFleetProc, B.GatewayProc]:
    sims = await B.start_sims(bench.procs, bench.sims, "batch")
    gw = await B.start_gateway(bench.procs, B.fleet_yaml(sims.ports, bench.sims, "throughput"), "batch",
                               redis_url=bench.o.redis_url, env={"GATEWAY_BATCH_WORKERS": str(BATCH_WORKERS)})
    return sims, gw


def _result(bench: Any, lines: int, max_tokens: int, alone: dict, mixed: dict, final: dict, took: float) -> dict:
    counts = final.get("request_counts") or {}
    batch_tokens = counts.get("completed", 0) * max_tokens  # the simulator always generates max_tokens here
    # The fleet's saturated optimum (every slot busy) for this workload, less what interactive traffic used.
    cap = B.optimum(bench.sims, SATURATED, bench.o.max_tokens, bench.o.prompt_tokens)["tok_s"]
    free = max(0.0, cap - alone["tok_s"])
    batch_during = max(0.0, _fleet_tok_s(mixed) - mixed["tok_s"])
    return {
        "lines": lines, "status": final.get("status"), "request_counts": counts,
        "batch_seconds": round(took, 1), "batch_tok_s": round(batch_tokens / took, 1) if took else None,
        "batch_tok_s_during_interactive": round(batch_during, 1),
        "free_capacity_tok_s_est": round(free, 1),
        "pct_of_free_capacity_used": round(100 * batch_during / free, 1) if free else None,
        "interactive_alone": {k: alone[k] for k in ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p99_ms", "error_count")},
        "interactive_with_batch": {k: mixed[k] for k in ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p99_ms", "error_count")},
        "notes": f"{lines}-line batch, max_tokens {max_tokens}, {BATCH_WORKERS} batch workers",
    }


def _render(r: dict) -> list[str]:
    a, m = r["interactive_alone"], r["interactive_with_batch"]
    return [
        f"Batch of {r['lines']} lines: {r['status']} in {B._f(r['batch_seconds'], 1, ' s')} "
        f"({B._f(r['batch_tok_s'])} tok/s overall, {B._f(r['batch_tok_s_during_interactive'])} tok/s beside interactive "
        f"traffic = {B._f(r['pct_of_free_capacity_used'], 0, '%')} of the ~{B._f(r['free_capacity_tok_s_est'])} tok/s "
        f"it left free); counts {r['request_counts']}.",
        "",
        "| interactive | tok/s | TTFT p50 | TTFT p99 | latency p99 | errors |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {B._f(x['tok_s'])} | {B._f(x['ttft_p50_ms'], 0, ' ms')} | {B._f(x['ttft_p99_ms'], 0, ' ms')} | "
          f"{B._f(x['latency_p99_ms'], 0, ' ms')} | {x['error_count']} |" for name, x in (("alone", a), ("with batch", m))),
    ]
