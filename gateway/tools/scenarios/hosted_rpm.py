"""Hosted-only pool behind RPM limits, requests of mixed lengths (issue 14): how much of the joint RPM budget
each strategy uses, how many 429s reach the upstreams, and whether the gateway queue stays stable.

`rpm_closed`: closed loop (more workers than the budget can serve), short (32) and long (512-token) requests
mixed. `rpm_open`: Poisson arrivals at 95% of the joint budget, the same mix; the queue must stay bounded.
The optimum of this workload is the budget itself: every request the limits allow, started as soon as allowed,
with none refused (tok/s then follows from the mix). Both run throughput, round_robin and least_busy side by
side, each on fresh simulators (empty rate-limit windows) and a fresh gateway.

The budget is counted over the measured window only; a window shorter than the limit's 60 s right after a cold
start can exceed 100% (the first minute has no history), so real measurements use --duration 60 or more after a
warm-up of 60 s; --quick runs prove the scenario works.
"""

from __future__ import annotations

import statistics
from typing import Any

from gateway.config import FleetConfig
from gateway.sim import SimConfig
from gateway.tools import bench as B
from gateway.tools import openloop
from gateway.tools.scenarios import scenario

STRATEGIES = ("throughput", "round_robin", "least_busy")
MODEL = "rpm-model"
LIMITS = {"h1": 120, "h2": 60}  # requests per 60 s
LENGTHS = (32, 512)


def _sims() -> dict[str, SimConfig]:
    return {n: SimConfig(name=f"sim-{n}", mode="hosted", ttft=0.4, tok_s=60.0, rpm=rpm, max_concurrency=64)
            for n, rpm in LIMITS.items()}


def _fleet(sims: B.SimFleetProc, strategy: str) -> dict:
    cfg = FleetConfig.model_validate({
        "upstreams": {n: {"provider": "openai", "kind": "hosted", "base_url": sims.url(n) + "/v1", "model": f"sim-{n}",
                          "rpm": rpm, "max_concurrency": 64, "capacity": {"a": 1 / 60, "b": 0.0, "ttft": 0.4}}
                      for n, rpm in LIMITS.items()},
        "models": {MODEL: {"upstreams": list(LIMITS), "strategy": strategy}},
    })
    return cfg.model_dump(mode="json", exclude={"upstreams": {"__all__": {"name"}}})


def _budget_row(r: dict, duration: float) -> dict:
    budget = sum(LIMITS.values()) * duration / 60
    started = sum(u["completed"] for u in r["upstreams"].values())
    queue = [row.get("queue", 0) for row in r["timeline"] if r["warmup_s"] <= row["t"]]
    return {
        "pct_of_rpm_budget": round(100 * started / budget, 1) if budget else None,
        "requests": started, "budget_requests": round(budget, 1), "tok_s": r["tok_s"],
        "upstream_429": r["sim_429"], "client_errors": r["error_count"],
        "queue_mean": round(statistics.fmean(queue), 1) if queue else None, "queue_max": max(queue, default=None),
        "latency_p50_ms": r["latency_p50_ms"], "latency_p99_ms": r["latency_p99_ms"],
        "per_upstream": {n: u["completed"] for n, u in r["upstreams"].items()},
    }


async def _run(bench: Any, open_loop: bool) -> dict:
    o = bench.o
    out: dict[str, Any] = {"strategies": {}}
    for strategy in STRATEGIES:
        tag = f"rpm-{'open' if open_loop else 'closed'}-{strategy}"
        sims = await B.start_sims(bench.procs, _sims(), tag)
        gw = None
        try:
            gw = await B.start_gateway(bench.procs, _fleet(sims, strategy), tag, strategy=strategy)
            url = gw.url + "/v1/chat/completions"
            bodies = [B.chat_body(MODEL, 100, m) for m in LENGTHS]
            if open_loop:
                rate = 0.95 * sum(LIMITS.values()) / 60
                load = openloop.poisson_load([(url, b) for b in bodies], [1.0] * len(bodies), rate)
                r = await B.run_phase([], o.warmup, o.compare_duration, sims=sims, gateway=gw, load=load)
            else:
                targets = [B.Target(url, b, 16) for b in bodies]
                r = await B.run_phase(targets, o.warmup, o.compare_duration, sims=sims, gateway=gw)
        finally:
            await bench._teardown(gw, sims)
        out["strategies"][strategy] = _budget_row(r, o.compare_duration)
    out["error_count"] = sum(s["client_errors"] for s in out["strategies"].values())
    out["notes"] = (f"hosted-only pool h1={LIMITS['h1']} + h2={LIMITS['h2']} RPM, max_tokens {LENGTHS}, "
                    + ("Poisson arrivals at 95% of the budget" if open_loop else "closed loop, 32 workers"))
    return out


def _render(r: dict) -> list[str]:
    lines = ["| strategy | % of RPM budget | upstream 429s | client errors | queue mean/max | p50 / p99 ms |",
             "|---|---|---|---|---|---|"]
    for s, v in r["strategies"].items():
        lines.append(f"| {s} | {v['pct_of_rpm_budget']} | {v['upstream_429']} | {v['client_errors']} | "
                     f"{v['queue_mean']}/{v['queue_max']} | {v['latency_p50_ms']} / {v['latency_p99_ms']} |")
    return lines


@scenario("rpm_closed", render=_render)
async def rpm_closed(bench: Any) -> dict:
    return await _run(bench, open_loop=False)


@scenario("rpm_open", render=_render)
async def rpm_open(bench: Any) -> dict:
    return await _run(bench, open_loop=True)
