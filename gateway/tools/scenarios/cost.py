"""Bench scenario `cost`: USD per 1M output tokens per upstream and for the fleet, `throughput` vs `cost` routing.

Why. Throughput is also money: an hourly GPU costs the same whether it idles or runs a full batch, so the more
tokens it delivers the cheaper each one; a hosted API charges per token. The scenario runs the reference workload
twice on the reference fleet (prices from gateway/default_fleet.yaml): once with the default `throughput` strategy,
once with `cost` (fill the paid-for servers first, then the cheapest per-token upstream). For the measured window
it prices what each upstream really did: hourly servers their price x the window (busy or idle), per-token
upstreams their input and output tokens; the fleet figure is all of it over all output tokens. The gateway's own
live figures (GET /v1/gateway/upstreams `usd_per_1m_output`, `cost.fleet_usd_per_1m_output`) are recorded next to it.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway import cost
from gateway.config import Prices, load_fleet
from gateway.settings import DEFAULT_FLEET
from gateway.tools.bench import run_phase
from gateway.tools.scenarios import scenario


def price_window(prices: dict[str, Prices | None], per_up: dict[str, dict], duration: float, prompt_tokens: int) -> dict:
    """USD per upstream and per 1M output tokens for one measured window (pure)."""
    rows: dict[str, dict[str, Any]] = {}
    usd_total = out_total = 0.0
    for name, u in per_up.items():
        p = prices.get(name)
        out = u["tok_s"] * duration
        if p is None:
            usd = 0.0
        elif p.per_token:
            usd = cost.usd(cost.request_cost_micros(p, cost.Tokens(u["completed"] * prompt_tokens, 0, round(out))))
        else:
            usd = (p.hourly or 0.0) * duration / 3600.0
        rows[name] = {"usd": round(usd, 6), "output_tokens": round(out),
                      "usd_per_1m_output": round(usd / out * 1e6, 4) if out > 0 else None}
        usd_total += usd
        out_total += out
    fleet = round(usd_total / out_total * 1e6, 4) if out_total > 0 else None
    return {"upstreams": rows, "usd": round(usd_total, 6), "output_tokens": round(out_total), "fleet_usd_per_1m_output": fleet}


async def _phase(bench, strategy: str) -> dict:
    o = bench.o
    sims, gw = await bench._fleet(f"cost-{strategy}", strategy)
    try:
        r = await run_phase(bench._gw_targets(gw), o.warmup, o.compare_duration, sims=sims, gateway=gw)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(gw.url + "/v1/gateway/upstreams") as resp:
                snap = await resp.json()
    finally:
        await bench._teardown(gw, sims)
    prices = {n: u.price for n, u in load_fleet(DEFAULT_FLEET).upstreams.items()}
    priced = price_window(prices, r["upstreams"], o.compare_duration, o.prompt_tokens)
    live = {u["name"]: u.get("usd_per_1m_output") for u in snap.get("upstreams", [])}
    return {"tok_s": r["tok_s"], "ttft_p50_ms": r["ttft_p50_ms"], "ttft_p99_ms": r["ttft_p99_ms"],
            "latency_p50_ms": r["latency_p50_ms"], "errors": r["error_count"], **priced,
            "gateway_live": {"upstreams": live, "fleet": (snap.get("cost") or {}).get("fleet_usd_per_1m_output")}}


def render(res: dict) -> list[str]:
    lines = ["| routing | tok/s | TTFT p50 | fleet $/1M out | " + " | ".join(f"{n} $/1M (tok)" for n in res["upstream_names"]) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(res["upstream_names"])]
    for name in ("throughput", "cost"):
        r = res[name]
        cells = []
        for n in res["upstream_names"]:
            u = r["upstreams"].get(n, {})
            v = u.get("usd_per_1m_output")
            cells.append(f"{'-' if v is None else f'{v:.3f}'} ({u.get('output_tokens', 0)})")
        fleet = r["fleet_usd_per_1m_output"]
        lines.append(f"| {name} | {r['tok_s']:.0f} | {r['ttft_p50_ms'] or 0:.0f} ms | "
                     f"{'-' if fleet is None else f'{fleet:.3f}'} | " + " | ".join(cells) + " |")
    lines += ["", "Hourly servers are priced for the whole window (busy or idle), hosted per token; "
              "gateway live figures are in the JSON (`gateway_live`)."]
    return lines


@scenario("cost", render=render)
async def run(bench) -> dict:
    res: dict[str, Any] = {"throughput": await _phase(bench, "throughput"), "cost": await _phase(bench, "cost")}
    res["upstream_names"] = sorted(res["throughput"]["upstreams"])
    t, c = res["throughput"]["fleet_usd_per_1m_output"], res["cost"]["fleet_usd_per_1m_output"]
    res["cost_vs_throughput_pct"] = round(100 * c / t, 1) if t and c else None
    return res


# ---- `class_cost`: batch prefer: cost vs not, on a mixed interactive + batch workload ----------------------------
#: Per-token prices of the `class_cost` fleet (USD per 1M input / output; GPU servers at a chargeback rate): the
#: fast GPU is dear, the slow GPU cheap, the hosted API as in default_fleet.yaml (its batch rates halve it).
CLASS_COST_PRICES: dict[str, dict[str, float]] = {
    "fast-gpu": {"input_per_1m": 1.0, "output_per_1m": 4.0},
    "slow-gpu": {"input_per_1m": 0.1, "output_per_1m": 0.3},
    "hosted": {"input_per_1m": 0.15, "cached_input_per_1m": 0.075, "output_per_1m": 0.6,
               "batch_input_per_1m": 0.075, "batch_output_per_1m": 0.3},
}
CLASS_COST_BATCH_WORKERS = 24


def class_cost_fleet(ports: dict[str, int], sims: dict, batch_prefer: str | None) -> dict:
    """The mixed scenario's fleet (interactive targets on) with CLASS_COST_PRICES and the batch class's `prefer`."""
    from gateway.config import default_classes
    from gateway.tools.scenarios import classes as C

    fleet = C._fleet(ports, sims, "throughput", True)
    for name, price in CLASS_COST_PRICES.items():
        fleet["upstreams"][name]["price"] = dict(price)
    batch = default_classes()["batch"].model_dump(mode="json") | {"prefer": batch_prefer}
    fleet["models"][C.B.MODEL]["classes"]["batch"] = batch
    return fleet


def class_usd_per_1m(recs: list, cls: str, prompt_tokens: int, t0: float, t1: float) -> dict:
    """What the class's requests that ended in [t0, t1) cost, priced client-side on the upstream that served each
    (x-gateway-upstream) at CLASS_COST_PRICES (batch rates for the batch class); pure."""
    micros = tokens = 0
    per_up: dict[str, int] = {}
    for r in recs:
        if r.cls != cls or not (t0 <= r.end < t1) or not r.tokens or r.upstream not in CLASS_COST_PRICES:
            continue
        p = Prices(**CLASS_COST_PRICES[r.upstream])
        micros += cost.request_cost_micros(p, cost.Tokens(prompt_tokens, 0, r.tokens), batch=cls == "batch")
        tokens += r.tokens
        per_up[r.upstream] = per_up.get(r.upstream, 0) + r.tokens
    return {"usd": cost.usd(micros), "output_tokens": tokens, "usd_per_1m_output": round(micros / tokens, 4) if tokens else None,
            "tokens_by_upstream": dict(sorted(per_up.items()))}


async def _class_cost_run(bench: Any, batch_prefer: str | None, phase: float, rate: float) -> dict:
    from gateway.tools.scenarios import classes as C

    o = bench.o
    tag = f"class-cost-{batch_prefer or 'off'}"
    sims = await C.B.start_sims(bench.procs, bench.sims, tag)
    gw = None
    try:
        gw = await C.B.start_gateway(bench.procs, class_cost_fleet(sims.ports, bench.sims, batch_prefer), tag)
        load = await C._drive(gw.url, rate, CLASS_COST_BATCH_WORKERS, phase, seed=13, surge=False)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            async with s.get(gw.url + "/v1/gateway/upstreams") as resp:
                snap = await resp.json()
    finally:
        await bench._teardown(gw, sims)
    s_ = C.summarise(load, o.warmup, phase, C.best_total(bench.sims))
    live = ((snap.get("cost") or {}).get("classes") or {}).get(C.B.MODEL, {})
    return {
        "batch": class_usd_per_1m(load.recs, "batch", C.PROMPT_TOKENS, o.warmup, 2 * phase),
        "interactive": class_usd_per_1m(load.recs, "interactive", C.PROMPT_TOKENS, o.warmup, 2 * phase),
        "interactive_slo": s_["interactive"], "batch_tok_s": s_["batch"]["tok_s"],
        "gateway_classes": {c: {k: f.get(k) for k in ("usd_per_1m_output_total", "spend_usd", "output_tokens")}
                            for c, f in live.items()},
    }


@scenario("class_cost", render=lambda r: render_class_cost(r))
async def class_cost(bench: Any) -> dict:
    """The same mixed workload (Poisson interactive answers with targets + a closed-loop batch backlog) twice on
    fresh simulators: the batch class without a preference (the pool's throughput strategy), then with
    `prefer: cost`. Bounded: two runs of 2 x phase seconds (phase <= 15 s)."""
    o = bench.o
    phase = 5.0 if o.quick else min(15.0, o.compare_duration)
    rate = 3.0 if o.quick else 6.0
    res: dict[str, Any] = {"phase_s": phase, "rate": rate, "batch_workers": CLASS_COST_BATCH_WORKERS,
                           "prices": CLASS_COST_PRICES, "runs": {}}
    for name, prefer in (("without", None), ("with_prefer_cost", "cost")):
        res["runs"][name] = await _class_cost_run(bench, prefer, phase, rate)
    off, on = (res["runs"][k]["batch"]["usd_per_1m_output"] for k in ("without", "with_prefer_cost"))
    res["batch_cost_vs_without_pct"] = round(100 * on / off, 1) if off and on else None
    res["error_count"] = sum(r["interactive_slo"]["errors"] for r in res["runs"].values())
    return res


def render_class_cost(r: dict) -> list[str]:
    from gateway.tools import bench as B

    lines = [f"Interactive: Poisson {r['rate']:g} req/s for {2 * r['phase_s']:g} s (targets from the `mixed` scenario); "
             f"batch: {r['batch_workers']} closed-loop workers. Per-token prices: " +
             ", ".join(f"{n} ${p['output_per_1m']:g}/1M out" for n, p in r["prices"].items()) + " (hosted batch $0.3).",
             "", "| batch class | batch $/1M out (client) | batch $/1M (gateway) | batch tokens by upstream | batch tok/s | "
             "interactive attainment | interactive TTFT p50 / p99 | interactive $/1M out |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, v in r["runs"].items():
        b, i, slo = v["batch"], v["interactive"], v["interactive_slo"]
        gw = (v["gateway_classes"].get("batch") or {}).get("usd_per_1m_output_total")
        lines.append(f"| {name} | {B._f(b['usd_per_1m_output'], 3)} | {B._f(gw, 3)} | "
                     f"{', '.join(f'{k} {n}' for k, n in b['tokens_by_upstream'].items())} | {B._f(v['batch_tok_s'], 0)} | "
                     f"{B._f(slo['attainment_pct'], 1, '%')} | {B._f(slo['ttft_p50_ms'], 0)} / {B._f(slo['ttft_p99_ms'], 0)} ms | "
                     f"{B._f(i['usd_per_1m_output'], 3)} |")
    lines.append(f"\nBatch $/1M with `prefer: cost` = {B._f(r['batch_cost_vs_without_pct'], 1, '%')} of without.")
    return lines
