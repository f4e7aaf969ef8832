"""Bench scenario `poisson` (issue 14): open-loop Poisson arrivals on the reference fleet (fast GPU, slow GPU,
hosted API), the reference request (--prompt-tokens, --max-tokens), at LOAD of the fleet's capacity.

Below saturation every work-conserving router ends up serving what is offered, so the figures are:
* delivered tok/s as % of offered (the requests that arrived in the window x max_tokens): under 100 means a
  backlog grew in the window (or requests still ran past its end);
* latency: mean, p99 and TTFT, and the latency efficiency = the oracle's mean latency / the strategy's (100% =
  as fast as the latency-optimal static split; above 100 is possible: a router that sees the live load absorbs
  Poisson bursts a fixed split cannot).
The oracle is tools/openloop.py's latency-optimal split of the arrival rate, measured: each arrival goes straight
to a simulator drawn with those probabilities, no gateway. The fluid model's own mean latency is shown too.
Runs shorter than the hosted API's 60-s window (the oracle's random split can exceed its RPM over a full minute).
"""

from __future__ import annotations

from typing import Any

from gateway.tools import bench as B
from gateway.tools import openloop
from gateway.tools.scenarios import scenario

STRATEGIES = ("throughput", "round_robin", "least_busy")
LOAD = 0.8


def _row(r: dict, sent: list[float], m: int, oracle_mean: float | None) -> dict:
    """Offered: the requests that arrived in the measured window, times max_tokens, per second."""
    w0, d = r["warmup_s"], r["duration_s"]
    offered = sum(1 for t in sent if w0 <= t < w0 + d) * m / d
    mean = r["latency_mean_ms"]
    return {"offered_tok_s": round(offered, 1),
        "tok_s": r["tok_s"], "pct_of_offered": round(100 * r["tok_s"] / offered, 1) if offered else None,
        "latency_mean_ms": mean, "latency_p99_ms": r["latency_p99_ms"], "ttft_p50_ms": r["ttft_p50_ms"],
        "ttft_p99_ms": r["ttft_p99_ms"],
        "latency_efficiency": round(100 * oracle_mean / mean, 1) if oracle_mean and mean else None,
        "errors": r["error_count"], "upstream_429": r["sim_429"],
        "per_upstream_rps": {n: round(u["completed"] / r["duration_s"], 2) for n, u in r["upstreams"].items()},
        "queue_max": max((row.get("queue", 0) for row in r["timeline"]), default=None),
    }


def _render(r: dict) -> list[str]:
    lines = [f"Poisson arrivals {r['arrivals_per_s']}/s ({100 * r['load']:g}% of capacity), offered "
             f"{r['offered_tok_s']:g} tok/s; oracle split {r['split']} (fluid-model mean latency "
             f"{r['model_mean_latency_ms']:g} ms)", "",
             "| strategy | tok/s | % of offered | latency mean / p99 ms | TTFT p50 / p99 ms | latency efficiency % "
             "| errors | 429s | queue max |", "|---|---|---|---|---|---|---|---|---|"]
    for s, v in r["strategies"].items():
        lines.append(f"| {s} | {v['tok_s']} | {v['pct_of_offered']} | {v['latency_mean_ms']} / {v['latency_p99_ms']} | "
                     f"{v['ttft_p50_ms']} / {v['ttft_p99_ms']} | {v['latency_efficiency']} | {v['errors']} | "
                     f"{v['upstream_429']} | {v['queue_max']} |")
    return lines


@scenario("poisson", render=_render)
async def poisson(bench: Any) -> dict:
    o = bench.o
    m, p = o.max_tokens, o.prompt_tokens
    rate = LOAD * openloop.capacity(bench.sims, m, p)
    split = openloop.best_split(bench.sims, rate, m, p)
    sims = await B.start_sims(bench.procs, bench.sims, "poisson-oracle")
    try:
        names = [n for n, x in split.items() if x > 0]
        choices = [(sims.url(n) + "/v1/chat/completions", B.chat_body(bench.sims[n].name, p, m)) for n in names]
        sent: list[float] = []
        oracle = await B.run_phase([], o.warmup, o.compare_duration, sims=sims,
                                   load=openloop.poisson_load(choices, [split[n] for n in names], rate, sent))
    finally:
        await bench._teardown(sims)
    rows = {"oracle": _row(oracle, sent, m, oracle["latency_mean_ms"])}
    for strategy in STRATEGIES:
        sims, gw = await bench._fleet(f"poisson-{strategy}", strategy)
        try:
            body = B.chat_body(B.MODEL, p, m)
            sent = []
            r = await B.run_phase([], o.warmup, o.compare_duration, sims=sims, gateway=gw,
                                  load=openloop.poisson_load([(gw.url + "/v1/chat/completions", body)], [1.0], rate, sent))
        finally:
            await bench._teardown(gw, sims)
        rows[strategy] = _row(r, sent, m, oracle["latency_mean_ms"])
    return {
        "load": LOAD, "arrivals_per_s": round(rate, 2), "offered_tok_s": round(rate * m, 1),
        "split": {n: round(x, 2) for n, x in split.items()},
        "model_mean_latency_ms": round(1000 * openloop.mean_latency(bench.sims, split, m, p), 1),
        "strategies": rows, "error_count": sum(v["errors"] for v in rows.values()),
    }
