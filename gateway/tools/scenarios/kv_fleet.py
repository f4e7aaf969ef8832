"""The heterogeneous fleet on calibrated KV-engine presets (issue 16): KV pressure and speculative decoding.

`kv_pressure`: calibrated_sims(kv_scale=0.25) (H100 ~107k, A10G ~10.5k KV tokens) + the rate-limited hosted API,
closed loop with long contexts (2,000-token prompts standing in for long multi-turn conversations, growing by
600 output tokens): the engines admit a sequence when its prompt fits, so the A10G takes five and then has to
preempt as they grow, and the H100 about 53 of which ~41 fit grown; routing by sequence counts preempts. Reports tok/s as % of this workload's optimum and preemptions/min at each simulator.
`spec_decode`: spec_decode_sims() (speculative decoding on the H100: much faster per request at low batch,
little gain at high batch), at low load (8 workers) and high load (48).

The optimum is an exact allocation of the workers over per-upstream curves: virtual.tok_s_curve for KV engines
(tools/bench.py's slot formula does not know KV capacity or speculation), bench.upstream_tok_s for the hosted
API. The oracle runs that allocation's workers straight at fresh simulators (no gateway): what real time on this
machine delivers of the optimum (the simulators, load generator and, for the strategies, the gateway share its
CPUs), so % of oracle is the routing's own share. throughput, round_robin and least_busy run side by side on
fresh simulators and gateways. The gateway
learns each engine's KV capacity from its vllm:cache_config_info (metrics_url). The KV budget is a hard limit in
every strategy (like max_concurrency), so round_robin and least_busy are spared preemptions too: they differ in
where the work goes, which the % of optimum shows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import aiohttp

from gateway.sim import SimConfig
from gateway.sim.reference import calibrated_fleet, calibrated_sims, spec_decode_sims
from gateway.sim.virtual import tok_s_curve
from gateway.tools import bench as B
from gateway.tools.scenarios import scenario

STRATEGIES = ("throughput", "round_robin", "least_busy")


def kv_optimum(sims: dict[str, SimConfig], c: int, m: int, p: int) -> dict:
    """Best integer allocation of c closed-loop workers (exact DP over per-upstream curves)."""
    curves = {k: tok_s_curve(s, c, p, m) if s.kv_engine else [B.upstream_tok_s(s, n, m, p) for n in range(c + 1)]
              for k, s in sims.items()}
    best: dict[int, tuple[float, dict[str, int]]] = {0: (0.0, {})}
    for k, curve in curves.items():
        nxt: dict[int, tuple[float, dict[str, int]]] = {}
        for used, (v, alloc) in best.items():
            for n in range(c - used + 1):
                cand = (v + curve[n], {**alloc, k: n})
                if used + n not in nxt or cand[0] > nxt[used + n][0]:
                    nxt[used + n] = cand
        best = nxt
    v, alloc = max(best.values(), key=lambda x: x[0])
    return {"tok_s": round(v, 1), "allocation": alloc, "per_upstream": {k: round(curves[k][alloc[k]], 1) for k in alloc}}


async def _preemptions(session: aiohttp.ClientSession, sims: B.SimFleetProc) -> dict[str, float]:
    out = {}
    for n in sims.ports:
        async with session.get(sims.url(n) + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith("vllm:num_preemptions_total"):
                    out[n] = float(line.rsplit(" ", 1)[1])
    return out


async def _one(bench: Any, sims_cfg: dict[str, SimConfig], strategy: str, tag: str, c: int, p: int, m: int) -> dict:
    o = bench.o
    sims = await B.start_sims(bench.procs, sims_cfg, tag)
    gw = None
    try:
        cfg = calibrated_fleet(sims.ports, sims_cfg)
        for mc in cfg.models.values():
            mc.strategy = strategy
        fleet = cfg.model_dump(mode="json", exclude={"upstreams": {"__all__": {"name"}}})
        gw = await B.start_gateway(bench.procs, fleet, tag, strategy=strategy)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            before = await _preemptions(s, sims)
            r = await B.run_phase([], o.warmup, o.compare_duration, sims=sims, gateway=gw,
                                  load=_unique_workers(gw.url + "/v1/chat/completions", c, p, m))
            after = await _preemptions(s, sims)
    finally:
        await bench._teardown(gw, sims)
    span_min = (o.warmup + o.compare_duration) / 60
    return {
        "tok_s": r["tok_s"], "errors": r["error_count"], "upstream_429": r["sim_429"],
        "preemptions_per_min": {n: round((after[n] - before.get(n, 0)) / span_min, 1) for n in after},
        "ttft_p50_ms": r["ttft_p50_ms"], "latency_p99_ms": r["latency_p99_ms"],
        "per_upstream_tok_s": {n: u["tok_s"] for n, u in r["upstreams"].items()},
    }


async def _oracle(bench: Any, sims_cfg: dict[str, SimConfig], tag: str, alloc: dict[str, int], p: int, m: int) -> float:
    """tok/s of the optimum's allocation with its workers pinned directly to the simulators."""
    o = bench.o
    sims = await B.start_sims(bench.procs, sims_cfg, tag)
    try:
        loads = [_unique_workers(sims.url(n) + "/v1/chat/completions", k, p, m) for n, k in alloc.items() if k > 0]

        async def load(session: aiohttp.ClientSession, rec: B.Recorder, stop_at: float) -> None:
            await asyncio.gather(*(f(session, rec, stop_at) for f in loads))

        r = await B.run_phase([], o.warmup, o.compare_duration, sims=sims, load=load)
    finally:
        await bench._teardown(sims)
    return float(r["tok_s"])


