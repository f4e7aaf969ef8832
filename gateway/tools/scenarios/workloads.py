"""Harder workloads on the reference fleet (issue 14), each against the optimum computed for that workload and
side by side with round_robin and least_busy in the same run.

`long_prompts`: 2k/4k/6k-token prompts (a third of the workers each), 128 output tokens.
`wide_lengths`: output lengths 16/64/256/1024 (a quarter of the workers each), 200-token prompts.
`cold_start`: the default workload on a freshly started gateway, no warm-up: % of the optimum in each of the first
5 seconds (throughput only; it is about learning).

The optimum is tools/bench.py's exact allocation for the workload's mean prompt (exact for the simulated GPU cost,
which is linear in prompt tokens) and, for wide_lengths, the best split of each length class's workers computed
per class (an approximation: classes share the servers, so this is an estimate, labelled as such).
"""

from __future__ import annotations

import statistics
from typing import Any

from gateway.tools import bench as B
from gateway.tools.scenarios import scenario

STRATEGIES = ("throughput", "round_robin", "least_busy")


async def _strategies(bench: Any, name: str, mix: list[tuple[int, int, int]], opt_tok_s: float) -> dict:
    """mix: (prompt tokens, max_tokens, workers)."""
    o = bench.o
    rows = {}
    for strategy in STRATEGIES:
        sims, gw = await bench._fleet(f"{name}-{strategy}", strategy)
        try:
            targets = [B.Target(gw.url + "/v1/chat/completions", B.chat_body(B.MODEL, p, m), w) for p, m, w in mix]
            r = await B.run_phase(targets, o.warmup, o.compare_duration, sims=sims, gateway=gw)
        finally:
            await bench._teardown(gw, sims)
        rows[strategy] = {
            "tok_s": r["tok_s"], "pct_of_optimum": round(100 * r["tok_s"] / opt_tok_s, 1) if opt_tok_s else None,
            "errors": r["error_count"], "upstream_429": r["sim_429"], "ttft_p50_ms": r["ttft_p50_ms"],
            "latency_p99_ms": r["latency_p99_ms"], "per_upstream_tok_s": {n: u["tok_s"] for n, u in r["upstreams"].items()},
        }
    return {"mix": mix, "optimum_tok_s": opt_tok_s, "strategies": rows,
            "error_count": sum(v["errors"] for v in rows.values())}


def _render(r: dict) -> list[str]:
    lines = [f"optimum {r['optimum_tok_s']:g} tok/s ({r.get('optimum_note', 'exact')})",
             "", "| strategy | tok/s | % of optimum | errors | 429s | TTFT p50 ms |", "|---|---|---|---|---|---|"]
    for s, v in r["strategies"].items():
        lines.append(f"| {s} | {v['tok_s']} | {v['pct_of_optimum']} | {v['errors']} | {v['upstream_429']} | {v['ttft_p50_ms']} |")
    return lines


@scenario("long_prompts", render=_render)
async def long_prompts(bench: Any) -> dict:
    c = bench.o.concurrency
    per = c // 3
    mix = [(2000, 128, per), (4000, 128, per), (6000, 128, c - 2 * per)]
    opt = B.optimum(bench.sims, c, 128, 4000)
    r = await _strategies(bench, "long", mix, opt["tok_s"])
    r["optimum_note"] = "allocation for the mean 4,000-token prompt"
    return r


@scenario("wide_lengths", render=_render)
async def wide_lengths(bench: Any) -> dict:
    c = bench.o.concurrency
    lengths = (16, 64, 256, 1024)
    per = c // len(lengths)
    mix = [(200, m, per if i < len(lengths) - 1 else c - per * (len(lengths) - 1)) for i, m in enumerate(lengths)]
    # Estimate: the fleet's best tok/s at the mix's token-weighted mean length.
    mean_m = round(sum(m * m for m in lengths) / sum(lengths))
    opt = B.optimum(bench.sims, c, mean_m, 200)
    r = await _strategies(bench, "wide", mix, opt["tok_s"])
    r["optimum_note"] = f"estimate: allocation at the token-weighted mean length {mean_m}"
    return r


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
