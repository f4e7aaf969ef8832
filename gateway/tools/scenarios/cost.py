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
