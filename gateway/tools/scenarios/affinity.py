"""Bench scenario `affinity` (issue 11): KV-cache-aware routing on a multi-turn workload.

Workload: K tenants, each with a shared system prompt of 1-4k tokens; closed-loop workers each run conversations
of 5-10 turns back to back (history grows every turn, answers of 100-300 tokens), streamed, on the calibrated
prefix-caching fleet (sim/reference.py calibrated_sims: two KV-engine GPUs and a hosted API with prompt caching).
The same seeded workload runs, each on fresh simulators, through:

- `throughput+affinity` (the default), `throughput` without affinity (the pool's `affinity: false` switch),
  `round_robin`, `least_busy`;
- a perfect-stickiness oracle's hit rate, computed offline over the affinity run's own requests: one unbounded
  cache that every request hits for its longest already-sent block prefix (an upper bound on any placement);
- the affinity gateway with two replicas (with Redis), for the hit rate of per-replica indexes vs one;
- a no-shared-prefix workload (every request a fresh prompt) with and without affinity: the cost of hashing.

Reported per variant: output tok/s, TTFT p50/p99, prefix hit rate (cached / prompt tokens, from usage), the
highest in-flight / max_concurrency seen on any upstream, and the gateway's peak queue depth.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.tools.scenarios import scenario

MODEL = "fleet-model"


@dataclass
class Rec:
    """What the client saw of the requests finished inside the measured window."""

    t0: float = 0.0
    t1: float = 0.0
    out_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    #: Every prompt in send order, and whether it was sent inside the window (for the oracle's hit rate).
    bodies: list[tuple[bool, list[dict]]] = field(default_factory=list)
    peak_util: float = 0.0
    peak_queue: int = 0

    def add(self, start: float, ttft: float | None, usage: dict) -> None:
        if not (self.t0 <= start and time.monotonic() <= self.t1):
            return
        self.out_tokens += usage.get("completion_tokens", 0)
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if ttft is not None:
            self.ttfts.append(ttft)


def _words(n: int, salt: int) -> str:
    from gateway.sim.server import WORDS

    return "".join(WORDS[(i * 7 + salt * 13) % len(WORDS)] for i in range(n))


async def _stream(http: aiohttp.ClientSession, url: str, msgs: list[dict], max_tokens: int, rec: Rec) -> str:
    start = time.monotonic()
    body = {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    ttft, text, usage = None, [], None
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            rec.errors += 1
            await r.read()
            await asyncio.sleep(0.2)
            return ""
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                ttft = ttft if ttft is not None else time.monotonic() - start
                text.append(chunk["choices"][0]["delta"]["content"])
            usage = chunk.get("usage") or usage
    rec.add(start, ttft, usage or {})
    return "".join(text)


async def _worker(wid: int, url: str, tenants: list[str], shared: bool, rec: Rec, stop: float, seed: int) -> None:
    """Conversations back to back until `stop`; `shared`: multi-turn on tenant prompts, else fresh prompts."""
    rnd = random.Random(seed * 1000 + wid)
    conv = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        while time.monotonic() < stop:
            conv += 1
            if shared:
                msgs = [{"role": "system", "content": tenants[rnd.randrange(len(tenants))]}]
                turns = rnd.randint(5, 10)
            else:  # no shared prefix anywhere: a unique first line, then a prompt of tenant-like size
                msgs = [{"role": "system", "content": f"Request {seed}-{wid}-{conv}. " + _words(rnd.randint(700, 2800), rnd.randrange(10**6))}]
                turns = 1
            for t in range(turns):
                if time.monotonic() >= stop:
                    return
                msgs.append({"role": "user", "content": f"[{wid}.{conv}.{t}] " + _words(rnd.randint(20, 60), rnd.randrange(10**6))})
                rec.bodies.append((rec.t0 <= time.monotonic(), list(msgs)))
                answer = await _stream(http, url, msgs, rnd.randint(100, 300), rec)
                msgs.append({"role": "assistant", "content": answer})


async def _monitor(url: str, rec: Rec, stop: float) -> None:
    """Peak utilisation of any upstream (in flight / max_concurrency) and peak gateway queue depth."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < stop:
            try:
                async with http.get(url + "/v1/gateway/upstreams") as r:
                    snap = await r.json()
                for u in snap["upstreams"]:
                    rec.peak_util = max(rec.peak_util, u["inflight"] / max(1, u["max_concurrency"]))
                rec.peak_queue = max(rec.peak_queue, sum(snap.get("queue_depth", {}).values()))
            except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.5)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def oracle_hit_rate(bodies: list[tuple[bool, list[dict]]]) -> float:
    """Hit rate of one unbounded cache seeing every prompt in send order (warm-up included, counted inside the
    window only): the perfect-stickiness upper bound."""
    from gateway.routing import prefix

    seen: set[int] = set()
    hit = total = 0
    for counted, msgs in bodies:
        ids = prefix.prompt_token_ids({"messages": msgs})
        hashes = prefix.block_hashes(ids)
        n = 0
        limit = max(0, len(ids) - 1) // prefix.BLOCK_SIZE
        while n < min(limit, len(hashes)) and hashes[n] in seen:
            n += 1
        if counted:
            hit += n * prefix.BLOCK_SIZE
            total += len(ids)
        seen.update(hashes)
    return hit / total if total else 0.0