def _unique_workers(url: str, c: int, p: int, m: int) -> Any:
    """c closed-loop workers whose every request has its own context (a distinct first word breaks the chained
    block hashes, so no prefix-cache sharing): the KV cost of c long conversations, as tok_s_curve assumes."""
    counter = itertools.count()

    async def worker(session: aiohttp.ClientSession, rec: B.Recorder, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            body = json.loads(B.chat_body(B.MODEL, p - 1, m))
            body["messages"][0]["content"] = f"conversation{next(counter)} " + body["messages"][0]["content"]
            try:
                await B._stream_once(session, url, json.dumps(body).encode(), rec)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
                rec.error(type(e).__name__, time.monotonic() - rec.origin)
                await asyncio.sleep(0.05)

    async def load(session: aiohttp.ClientSession, rec: B.Recorder, stop_at: float) -> None:
        await asyncio.gather(*(worker(session, rec, stop_at) for _ in range(c)))

    return load


async def _compare(bench: Any, sims_cfg: dict[str, SimConfig], name: str, c: int, p: int, m: int) -> dict:
    opt = kv_optimum(sims_cfg, c, m, p)
    oracle = await _oracle(bench, sims_cfg, f"{name}-{c}-oracle", opt["allocation"], p, m)
    rows = {}
    for strategy in STRATEGIES:
        row = await _one(bench, sims_cfg, strategy, f"{name}-{c}-{strategy}", c, p, m)
        row["pct_of_optimum"] = round(100 * row["tok_s"] / opt["tok_s"], 1) if opt["tok_s"] else None
        row["pct_of_oracle"] = round(100 * row["tok_s"] / oracle, 1) if oracle else None
        rows[strategy] = row
    opt["oracle_tok_s"] = oracle
    return {"workers": c, "prompt_tokens": p, "max_tokens": m, "optimum": opt, "strategies": rows}


def _render(r: dict) -> list[str]:
    lines = ["| load | strategy | tok/s | % of optimum | % of oracle | preemptions/min | errors | 429s |",
             "|---|---|---|---|---|---|---|---|"]
    for run in r["runs"]:
        opt = run["optimum"]
        head = f"| C={run['workers']} (opt {opt['tok_s']:g}) |"
        lines.append(f"{head} oracle (optimum, direct) | {opt['oracle_tok_s']} | "
                     f"{round(100 * opt['oracle_tok_s'] / opt['tok_s'], 1) if opt['tok_s'] else None} | 100 | | | |")
        for s, v in run["strategies"].items():
            pre = sum(v["preemptions_per_min"].values())
            lines.append(f"{head} {s} | {v['tok_s']} | {v['pct_of_optimum']} | {v['pct_of_oracle']} | {pre:g} | "
                         f"{v['errors']} | {v['upstream_429']} |")
    return lines


@scenario("kv_pressure", render=_render)
async def kv_pressure(bench: Any) -> dict:
    c = 24 if bench.o.quick else 48
    run = await _compare(bench, calibrated_sims(kv_scale=0.25), "kv", c, 2000, 600)
    errors = sum(v["errors"] for v in run["strategies"].values())
    return {"runs": [run], "error_count": errors, "notes": "calibrated presets, KV x0.25, 2k-token contexts growing by 600 output tokens"}


@scenario("spec_decode", render=_render)
async def spec_decode(bench: Any) -> dict:
    runs = [await _compare(bench, spec_decode_sims(), "spec", c, 200, 128) for c in ((4, 24) if bench.o.quick else (8, 48))]
    errors = sum(v["errors"] for run in runs for v in run["strategies"].values())
    return {"runs": runs, "error_count": errors, "notes": "speculative decoding on the H100 sim, low and high load"}
