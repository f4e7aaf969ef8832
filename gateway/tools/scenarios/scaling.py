"""`scaling`: what a replica costs as the fleet grows (issue 17).

Part 1, cost: for each number of upstreams (3, 30, 300, 1000) and of replicas (1, 4, 16 gateway processes sharing
Redis, where they fit on the machine), every upstream pointing at ONE zero-latency simulator (distinguished by
name only), it measures:
- idle CPU of the gateway processes (no traffic, `idle_s` seconds), and Redis commands/s and bytes/s meanwhile:
  one replica's own count (/v1/gateway/info, exact) and the server's INFO stats deltas (per replica = divided by
  the replicas; includes every other client of that server) plus the Redis server's own CPU (INFO cpu);
- under load (non-streamed chat, C=16 closed-loop clients, max_tokens 8): requests/s, gateway CPU per request,
  Redis commands/s;
- RSS of the gateway processes after the load.
The Redis server is shared with whatever else runs on the machine: its figures include that noise (run on a
quiet machine for the real numbers).

Part 2, routing quality: a heterogeneous 30-upstream GPU fleet (30 simulators of 10 kinds in one process), the
same closed-loop streaming load, once with exact scoring (every upstream every pick) and once with the sampled
pick (routing/candidates.py), each as % of the analytic optimum for that fleet.

Sizes: GATEWAY_BENCH_SCALING_UPSTREAMS / GATEWAY_BENCH_SCALING_REPLICAS (comma lists) override the defaults
(full: 3,30,300,1000 x 1,4,16; --quick: 3,300 x 1). GATEWAY_BENCH_SCALING_QUALITY=0 skips part 2.

Targets (issue 17): CPU/request at 300 upstreams <= 1.3x that at 3; idle CPU at 300 <= 5% of a core; Redis
commands/s per replica independent of idle upstreams; 16 replicas x 300 upstreams keep Redis under 20% of a
core; sampled routing within 2 points of exact on the 30-upstream fleet.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from gateway.sim import SimConfig
from gateway.sim.scaled import SCALE_MODEL, ZERO_LATENCY, scaled_fleet
from gateway.tools import bench as B
from gateway.tools.scenarios import scenario

LOAD_CLIENTS = 16
QUALITY_UPSTREAMS = 30


def _sizes(name: str, full: str, quick: str, is_quick: bool) -> list[int]:
    raw = os.environ.get(name) or (quick if is_quick else full)
    return [int(x) for x in raw.split(",") if x.strip()]


def _fits(upstreams: int, replicas: int) -> bool:
    """16 replicas x 1000 upstreams (16 processes, each ~100+ MB) does not fit a 2-core test machine usefully."""
    return replicas * upstreams <= 16 * 300 and replicas <= 4 * (os.cpu_count() or 2) * 2


async def _redis_info(url: str) -> dict[str, float]:
    import redis.asyncio as aioredis

    r = aioredis.from_url(url, socket_timeout=2)
    try:
        st = await r.info("stats")
        cpu = await r.info("cpu")
    finally:
        await r.aclose()
    return {"commands": st["total_commands_processed"], "bytes": st["total_net_input_bytes"] + st["total_net_output_bytes"],
            "cpu": cpu["used_cpu_sys"] + cpu["used_cpu_user"], "t": time.monotonic()}


def _redis_rates(a: dict[str, float], b: dict[str, float], replicas: int) -> dict[str, float]:
    dt = max(1e-6, b["t"] - a["t"])
    return {"redis_cmds_s": round((b["commands"] - a["commands"]) / dt, 1),
            "redis_cmds_s_per_replica": round((b["commands"] - a["commands"]) / dt / replicas, 1),
            "redis_bytes_s": round((b["bytes"] - a["bytes"]) / dt), "redis_cpu_pct": round(100 * (b["cpu"] - a["cpu"]) / dt, 2)}


def group_rss_bytes(pgid: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
            if int(raw[raw.rfind(b")") + 2:].split()[2]) != pgid:
                continue
            with open(f"/proc/{d}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


async def _own_sync(url: str) -> dict[str, Any]:
    """One replica's own count of what its fleet sync sent (GET /v1/gateway/info): immune to other Redis clients."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        info = await B._get_json(s, url + "/v1/gateway/info")
    c = info["sync"]["cost"]
    return {"replica": info["replica"], "commands": c["commands"], "bytes": c["bytes_out"] + c["bytes_in"],
            "t": time.monotonic()}


