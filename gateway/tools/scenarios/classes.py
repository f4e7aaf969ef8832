"""`mixed`: interactive readers and a batch backlog on the same heterogeneous fleet (issue: service classes).

Interactive: open-loop Poisson arrivals of short streamed answers, with a decode floor and a TTFT target; after the
first phase their rate doubles (the surge). Batch: a closed-loop backlog of long requests sent with
`X-Gateway-Class: batch`. The same load runs against four gateways, one after the other, on fresh simulators:
service classes on (`classes`), the same router without class targets (`single_class`: the one-objective throughput
maximiser), round_robin and least_busy. Every request is judged client-side against the interactive targets.

Reported per variant and class: SLO attainment, goodput, tok/s, TTFT p50/p99; the total tok/s against the fleet's
best total (every GPU server at its slots, the hosted API's whole RPM budget spent on batch-length answers);
attainment after the surge (from 10 s after it on) and batch tok/s in each phase. GATEWAY_BENCH_MIXED_VARIANTS
(e.g. `classes`) runs only the named variants.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.tools import bench as B
from gateway.tools.scenarios import scenario

FLOOR_TOK_S = 40.0
MAX_TTFT_S = 1.0
INTERACTIVE_TOKENS = 64
BATCH_TOKENS = 512
PROMPT_TOKENS = 200
VARIANTS = (("classes", "throughput", True), ("single_class", "throughput", False),
            ("round_robin", "round_robin", False), ("least_busy", "least_busy", False))


@dataclass
class Rec:
    cls: str
    start: float
    first: float | None
    end: float
    tokens: int
    ok: bool
    upstream: str = ""  # x-gateway-upstream: who served it (the `class_cost` scenario prices it there)

    def met(self) -> bool:
        return self.miss() is None

    def miss(self) -> str | None:
        """Why the request missed the interactive targets (error, ttft, speed), or None."""
        if not self.ok or self.first is None:
            return "error"
        if self.first - self.start > MAX_TTFT_S:
            return "ttft"
        slow = self.tokens >= 2 and (self.tokens - 1) / max(1e-9, self.end - self.first) < FLOOR_TOK_S
        return "speed" if slow else None


class Load:
    """What one run produced: every request, and output tokens per class per second as they streamed."""

    def __init__(self) -> None:
        self.recs: list[Rec] = []
        self.buckets: dict[str, dict[int, int]] = {"interactive": {}, "batch": {}}
        #: (class, upstream) -> output tokens per second, as they streamed.
        self.by_upstream: dict[tuple[str, str], dict[int, int]] = {}
        self.origin = 0.0  # monotonic time of the start (seconds in the figures count from it)
        #: (seconds since the start, {upstream: requests running or waiting at its simulator}), when sampled.
        self.occupancy: list[tuple[float, dict[str, int]]] = []

    def tok_s(self, cls: str, t0: float, t1: float) -> float:
        b = self.buckets[cls]
        return sum(v for s, v in b.items() if t0 <= s < t1) / max(1e-9, t1 - t0)


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, cls: str, origin: float, load: Load) -> None:
    buckets = load.buckets[cls]
    t0 = time.monotonic()
    first = None
    n = 0
    ok = False
    upstream = ""
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json", "X-Gateway-Class": cls}) as r:
            upstream = r.headers.get("x-gateway-upstream", "")
            per_up = load.by_upstream.setdefault((cls, upstream), {})
            if r.status == 200:
                async for line in r.content:
                    if line.startswith(b'data: {"error"'):
                        break
                    if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                        now = time.monotonic()
                        first = first or now
                        n += 1
                        sec = int(now - origin)
                        buckets[sec] = buckets.get(sec, 0) + 1
                        per_up[sec] = per_up.get(sec, 0) + 1
                    elif line.startswith(b"data: [DONE]"):
                        ok = True
            else:
                await r.read()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        pass
    load.recs.append(Rec(cls, t0 - origin, None if first is None else first - origin, time.monotonic() - origin, n, ok, upstream))


async def _drive(url: str, rate: float, batch_workers: int, phase: float, seed: int, surge: bool = True,
                 load: Load | None = None) -> Load:
    """Phase 1 at `rate` interactive req/s, phase 2 at twice that (or the same without `surge`); the batch backlog
    (`batch_workers` closed-loop clients) runs throughout. Recorded into `load` (a fresh one if not given)."""
    rng = random.Random(seed)
    recs = Load() if load is None else load
    ibody = B.chat_body(B.MODEL, PROMPT_TOKENS, INTERACTIVE_TOKENS)
    bbody = B.chat_body(B.MODEL, PROMPT_TOKENS, BATCH_TOKENS)
    origin = recs.origin = time.monotonic()
    stop = origin + 2 * phase
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def batch_worker() -> None:
            while time.monotonic() < stop:
                await _one(s, url + "/v1/chat/completions", bbody, "batch", origin, recs)

        async def arrivals() -> None:
            inflight: set[asyncio.Task] = set()
            t = origin
            while True:
                now = time.monotonic()
                r = rate if now - origin < phase or not surge else 2 * rate
                t += rng.expovariate(r)
                if t >= stop:
                    break
                await asyncio.sleep(max(0.0, t - time.monotonic()))
                task = asyncio.create_task(_one(s, url + "/v1/chat/completions", ibody, "interactive", origin, recs))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            await asyncio.gather(*inflight, return_exceptions=True)

        workers = [asyncio.create_task(batch_worker()) for _ in range(batch_workers)]
        await arrivals()
        await asyncio.sleep(max(0.0, stop - time.monotonic()))
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return recs


async def _sample_occupancy(sims: B.SimFleetProc, load: Load, every: float = 0.5) -> None:
    """Requests running or waiting at each simulator every `every` s (until cancelled): the mean load per upstream
    shows where a class policy leaves slots idle (the fast GPU's room for interactive requests)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while True:
            row = {}
            for n in sims.ports:
                async with s.get(sims.url(n) + "/sim/stats") as r:
                    st = await r.json()
                    row[n] = st["running"] + st["waiting"]
            load.occupancy.append((time.monotonic() - load.origin, row))
            await asyncio.sleep(every)


def _mean_occupancy(load: Load, t0: float, t1: float) -> dict[str, float]:
    rows = [row for t, row in load.occupancy if t0 <= t < t1]
    return {n: round(sum(r[n] for r in rows) / len(rows), 1) for n in (rows[0] if rows else {})}


def _class_figures(load: Load, cls: str, t0: float, t1: float) -> dict:
    recs = [r for r in load.recs if r.cls == cls]
    rows = [r for r in recs if t0 <= r.start < t1]
    done = [r for r in recs if t0 <= r.end < t1]
    ttfts = [r.first - r.start for r in rows if r.first is not None]
    span = max(1e-9, t1 - t0)
    return {
        "requests": len(rows),
        "attainment_pct": round(100 * sum(r.met() for r in rows) / len(rows), 2) if rows else None,
        "tok_s": round(load.tok_s(cls, t0, t1), 1),
        "goodput_tok_s": round(sum(r.tokens for r in done if r.met()) / span, 1),
        "ttft_p50_ms": B._ms(B._pct(ttfts, 50)),
        "ttft_p99_ms": B._ms(B._pct(ttfts, 99)),
        "errors": sum(1 for r in rows if not r.ok),
    }


def summarise(load: Load, warmup: float, phase: float, best_total: float, feasible: float | None = None) -> dict:
    inter = [r for r in load.recs if r.cls == "interactive"]
    end = 2 * phase
    out: dict[str, Any] = {
        "interactive": _class_figures(load, "interactive", warmup, end),
        "batch": _class_figures(load, "batch", warmup, end),
        "phase1": {c: _class_figures(load, c, warmup, phase) for c in ("interactive", "batch")},
        "surge": {c: _class_figures(load, c, phase, end) for c in ("interactive", "batch")},
        "after_surge_10s": _class_figures(load, "interactive", phase + 10.0, end) if end - phase > 12 else None,
    }
    out["interactive_misses"] = _misses(inter, warmup, end)
    out["tok_s_by_upstream"] = _by_upstream(load, warmup, end)
    out["phase1"]["tok_s_by_upstream"] = _by_upstream(load, warmup, phase)
    out["surge"]["tok_s_by_upstream"] = _by_upstream(load, phase, end)
    if load.occupancy:
        out["phase1"]["mean_inflight_by_upstream"] = _mean_occupancy(load, warmup, phase)
        out["surge"]["mean_inflight_by_upstream"] = _mean_occupancy(load, phase, end)
    total = out["interactive"]["tok_s"] + out["batch"]["tok_s"]
    out["total_tok_s"] = round(total, 1)
    out["pct_of_best_total"] = round(100 * total / best_total, 1)
    if feasible:
        out["pct_of_slo_feasible_best"] = round(100 * total / feasible, 1)
    out["recovery_s"] = _recovery(inter, phase, end)
    return out


def _misses(recs: list[Rec], t0: float, t1: float) -> dict[str, dict[str, int]]:
    """Interactive requests that missed their targets, by the upstream that served them and why."""
    out: dict[str, dict[str, int]] = {}
    for r in recs:
        why = r.miss() if t0 <= r.start < t1 else None
        if why is not None:
            row = out.setdefault(r.upstream or "-", {})
            row[why] = row.get(why, 0) + 1
    return out


def _by_upstream(load: Load, t0: float, t1: float) -> dict[str, dict[str, float]]:
    """Output tok/s per upstream and class between t0 and t1 (seconds since the start)."""
    by_up: dict[str, dict[str, float]] = {}
    for (cls, up), secs in sorted(load.by_upstream.items()):
        rate = sum(v for sec, v in secs.items() if t0 <= sec < t1) / max(1e-9, t1 - t0)
        by_up.setdefault(up, {})[cls] = round(rate, 1)
    return by_up


def _recovery(inter: list[Rec], surge: float, end: float, bucket: float = 2.0) -> float | None:
    """Seconds after the surge from which every 2-s bucket of interactive arrivals has >= 99% attainment."""
    edges = [surge + i * bucket for i in range(int((end - surge) // bucket))]
    good_from = None
    for e in edges:
        rows = [r for r in inter if e <= r.start < e + bucket]
        ok = not rows or sum(r.met() for r in rows) / len(rows) >= 0.99
        if ok and good_from is None:
            good_from = e
        elif not ok:
            good_from = None
    return None if good_from is None else round(good_from - surge, 1)


def best_total(sims: dict, tokens: int = BATCH_TOKENS) -> float:
    """Every GPU server at its slots, plus the hosted API's RPM budget spent on `tokens`-long answers."""
    total = 0.0
    for c in sims.values():
        if c.mode == "gpu":
            total += B.gpu_tok_s(c, c.slots, tokens, PROMPT_TOKENS)
        else:
            total += min(c.rpm / 60 * tokens if c.rpm else float("inf"), (c.max_concurrency or 1) * c.tok_s)
    return total


def floor_slots(c: Any, tokens: int = BATCH_TOKENS, floor: float = FLOOR_TOK_S) -> int:
    """Most sequences a GPU sim runs with each still decoding at >= `floor` tok/s (its step time with the prefill of
    `tokens`-long requests' admissions spread over their steps, as gpu_tok_s counts it)."""
    per_seq = c.per_seq + c.prefill_per_token * PROMPT_TOKENS / tokens
    if 1.0 / floor <= c.base_step:
        return 0
    return min(c.slots, math.floor((1.0 / floor - c.base_step) / per_seq)) if per_seq > 0 else c.slots


def slo_feasible_best(sims: dict, tokens: int = BATCH_TOKENS) -> float:
    """best_total that the interactive targets allow: interactive requests run on some GPU server, and there the
    load may not pass the floor's cap (floor_slots: the fast GPU's 42 of 64), so that server cannot be at all its
    slots. Counted on the one server where the cap costs least; the others as in best_total."""
    loss = min((B.gpu_tok_s(c, c.slots, tokens, PROMPT_TOKENS) - B.gpu_tok_s(c, floor_slots(c, tokens), tokens, PROMPT_TOKENS)
                for c in sims.values() if c.mode == "gpu"), default=0.0)
    return best_total(sims, tokens) - loss


def _fleet(ports: dict[str, int], sims: dict, strategy: str, classes_on: bool) -> dict:
    fleet = B.fleet_yaml(ports, sims, strategy)
    targets = {"min_tok_s": FLOOR_TOK_S, "max_ttft_s": MAX_TTFT_S} if classes_on else {"min_tok_s": 0.0, "max_ttft_s": None}
    fleet["models"][B.MODEL]["classes"] = {"interactive": {**targets, "wait_s": 2.0}}
    return fleet


@scenario("mixed", render=lambda r: render(r))
async def mixed(bench: Any) -> dict:
    o = bench.o
    phase = o.compare_duration
    rate = 6.0 if not o.quick else 3.0
    batch_workers = 96 if not o.quick else 24
    best, feasible = best_total(bench.sims), slo_feasible_best(bench.sims)
    res: dict[str, Any] = {"rate": rate, "batch_workers": batch_workers, "phase_s": phase, "best_total_tok_s": round(best, 1),
                           "slo_feasible_best_tok_s": round(feasible, 1),
                           "floor_tok_s": FLOOR_TOK_S, "max_ttft_s": MAX_TTFT_S, "variants": {}}
    only = {v.strip() for v in os.environ.get("GATEWAY_BENCH_MIXED_VARIANTS", "").split(",") if v.strip()}
    for name, strategy, classes_on in VARIANTS:
        if only and name not in only:
            continue
        sims = await B.start_sims(bench.procs, bench.sims, f"mixed-{name}")
        gw = None
        try:
            gw = await B.start_gateway(bench.procs, _fleet(sims.ports, bench.sims, strategy, classes_on), f"mixed-{name}",
                                       strategy=strategy)
            recs = Load()
            sampler = asyncio.create_task(_sample_occupancy(sims, recs))
            try:
                recs = await _drive(gw.url, rate, batch_workers, phase, seed=7, load=recs)
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            preempted = await _preemptions(gw.url)
        finally:
            await bench._teardown(gw, sims)
        res["variants"][name] = summarise(recs, o.warmup, phase, best, feasible)
        res["variants"][name]["preemptions"] = preempted
        print(f"  mixed/{name}: " + json.dumps({k: res["variants"][name][k] for k in ("total_tok_s", "pct_of_best_total", "pct_of_slo_feasible_best")}
                                              | {"attainment": res["variants"][name]["interactive"]["attainment_pct"]}), flush=True)
    res["error_count"] = sum(v["interactive"]["errors"] for v in res["variants"].values())
    return res


def render(r: dict) -> list[str]:
    lines = [
        f"Interactive: Poisson {r['rate']:g} req/s then {2 * r['rate']:g} req/s (surge at {r['phase_s']:g} s), "
        f"{INTERACTIVE_TOKENS}-token answers, targets >= {r['floor_tok_s']:g} tok/s and TTFT <= {r['max_ttft_s']:g} s; "
        f"batch: {r['batch_workers']} closed-loop workers, {BATCH_TOKENS}-token answers. Fleet's best total "
        f"{r['best_total_tok_s']:,.0f} tok/s (every GPU server at all its slots); SLO-feasible best "
        f"{r.get('slo_feasible_best_tok_s', 0):,.0f} tok/s (the GPU serving interactive requests at most at its floor's cap).",
        "",
        "| variant | interactive attainment | after surge (+10 s) | recovery | interactive TTFT p50 / p99 | interactive goodput | "
        "batch tok/s (phase 1 / surge) | total tok/s | % of best total | % of SLO-feasible best |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in r["variants"].items():
        i, after = v["interactive"], v.get("after_surge_10s") or {}
        lines.append(
            f"| {name} | {B._f(i['attainment_pct'], 1, '%')} | {B._f(after.get('attainment_pct'), 1, '%')} | "
            f"{B._f(v['recovery_s'], 0, ' s')} | {B._f(i['ttft_p50_ms'], 0)} / {B._f(i['ttft_p99_ms'], 0)} ms | "
            f"{B._f(i['goodput_tok_s'], 0)} | {B._f(v['phase1']['batch']['tok_s'], 0)} / {B._f(v['surge']['batch']['tok_s'], 0)} | "
            f"{B._f(v['total_tok_s'], 0)} | {B._f(v['pct_of_best_total'], 1, '%')} | "
            f"{B._f(v.get('pct_of_slo_feasible_best'), 1, '%')} |"
        )
    for name, v in r["variants"].items():
        p1, p2 = v["phase1"].get("mean_inflight_by_upstream"), v["surge"].get("mean_inflight_by_upstream")
        if p1 and p2:
            lines.append(f"{name}: mean requests at each simulator (phase 1 / surge): "
                         + ", ".join(f"{n} {p1[n]:g} / {p2.get(n, 0):g}" for n in p1))
        if v.get("preemptions"):
            lines.append(f"{name}: preemptions by upstream: " + ", ".join(f"{n} {c:g}" for n, c in v["preemptions"].items()))
        if v.get("interactive_misses"):
            lines.append(f"{name}: interactive misses by upstream and reason: " + json.dumps(v["interactive_misses"]))
    return lines


async def _preemptions(url: str) -> dict[str, float]:
    """gateway_preemptions_total per upstream, from the gateway's /metrics."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("gateway_preemptions_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('upstream="', 1)[1].split('"', 1)[0]] = float(value)
    return out


async def _sim_tokens(sims: B.SimFleetProc) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        total = 0
        for n in sims.ports:
            async with s.get(sims.url(n) + "/sim/stats") as r:
                total += (await r.json())["tokens_generated"]
        return total


@scenario("batch_slo", render=lambda r: render_batch(r))
async def batch_slo(bench: Any) -> dict:
    """A Batch API job (2,000 lines) poured into what interactive traffic leaves free: interactive attainment with
    and without it, and the batch's tok/s against the free capacity, measured at the simulators."""
    from gateway.tools.scenarios import batch as batch_api

    o = bench.o
    phase, rate = o.compare_duration, (6.0 if not o.quick else 3.0)
    lines, max_tokens = (200, 64) if o.quick else (2000, 128)
    best, feasible = best_total(bench.sims, max_tokens), slo_feasible_best(bench.sims, max_tokens)
    sims = await B.start_sims(bench.procs, bench.sims, "batch-slo")
    gw = None
    try:
        gw = await B.start_gateway(bench.procs, _fleet(sims.ports, bench.sims, "throughput", True), "batch-slo",
                                   redis_url=o.redis_url, env={"GATEWAY_BATCH_WORKERS": "160"})
        t0 = await _sim_tokens(sims)
        alone = await _drive(gw.url, rate, 0, phase, seed=11, surge=False)
        fleet_alone = (await _sim_tokens(sims) - t0) / (2 * phase)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            started = time.monotonic()
            bid = await batch_api._submit(s, gw.url, batch_api._batch_file(lines, PROMPT_TOKENS, max_tokens))
            t1 = await _sim_tokens(sims)
            mixed = await _drive(gw.url, rate, 0, phase, seed=11, surge=False)
            fleet_mixed = (await _sim_tokens(sims) - t1) / (2 * phase)
            final = await batch_api._wait(s, gw.url, bid, timeout=120 if o.quick else 900)
            took = time.monotonic() - started
    finally:
        await bench._teardown(gw, sims)
        if gw is not None:
            await B._redis_cleanup(o.redis_url, gw.redis_prefix)
    a, m = summarise(alone, o.warmup, phase, best), summarise(mixed, o.warmup, phase, best)
    inter_tok_s = m["interactive"]["tok_s"]
    free = max(1e-9, best - a["interactive"]["tok_s"])
    free_feasible = max(1e-9, feasible - a["interactive"]["tok_s"])
    batch_during = max(0.0, fleet_mixed - inter_tok_s)
    return {
        "lines": lines, "max_tokens": max_tokens, "rate": rate, "best_total_tok_s": round(best, 1),
        "status": final.get("status"), "request_counts": final.get("request_counts"), "batch_seconds": round(took, 1),
        "interactive_alone": a["interactive"], "interactive_with_batch": m["interactive"],
        "fleet_tok_s_alone": round(fleet_alone, 1), "fleet_tok_s_with_batch": round(fleet_mixed, 1),
        "batch_tok_s_during": round(batch_during, 1), "free_capacity_tok_s": round(free, 1),
        "pct_of_free_capacity_used": round(100 * batch_during / free, 1),
        "slo_feasible_best_tok_s": round(feasible, 1), "slo_feasible_free_tok_s": round(free_feasible, 1),
        "pct_of_slo_feasible_free_used": round(100 * batch_during / free_feasible, 1),
        "error_count": a["interactive"]["errors"] + m["interactive"]["errors"],
    }


def render_batch(r: dict) -> list[str]:
    a, m = r["interactive_alone"], r["interactive_with_batch"]
    return [
        f"A {r['lines']}-line Batch API job ({r['max_tokens']}-token answers) while interactive Poisson traffic runs at "
        f"{r['rate']:g} req/s (targets >= {FLOOR_TOK_S:g} tok/s, TTFT <= {MAX_TTFT_S:g} s). Fleet's best total "
        f"{r['best_total_tok_s']:,.0f} tok/s.",
        "",
        "| | interactive attainment | interactive TTFT p50 / p99 | interactive tok/s | fleet tok/s (simulators) |",
        "|---|---:|---:|---:|---:|",
        f"| interactive alone | {B._f(a['attainment_pct'], 1, '%')} | {B._f(a['ttft_p50_ms'], 0)} / {B._f(a['ttft_p99_ms'], 0)} ms | "
        f"{B._f(a['tok_s'], 0)} | {B._f(r['fleet_tok_s_alone'], 0)} |",
        f"| with the batch | {B._f(m['attainment_pct'], 1, '%')} | {B._f(m['ttft_p50_ms'], 0)} / {B._f(m['ttft_p99_ms'], 0)} ms | "
        f"{B._f(m['tok_s'], 0)} | {B._f(r['fleet_tok_s_with_batch'], 0)} |",
        "",
        f"Batch tok/s while interactive ran: {B._f(r['batch_tok_s_during'], 0)} = {B._f(r['pct_of_free_capacity_used'], 1, '%')} "
        f"of the {B._f(r['free_capacity_tok_s'], 0)} tok/s interactive traffic left free (every GPU server at all its "
        f"slots), {B._f(r.get('pct_of_slo_feasible_free_used'), 1, '%')} of the {B._f(r.get('slo_feasible_free_tok_s'), 0)} "
        f"tok/s it leaves free within the targets (the GPU serving interactive requests at most at its floor's cap); "
        f"batch {r['status']} in {r['batch_seconds']:g} s, counts {r['request_counts']}.",
    ]
