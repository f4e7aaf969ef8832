"""Harder workloads on the reference fleet (issue 14), each against the optimum of that workload and side by side
with round_robin and least_busy in the same run.

`long_prompts`: 2k/4k/6k-token prompts (a third of the workers each), 128 output tokens.
`wide_lengths`: output lengths 16/64/256/1024 (a quarter of the workers each), 200-token prompts.
`cold_start`: the default workload on a freshly started gateway, no warm-up: % of the optimum in each of the first
5 seconds (throughput only; it is about learning).

The optimum of a mix is tools/mixed.py's exact placement of every class's workers (computed from the simulators'
own formulas), and the oracle is that placement measured: the load generator sends each class's workers straight
to the simulators they are placed on, no gateway (same machine, same CPU limits: the fair 100%, as for the core
scenario). Each strategy is reported as % of the oracle and % of the computed optimum.

The warm-up lasts at least the longest request's duration on the hosted API (~17 s for 1024 tokens): the oracle
starts in its steady state (workers pinned), a router reaches it only once the requests it placed before it had
learned the mix (their lengths, the request budget's pressure) have finished.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from gateway.tools import bench as B
from gateway.tools.mixed import Klass, mixed_optimum
from gateway.tools.scenarios import scenario

STRATEGIES = ("throughput", "round_robin", "least_busy")


def warmup_s(bench: Any, ks: Sequence[Klass]) -> float:
    """The bench's warm-up, or the longest request's duration on a hosted simulator if longer (see above)."""
    hosted = [c for c in bench.sims.values() if c.mode == "hosted"]
    return max([bench.o.warmup] + [B.hosted_cycle(c, k.output) for c in hosted for k in ks])


async def _oracle(bench: Any, name: str, ks: Sequence[Klass], alloc: dict[str, list[int]]) -> dict:
    """The optimum's placement, measured: each class's workers pinned to their upstreams, straight to the sims."""
    sims = await B.start_sims(bench.procs, bench.sims, f"{name}-oracle")
    try:
        targets = [B.Target(sims.url(u) + "/v1/chat/completions", B.chat_body(bench.sims[u].name, k.prompt, k.output), n)
                   for u, per in alloc.items() for k, n in zip(ks, per) if n > 0]
        return await B.run_phase(targets, warmup_s(bench, ks), bench.o.compare_duration, sims=sims)
    finally:
        await bench._teardown(sims)


def _row(r: dict, oracle: float, opt: float) -> dict:
    return {
        "tok_s": r["tok_s"], "pct_of_oracle": round(100 * r["tok_s"] / oracle, 1) if oracle else None,
        "pct_of_optimum": round(100 * r["tok_s"] / opt, 1) if opt else None,
        "errors": r["error_count"], "upstream_429": r["sim_429"], "ttft_p50_ms": r["ttft_p50_ms"],
        "latency_p99_ms": r["latency_p99_ms"], "per_upstream_tok_s": {n: u["tok_s"] for n, u in r["upstreams"].items()},
    }


async def _strategies(bench: Any, name: str, ks: Sequence[Klass]) -> dict:
    o = bench.o
    opt = mixed_optimum(bench.sims, ks)
    oracle = await _oracle(bench, name, ks, opt["allocation"])
    rows = {"oracle": _row(oracle, oracle["tok_s"], opt["tok_s"])}
    for strategy in STRATEGIES:
        sims, gw = await bench._fleet(f"{name}-{strategy}", strategy)
        try:
            targets = [B.Target(gw.url + "/v1/chat/completions", B.chat_body(B.MODEL, k.prompt, k.output), k.workers)
                       for k in ks]
            r = await B.run_phase(targets, warmup_s(bench, ks), o.compare_duration, sims=sims, gateway=gw)
        finally:
            await bench._teardown(gw, sims)
        rows[strategy] = _row(r, oracle["tok_s"], opt["tok_s"])
    return {"mix": [[k.prompt, k.output, k.workers] for k in ks], "warmup_s": round(warmup_s(bench, ks), 1),
            "optimum": opt, "optimum_tok_s": opt["tok_s"],
            "oracle_tok_s": oracle["tok_s"], "strategies": rows,
            "error_count": sum(v["errors"] for v in rows.values())}


def _render(r: dict) -> list[str]:
    alloc = "; ".join(f"{u} {v}" for u, v in r["optimum"]["allocation"].items())
    lines = [f"optimum {r['optimum_tok_s']:g} tok/s (workers per class {r['mix']}: {alloc}), oracle {r['oracle_tok_s']:g}; "
             f"warm-up {r['warmup_s']:g} s",
             "", "| strategy | tok/s | % of oracle | % of optimum | errors | 429s | TTFT p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for s, v in r["strategies"].items():
        lines.append(f"| {s} | {v['tok_s']} | {v['pct_of_oracle']} | {v['pct_of_optimum']} | {v['errors']} | "
                     f"{v['upstream_429']} | {v['ttft_p50_ms']} |")
    return lines


def _split(c: int, parts: int) -> list[int]:
    """c workers in `parts` near-equal groups (the last takes the remainder)."""
    per = c // parts
    return [per] * (parts - 1) + [c - per * (parts - 1)]


@scenario("long_prompts", render=_render)
async def long_prompts(bench: Any) -> dict:
    ks = [Klass(p, 128, w) for p, w in zip((2000, 4000, 6000), _split(bench.o.concurrency, 3))]
    return await _strategies(bench, "long", ks)


@scenario("wide_lengths", render=_render)
async def wide_lengths(bench: Any) -> dict:
    ks = [Klass(200, m, w) for m, w in zip((16, 64, 256, 1024), _split(bench.o.concurrency, 4))]
    return await _strategies(bench, "wide", ks)


@scenario("cold_start")
async def cold_start(bench: Any) -> dict:
    o = bench.o
    sims, gw = await bench._fleet("cold", "throughput")
    try:
        r = await B.run_phase(bench._gw_targets(gw), 0.0, max(10.0, o.compare_duration), sims=sims, gateway=gw)
    finally:
        await bench._teardown(gw, sims)
    opt = bench.opt["tok_s"]
    first = r["per_second"][:5]
    return {
        "tok_s_first_5s": first,
        "pct_of_optimum_first_5s": [round(100 * x / opt, 1) for x in first],
        "pct_of_optimum_in_5s": round(100 * statistics.fmean(first) / opt, 1) if first else None,
        "pct_of_optimum_after": round(100 * statistics.fmean(r["per_second"][5:]) / opt, 1) if r["per_second"][5:] else None,
        "error_count": r["error_count"], "notes": "fresh gateway, no warm-up; optimum " + str(opt),
    }