def _own_rates(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if a["replica"] != b["replica"]:  # several workers share the port: the two reads reached different ones
        return {"own_sync_cmds_s": None, "own_sync_bytes_s": None}
    dt = max(1e-6, b["t"] - a["t"])
    return {"own_sync_cmds_s": round((b["commands"] - a["commands"]) / dt, 1),
            "own_sync_bytes_s": round((b["bytes"] - a["bytes"]) / dt)}


async def _one_size(bench: Any, sim_url: str, n: int, replicas: int, idle_s: float, load_s: float) -> dict:
    o = bench.o
    fleet = scaled_fleet(n, [sim_url + "/v1"], strategy="throughput")
    fleet_dict = fleet.model_dump(mode="json", exclude={"upstreams": {"__all__": {"name"}}})
    gw = await B.start_gateway(bench.procs, fleet_dict, f"scale-{n}x{replicas}", workers=replicas, redis_url=o.redis_url)
    try:
        await asyncio.sleep(2.0)  # first loads, announcements
        s0 = await _own_sync(gw.url)
        r0, c0, t0 = await _redis_info(o.redis_url), B.group_cpu_seconds(gw.proc.pid), time.monotonic()
        await asyncio.sleep(idle_s)
        r1, c1, t1 = await _redis_info(o.redis_url), B.group_cpu_seconds(gw.proc.pid), time.monotonic()
        idle = ({"idle_cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 2)} | _redis_rates(r0, r1, replicas)
                | _own_rates(s0, await _own_sync(gw.url)))
        body = B.chat_body(SCALE_MODEL, 8, 8, stream=False)
        target = B.Target(gw.url + "/v1/chat/completions", body, LOAD_CLIENTS)
        r0, c0 = await _redis_info(o.redis_url), B.group_cpu_seconds(gw.proc.pid)
        res = await B.run_phase([target], min(1.0, o.warmup), load_s, streamed=False)
        r1, c1 = await _redis_info(o.redis_url), B.group_cpu_seconds(gw.proc.pid)
        # The CPU delta covers warm-up + window; requests/s is the window's: scale CPU to the window share.
        span = min(1.0, o.warmup) + load_s
        cores = (c1 - c0) / span
        loaded = {"rps": res["rps"], "errors": res["error_count"], "gateway_cores": round(cores, 3),
                  "cpu_ms_per_request": round(1000 * cores / res["rps"], 3) if res["rps"] else None,
                  "load_" + "redis_cmds_s_per_replica": _redis_rates(r0, r1, replicas)["redis_cmds_s_per_replica"]}
        return {"upstreams": n, "replicas": replicas, **idle, **loaded,
                "rss_mb": round(group_rss_bytes(gw.proc.pid) / 2**20, 1)}
    finally:
        await bench._teardown(gw)
        await B._redis_cleanup(o.redis_url, gw.redis_prefix)


def hetero_sims(n: int = QUALITY_UPSTREAMS) -> dict[str, SimConfig]:
    """n GPU simulators of 10 kinds: per-token step from 5 to 32 ms, batch cost and slots varying."""
    out = {}
    for i in range(n):
        k = i % 10
        out[f"up-{i}"] = SimConfig(name=f"sim-{i}", mode="gpu", base_step=0.005 + 0.003 * k,
                                   per_seq=0.0003 + 0.0002 * (k % 4), slots=8 + 4 * (k % 3), prefill_per_token=0.00001)
    return out


async def _quality(bench: Any) -> dict:
    """% of the analytic optimum on a heterogeneous 30-upstream fleet: exact vs sampled scoring."""
    o = bench.o
    sims = hetero_sims()
    c = max(o.concurrency, 2 * len(sims))
    opt = B.optimum(sims, c, o.max_tokens, o.prompt_tokens)
    sp = await B.start_sims(bench.procs, sims, "scale-quality")
    out: dict[str, Any] = {"upstreams": len(sims), "concurrency": c, "analytic_tok_s": opt["tok_s"]}
    try:
        ups = {n: {"provider": "openai", "kind": "gpu", "base_url": sp.url(n) + "/v1", "model": s.name,
                   "max_concurrency": s.slots, "capacity": {"a": s.base_step, "b": s.per_seq, "ttft": 0.05}}
               for n, s in sims.items()}
        fleet = {"upstreams": ups, "models": {SCALE_MODEL: {"upstreams": list(ups), "strategy": "throughput"}}}
        body = B.chat_body(SCALE_MODEL, o.prompt_tokens, o.max_tokens)
        for label, above in (("exact", "1000000"), ("sampled", "16")):
            gw = await B.start_gateway(bench.procs, fleet, f"scale-q-{label}",
                                       env={"GATEWAY_ROUTING_SAMPLE_ABOVE": above})
            try:
                r = await B.run_phase([B.Target(gw.url + "/v1/chat/completions", body, c)], o.warmup, o.compare_duration)
            finally:
                await bench._teardown(gw)
            out[label] = {"tok_s": r["tok_s"], "pct_of_analytic": round(100 * r["tok_s"] / opt["tok_s"], 1),
                          "errors": r["error_count"], "gateway_cores": r["cpu_cores"].get("gateway")}
    finally:
        await bench._teardown(sp)
    out["sampled_minus_exact_points"] = round(out["sampled"]["pct_of_analytic"] - out["exact"]["pct_of_analytic"], 1)
    return out


async def run(bench: Any) -> dict:
    o = bench.o
    ups = _sizes("GATEWAY_BENCH_SCALING_UPSTREAMS", "3,30,300,1000", "3,300", o.quick)
    reps = _sizes("GATEWAY_BENCH_SCALING_REPLICAS", "1,4,16", "1", o.quick)
    idle_s, load_s = (2.0, 2.0) if o.quick else (10.0, 10.0)
    sp = await B.start_sims(bench.procs, {"zero": ZERO_LATENCY}, "scale")
    rows, skipped = [], []
    try:
        for r in reps:
            for n in ups:
                if not _fits(n, r):
                    skipped.append(f"{n}x{r}")
                    continue
                print(f"  scaling: {n} upstreams x {r} replicas", flush=True)
                rows.append(await _one_size(bench, sp.url("zero"), n, r, idle_s, load_s))
    finally:
        await bench._teardown(sp)
    out: dict[str, Any] = {"rows": rows, "skipped": skipped, "idle_s": idle_s, "load_s": load_s}
    if os.environ.get("GATEWAY_BENCH_SCALING_QUALITY", "1") != "0":
        out["quality"] = await _quality(bench)
    out["targets"] = targets(rows, out.get("quality"))
    q = out.get("quality") or {}
    out["error_count"] = sum(x["errors"] for x in rows) + sum(q[k]["errors"] for k in ("exact", "sampled") if k in q)
    return out


def targets(rows: list[dict], quality: dict | None) -> dict[str, Any]:
    """The issue's done-when figures, from whatever sizes were run (None when a size was not run)."""
    def row(n: int, r: int = 1) -> dict | None:
        return next((x for x in rows if x["upstreams"] == n and x["replicas"] == r), None)

    r3, r300, r16 = row(3), row(300), row(300, 16)
    cpu3, cpu300 = (r3 or {}).get("cpu_ms_per_request"), (r300 or {}).get("cpu_ms_per_request")
    one = sorted((x for x in rows if x["replicas"] == 1), key=lambda x: x["upstreams"])
    return {
        "cpu_per_request_300_over_3": round(cpu300 / cpu3, 2) if cpu3 and cpu300 else None,
        "idle_cpu_pct_at_300": (r300 or {}).get("idle_cpu_pct"),
        "idle_redis_cmds_s_per_replica_by_upstreams": {x["upstreams"]: x["redis_cmds_s_per_replica"] for x in one},
        "idle_own_sync_cmds_s_by_upstreams": {x["upstreams"]: x.get("own_sync_cmds_s") for x in one},
        "redis_cpu_pct_16x300": (r16 or {}).get("redis_cpu_pct"),
        "quality_sampled_minus_exact_points": (quality or {}).get("sampled_minus_exact_points"),
    }


def render(r: dict) -> list[str]:
    lines = [
        f"Cost (idle {r['idle_s']:g} s, then non-streamed load C={LOAD_CLIENTS} for {r['load_s']:g} s; every upstream "
        "on one zero-latency simulator):",
        "",
        "| upstreams | replicas | idle CPU % | own sync cmds/s idle | own sync bytes/s idle | Redis cmds/s/replica idle "
        "| Redis bytes/s idle | Redis CPU % idle | RPS | CPU ms/req | Redis cmds/s/replica load | RSS MB | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        lines.append(f"| {x['upstreams']} | {x['replicas']} | {x['idle_cpu_pct']} | {B._f(x['own_sync_cmds_s'], 1)} | "
                     f"{B._f(x['own_sync_bytes_s'])} | {x['redis_cmds_s_per_replica']} | "
                     f"{x['redis_bytes_s']} | {x['redis_cpu_pct']} | {x['rps']} | {B._f(x['cpu_ms_per_request'], 3)} | "
                     f"{x['load_redis_cmds_s_per_replica']} | {x['rss_mb']} | {x['errors']} |")
    if r.get("skipped"):
        lines.append(f"\nNot run (does not fit this machine): {', '.join(r['skipped'])}.")
    q = r.get("quality")
    if q:
        lines += ["", f"Routing quality, {q['upstreams']} heterogeneous GPU upstreams, C={q['concurrency']}, analytic optimum "
                  f"{q['analytic_tok_s']:,.0f} tok/s: exact {q['exact']['pct_of_analytic']}%, sampled "
                  f"{q['sampled']['pct_of_analytic']}% ({q['sampled_minus_exact_points']:+} points)."]
    lines += ["", "Targets: " + ", ".join(f"{k} = {v}" for k, v in r["targets"].items())]
    return lines


scenario("scaling", render=render)(run)