async def _variant(bench: Any, tag: str, strategy: str, affinity: bool, *, shared: bool = True, workers: int = 1) -> dict:
    from gateway.sim.reference import calibrated_fleet, calibrated_sims
    from gateway.tools.bench import start_gateway, start_sims

    o = bench.o
    sims = calibrated_sims(kv_scale=0.25)
    sp = await start_sims(bench.procs, sims, tag)
    cfg = calibrated_fleet(sp.ports, sims)
    for mc in cfg.models.values():
        mc.strategy, mc.affinity = strategy, affinity
    fleet = cfg.model_dump(mode="json", exclude={"upstreams": {"__all__": {"name"}}})
    redis = o.redis_url if workers > 1 else ""
    gw = await start_gateway(bench.procs, fleet, tag, workers=workers, redis_url=redis, strategy=strategy)
    try:
        return await _drive(gw.url, o, shared)
    finally:
        await bench._teardown(gw, sp)


async def _drive(url: str, o: Any, shared: bool) -> dict:
    k = 4
    tenants = [f"You are the assistant of tenant {i}. " + _words(1000 + 1000 * i, 1000 + i) for i in range(k)]  # 1-4k tokens
    duration = max(o.compare_duration, 12.0)
    now = time.monotonic()
    rec = Rec(t0=now + o.warmup, t1=now + o.warmup + duration)
    stop = rec.t1
    tasks = [asyncio.create_task(_worker(w, url, tenants, shared, rec, stop, 7)) for w in range(o.concurrency)]
    tasks.append(asyncio.create_task(_monitor(url, rec, stop)))
    await asyncio.gather(*tasks)
    return {
        "tok_s": round(rec.out_tokens / duration, 1),
        "ttft_p50_ms": _ms(_pct(rec.ttfts, 0.5)),
        "ttft_p99_ms": _ms(_pct(rec.ttfts, 0.99)),
        "hit_rate": round(rec.cached_tokens / rec.prompt_tokens, 4) if rec.prompt_tokens else None,
        "requests": len(rec.ttfts),
        "error_count": rec.errors,
        "peak_upstream_utilisation": round(rec.peak_util, 3),
        "peak_queue": rec.peak_queue,
        "_bodies": rec.bodies,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


@scenario("affinity", render=lambda r: render(r))
async def run(bench: Any) -> dict:
    variants = [("throughput+affinity", "throughput", True), ("throughput", "throughput", False),
                ("round_robin", "round_robin", False), ("least_busy", "least_busy", False)]
    out: dict[str, Any] = {}
    for name, strategy, aff in variants:
        print(f"  affinity: {name} ...", flush=True)
        out[name] = await _variant(bench, f"aff-{name.replace('+', '-')}", strategy, aff)
    bodies = out["throughput+affinity"].pop("_bodies")
    out["oracle_hit_rate"] = round(await asyncio.to_thread(oracle_hit_rate, bodies), 4)
    for r in out.values():
        if isinstance(r, dict):
            r.pop("_bodies", None)
    if bench.o.redis_url:
        print("  affinity: two replicas ...", flush=True)
        out["two_replicas"] = await _variant(bench, "aff-2rep", "throughput", True, workers=2)
        out["two_replicas"].pop("_bodies")
    for name, aff in (("no_shared_prefix+affinity", True), ("no_shared_prefix", False)):
        print(f"  affinity: {name} ...", flush=True)
        out[name] = await _variant(bench, f"aff-{name.replace('+', '-')}", "throughput", aff, shared=False)
        out[name].pop("_bodies")
    out.update(_verdict(out))
    out["error_count"] = sum(r.get("error_count", 0) for r in out.values() if isinstance(r, dict))
    return out


def _verdict(out: dict) -> dict:
    a, b = out["throughput+affinity"], out["throughput"]
    v: dict[str, Any] = {}
    if a.get("ttft_p50_ms") and b.get("ttft_p50_ms"):
        v["ttft_p50_ratio"] = round(b["ttft_p50_ms"] / a["ttft_p50_ms"], 2)  # target >= 2
    if b.get("tok_s"):
        v["tok_s_ratio"] = round(a["tok_s"] / b["tok_s"], 3)  # target >= 1.3
    if out.get("oracle_hit_rate"):
        v["hit_rate_vs_oracle"] = round((a.get("hit_rate") or 0) / out["oracle_hit_rate"], 3)  # target >= 0.9
    n1, n0 = out["no_shared_prefix+affinity"], out["no_shared_prefix"]
    if n0.get("tok_s"):
        v["no_shared_prefix_ratio"] = round(n1["tok_s"] / n0["tok_s"], 3)  # target >= 0.98
    if "two_replicas" in out and a.get("hit_rate") is not None and out["two_replicas"].get("hit_rate") is not None:
        v["two_replicas_hit_rate_points"] = round(100 * (out["two_replicas"]["hit_rate"] - a["hit_rate"]), 1)  # >= -5
    return v


def render(r: dict) -> list[str]:
    lines = ["", "### KV-cache affinity (multi-turn, calibrated prefix-caching fleet)", "",
             "| variant | tok/s | TTFT p50 | TTFT p99 | hit rate | requests | peak util | peak queue | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, x in r.items():
        if isinstance(x, dict) and "tok_s" in x:
            lines.append(f"| {name} | {x['tok_s']} | {x['ttft_p50_ms']} ms | {x['ttft_p99_ms']} ms | {x['hit_rate']} | "
                         f"{x['requests']} | {x['peak_upstream_utilisation']} | {x['peak_queue']} | {x['error_count']} |")
    lines += ["", f"oracle hit rate {r.get('oracle_hit_rate')}; TTFT p50 without/with affinity {r.get('ttft_p50_ratio')} "
              f"(target >= 2); tok/s with/without {r.get('tok_s_ratio')} (>= 1.3); hit rate / oracle "
              f"{r.get('hit_rate_vs_oracle')} (>= 0.9); no shared prefix with/without {r.get('no_shared_prefix_ratio')} "
              f"(>= 0.98); two replicas' hit rate minus one's {r.get('two_replicas_hit_rate_points')} points (>= -5)"]
    return lines
