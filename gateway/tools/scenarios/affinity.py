"""Bench scenario `affinity` (issue 11): KV-cache-aware routing on multi-turn workloads.

Closed-loop workers each run conversations of 5-10 turns back to back (history grows every turn, answers of
100-300 tokens, streamed) on prefix-caching engines, in these settings:

- `mixed`: four tenants sharing system prompts of 1-4k tokens, on the calibrated fleet (sim/reference.py
  calibrated_sims: an H100 and an A10G KV engine and a hosted API with prompt caching). The H100 takes most of
  the traffic and the shared prompts are cached wherever requests go, so placement has little left to win.
- `similar`: the same tenant workload on four identical H100 engines (how replicas of one vLLM model are run).
- `documents`: four identical H100 engines; every conversation opens with its own 2-4k-token document
  ("chat with this file"), so only the engine that prefilled it holds it: here placement decides the hit rate.
- `documents_a10g`: the same on four A10G engines, whose prefill is ~8x slower: what a miss costs there.
- `many_tenants`: the regime of the published cache-aware-routing results (SGLang's router, llm-d): more shared
  prompts than one engine's prefix cache holds, so only placement that partitions them across engines keeps
  them hot. K tenants (24; GATEWAY_BENCH_AFFINITY_TENANTS) with system prompts spread evenly over 1-4k tokens,
  ~60k tokens in all, on four A10G engines at the preset's own KV capacity (~42k tokens: Llama-3-8B fp16 on a
  24 GB A10G, no kv_scale) plus the calibrated hosted API (prompt caching from 1,024 tokens, RPM/TPM-limited):
  the issue's fleet. The tenants' prompts are 1.4x one engine's whole KV, which also holds its running
  sequences, and ~36% of the four engines' 168k: one engine cannot keep them all, four can if each keeps its
  share. The A10G makes a miss cost what it costs on real mid-range GPUs (~150 ms per 1k prompt tokens). Users
  think before every turn (exponential, mean 2 s; GATEWAY_BENCH_AFFINITY_THINK_S): far shorter than a real user
  reading a 200-token answer, but several other requests arrive meanwhile, so the engine that just freed a slot
  is no longer by itself the least loaded (with no think time the no-affinity router sends the next turn back
  to it by accident: part of the other settings' baseline hit rate); a longer one would leave 32 workers'
  engines mostly idle in a short window. Measured over 50 s like `documents_a10g`. Also through `round_robin`
  and `least_busy`; its hit rate is also given on the GPU engines alone (`gpu_hit_rate`), the oracle's terms.
- `saturated`: the `many_tenants` fleet and workload with 64 users (GATEWAY_BENCH_AFFINITY_SATURATED_WORKERS)
  instead of --concurrency: enough conversations that the A10Gs' KV cache, not the users, bounds the load. With
  32 users the engines decode most of the time and a prefix-blind router already finds half the prompt tokens
  cached, so no placement can raise tok/s by much (gateway/tools/affinity_bound.py computes the bound from the
  simulator's cost model: ~1.1x); here where each tenant's conversations run decides how many fit.

Each runs, on fresh simulators, through `throughput+affinity` (the default) and `throughput` without affinity
(the pool's `affinity: false`); `mixed` also through `round_robin` and `least_busy`. Each also runs the
perfect-stickiness oracle (`sticky_oracle`, StickyOracle): no gateway; every turn of a conversation is sent
straight to the one GPU engine the conversation was given when it started (the one with the fewest open
conversations per slot), on the same simulators with the same finite caches. Its hit rate is the reference of
"hit rate / oracle": what never moving a conversation gets, not an upper bound on any placement (an engine it
overfills evicts its own conversations' prefixes; the hosted sim is left out, as its RPM limit would refuse the
oracle's unmetered traffic). Beside them: the documents workload through two gateway replicas (with Redis:
per-replica indexes vs one); a `fresh` workload (no prefix shared by any two requests) with and without
affinity: the cost of hashing.

GATEWAY_BENCH_AFFINITY_SETTINGS (comma list of mixed, similar, documents, documents_a10g, many_tenants, saturated, extras: the
two-replica and no-shared-prefix runs) and GATEWAY_BENCH_AFFINITY_VARIANTS (comma list of variant names) run only those, to
iterate on one setting; the default is everything.

Reported per variant: output tok/s, TTFT p50/p99, prefix hit rate (cached / prompt tokens, from usage), the
highest in-flight / max_concurrency seen on any upstream, and the gateway's peak queue depth; in the JSON also
each upstream's request count and hit rates over the whole run (where hits are won or lost).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field, replace
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
    hosted_prompt: int = 0  # of which served by the hosted upstream (the oracle sends nothing there)
    hosted_cached: int = 0
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0
    peak_util: float = 0.0
    peak_queue: int = 0

    def add(self, start: float, ttft: float | None, usage: dict, upstream: str | None = None) -> None:
        if not (self.t0 <= start and time.monotonic() <= self.t1):
            return
        self.out_tokens += usage.get("completion_tokens", 0)
        prompt, cached = usage.get("prompt_tokens", 0), (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        if upstream == "hosted":
            self.hosted_prompt += prompt
            self.hosted_cached += cached
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
    rec.add(start, ttft, usage or {}, r.headers.get("x-gateway-upstream"))
    return "".join(text)


@dataclass(frozen=True)
class Users:
    """Who talks: `tenants` system prompts of 1-4k tokens (evenly spread: 1k, 2k, 3k, 4k for four), the mean
    think time before each turn (0: the next turn is sent as soon as the answer ends), and how many users
    (closed-loop workers; 0: the bench's --concurrency)."""

    tenants: int = 4
    think: float = 0.0
    workers: int = 0

    def prompts(self) -> list[str]:
        k = self.tenants
        return [f"You are the assistant of tenant {i}. " + _words(1000 + 3000 * i // max(1, k - 1), 1000 + i)
                for i in range(k)]


#: Workloads: `tenants` (a few shared system prompts of 1-4k tokens, short turns: the shared part is cached on
#: every engine whatever the placement), `documents` (a short system prompt, then a document of 2-4k tokens unique
#: to the conversation and questions about it: only the engine that saw the document has it cached), `fresh`
#: (no prefix shared by any two requests: what hashing costs when nothing can hit).
WORKLOADS = ("tenants", "documents", "fresh")


def _opening(workload: str, tenants: list[str], rnd: random.Random, tag: str) -> tuple[list[dict], int]:
    """A conversation's first messages and its number of turns."""
    if workload == "tenants":
        return [{"role": "system", "content": tenants[rnd.randrange(len(tenants))]}], rnd.randint(5, 10)
    if workload == "documents":
        doc = f"Document {tag}. " + _words(rnd.randint(2000, 4000), rnd.randrange(10**6))
        return [{"role": "system", "content": tenants[0][:800]}, {"role": "user", "content": doc},
                {"role": "assistant", "content": "I have read the document."}], rnd.randint(5, 10)
    return [{"role": "system", "content": f"Request {tag}. " + _words(rnd.randint(700, 2800), rnd.randrange(10**6))}], 1


async def _worker(wid: int, route: Route, tenants: list[str], workload: str, rec: Rec, stop: float,
                  seed: int, think: float = 0.0) -> None:
    """Conversations back to back until `stop` (each turn's answer joins the history), placed by `route`;
    `think` > 0: the user thinks an exponential time of that mean before every turn (a new conversation's first
    one too, which staggers the start)."""
    rnd = random.Random(seed * 1000 + wid)
    pause = random.Random(seed * 1000 + wid + 10**6)  # its own stream: the workload's draws stay the same
    conv = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        while time.monotonic() < stop:
            conv += 1
            tag = f"{seed}-{wid}-{conv}"
            msgs, turns = _opening(workload, tenants, rnd, tag)
            url = route.open(tag)
            for t in range(turns):
                if think:
                    await asyncio.sleep(pause.expovariate(1 / think))
                if time.monotonic() >= stop:
                    break
                msgs.append({"role": "user", "content": f"[{wid}.{conv}.{t}] " + _words(rnd.randint(20, 60), rnd.randrange(10**6))})
                answer = await _stream(http, url, msgs, rnd.randint(100, 300), rec)
                msgs.append({"role": "assistant", "content": answer})
            route.close(tag)


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


class Route:
    """Where a conversation's turns go: through the gateway, always the same URL."""

    def __init__(self, url: str = "") -> None:
        self.url = url

    def open(self, conv: str) -> str:
        return self.url

    def close(self, conv: str) -> None:
        pass


class StickyOracle(Route):
    """The perfect-stickiness oracle: every turn of a conversation goes to the one GPU engine it was given when it
    started, never another; a new conversation is given the engine with the fewest open conversations per slot
    (so a 64-slot H100 gets 4x those of a 16-slot A10G). It reads no cache or load state, so its hit rate is what
    placement that never moves a conversation gets from the same finite caches: the issue's reference (not an
    upper bound: an engine it overfills evicts its own conversations' prefixes)."""

    def __init__(self, urls: dict[str, str], slots: dict[str, int]) -> None:
        super().__init__()
        self.urls, self.slots = urls, slots
        self.open_convs = {n: 0 for n in urls}
        self.placed: dict[str, str] = {}

    def open(self, conv: str) -> str:
        n = min(sorted(self.urls), key=lambda k: (self.open_convs[k] + 1) / self.slots[k])
        self.open_convs[n] += 1
        self.placed[conv] = n
        return self.urls[n]

    def close(self, conv: str) -> None:
        self.open_convs[self.placed.pop(conv)] -= 1


#: Fleets of identical engines: (calibrated preset's upstream in calibrated_sims, KV scale). The H100 prefills
#: ~65k tokens/s, so a cache miss costs it little; the A10G prefills ~8x slower (and holds ~42k KV tokens).
SIMILAR = {"similar": ("fast-gpu", 0.25), "a10g": ("slow-gpu", 1.0)}
#: Measured window per fleet, in units of --compare-duration. Four A10Gs serve ~2.7 requests/s in all: in 25 s,
#: ~50 requests, nearly all second or third turns of the conversations that opened together at the start (the
#: hit rate then measures one start-up transient, +-5 points run to run); 50 s hold ~135, conversations' whole
#: lives and their successors. Same workload, a longer look at it.
WINDOW = {"a10g": 2.0, "a10g_hosted": 2.0}
#: `many_tenants` defaults (GATEWAY_BENCH_AFFINITY_TENANTS, GATEWAY_BENCH_AFFINITY_THINK_S override them).
MANY_TENANTS = 24
THINK_S = 2.0
#: `saturated`: users on the `many_tenants` fleet (GATEWAY_BENCH_AFFINITY_SATURATED_WORKERS overrides it).
SATURATED_WORKERS = 64


def _similar_sims(shape: str, n: int = 4) -> dict:
    """`n` identical KV engines with prefix caching: how vLLM replicas of one model are deployed, and where
    placement decides the hit rate (a conversation's history is cached on one replica only)."""
    from gateway.sim.reference import calibrated_sims

    which, kv_scale = SIMILAR[shape]
    one = calibrated_sims(kv_scale=kv_scale)[which]
    return {f"gpu-{i}": replace(one, name=f"sim-gpu-{i}") for i in range(n)}


def _sims(shape: str) -> dict:
    """The simulators of a fleet shape: `mixed` the calibrated fleet, `a10g_hosted` four A10Gs (the preset's own
    KV capacity) and the calibrated hosted API (prompt caching from 1,024 tokens), else _similar_sims."""
    from gateway.sim.reference import calibrated_sims

    if shape == "mixed":
        return calibrated_sims(kv_scale=0.25)
    if shape == "a10g_hosted":
        return {**_similar_sims("a10g"), "hosted": calibrated_sims()["hosted"]}
    return _similar_sims(shape)


def _fleet(shape: str, ports: dict[str, int], sims: dict) -> Any:
    from gateway.config import CapacityHint, load_fleet
    from gateway.settings import DEFAULT_FLEET
    from gateway.sim.reference import calibrated_fleet
    from gateway.sim.scaled import scaled_fleet
    from gateway.sim.virtual import capacity_hint

    if shape == "mixed":
        return calibrated_fleet(ports, sims)
    names = [n for n, s in sims.items() if s.mode == "gpu"]  # identical engines: one fitted seed serves them all
    cfg = scaled_fleet(len(names), [f"http://127.0.0.1:{ports[n]}/v1" for n in names], model=MODEL,
                       max_concurrency=sims[names[0]].slots, hints=[CapacityHint(**capacity_hint(sims[names[0]]))])
    for i, n in enumerate(names):
        cfg.upstreams[f"up-{i}"].metrics_url = f"http://127.0.0.1:{ports[n]}/metrics"
    if "hosted" in sims:  # the demo fleet's hosted upstream (limits, prices, capacity seed) on this simulator
        hosted = load_fleet(DEFAULT_FLEET).upstreams["hosted"]
        hosted.base_url = f"http://127.0.0.1:{ports['hosted']}/v1"
        hosted.rpm, hosted.tpm = sims["hosted"].rpm, sims["hosted"].tpm
        cfg.upstreams["hosted"] = hosted
        cfg.models[MODEL].upstreams.append("hosted")
    return cfg


async def _variant(bench: Any, tag: str, strategy: str, affinity: bool, *, workload: str = "tenants",
                   workers: int = 1, shape: str = "mixed", users: Users | None = None) -> dict:
    """One variant on fresh simulators; strategy "sticky": the oracle, sent straight to the GPU engines."""
    from gateway.tools.bench import start_gateway, start_sims

    o = bench.o
    users = users or Users()
    sims = _sims(shape)
    sp = await start_sims(bench.procs, sims, tag)
    if strategy == "sticky":
        gpus = [n for n, s in sims.items() if s.mode == "gpu"]
        try:
            oracle = StickyOracle({n: sp.url(n) for n in gpus}, {n: sims[n].slots for n in gpus})
            return await _drive(oracle, None, o, workload, WINDOW.get(shape, 1.0), users)
        finally:
            await bench._teardown(sp)
    cfg = _fleet(shape, sp.ports, sims)
    for mc in cfg.models.values():
        mc.strategy, mc.affinity = strategy, affinity
    fleet = cfg.model_dump(mode="json", exclude={"upstreams": {"__all__": {"name"}}})
    redis = o.redis_url if workers > 1 else ""
    gw = await start_gateway(bench.procs, fleet, tag, workers=workers, redis_url=redis, strategy=strategy)
    try:
        return await _drive(Route(gw.url), gw.url, o, workload, WINDOW.get(shape, 1.0), users)
    finally:
        await bench._teardown(gw, sp)


async def _drive(route: Route, gateway: str | None, o: Any, workload: str, window: float = 1.0,
                 users: Users = Users()) -> dict:
    tenants = users.prompts()
    duration = max(o.compare_duration, 12.0) * window
    now = time.monotonic()
    rec = Rec(t0=now + o.warmup, t1=now + o.warmup + duration)
    stop = rec.t1
    tasks = [asyncio.create_task(_worker(w, route, tenants, workload, rec, stop, 7, users.think))
             for w in range(users.workers or o.concurrency)]
    if gateway is not None:
        tasks.append(asyncio.create_task(_monitor(gateway, rec, stop)))
    await asyncio.gather(*tasks)
    per_upstream = await _cache_figures(gateway) if gateway is not None else {}
    return {
        "tok_s": round(rec.out_tokens / duration, 1),
        "ttft_p50_ms": _ms(_pct(rec.ttfts, 0.5)),
        "ttft_p99_ms": _ms(_pct(rec.ttfts, 0.99)),
        "hit_rate": round(rec.cached_tokens / rec.prompt_tokens, 4) if rec.prompt_tokens else None,
        **({"gpu_hit_rate": round((rec.cached_tokens - rec.hosted_cached) / gpu, 4)}
           if rec.hosted_prompt and (gpu := rec.prompt_tokens - rec.hosted_prompt) else {}),
        "requests": len(rec.ttfts),
        "error_count": rec.errors,
        "peak_upstream_utilisation": round(rec.peak_util, 3),
        "peak_queue": rec.peak_queue,
        **({"upstreams": per_upstream} if per_upstream else {}),
    }


async def _cache_figures(url: str) -> dict:
    """Per upstream at the end (the whole run, warm-up included): requests, the gateway's measured hit rate and
    calibration, and the engine's own hit rate: where a setting's hits are won or lost."""
    keys = ("requests", "hit_rate", "calibration", "engine_hit_rate")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(url + "/v1/gateway/upstreams") as r:
                snap = await r.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return {}
    return {u["name"]: {k: u["cache"].get(k) for k in keys} for u in snap.get("upstreams", [])
            if (u.get("cache") or {}).get("requests")}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


@scenario("affinity", render=lambda r: render(r))
async def run(bench: Any) -> dict:
    """The three settings of the module docstring, then two replicas and the no-shared-prefix check."""
    out: dict[str, Any] = {}
    base = [("throughput+affinity", "throughput", True), ("throughput", "throughput", False),
            ("sticky_oracle", "sticky", False)]
    others = [("round_robin", "round_robin", False), ("least_busy", "least_busy", False)]
    many = Users(int(os.environ.get("GATEWAY_BENCH_AFFINITY_TENANTS", MANY_TENANTS)),
                 float(os.environ.get("GATEWAY_BENCH_AFFINITY_THINK_S", THINK_S)))
    plans = {"mixed": ("mixed", "tenants", base + others, Users()),
             "similar": ("similar", "tenants", base, Users()), "documents": ("similar", "documents", base, Users()),
             "documents_a10g": ("a10g", "documents", base, Users()),
             "many_tenants": ("a10g_hosted", "tenants", base + others, many),
             "saturated": ("a10g_hosted", "tenants", base,
                           replace(many, workers=int(os.environ.get("GATEWAY_BENCH_AFFINITY_SATURATED_WORKERS",
                                                                    SATURATED_WORKERS))))}
    settings, only = _only("GATEWAY_BENCH_AFFINITY_SETTINGS"), _only("GATEWAY_BENCH_AFFINITY_VARIANTS")
    for key, (shape, workload, variants, users) in plans.items():
        if settings and key not in settings:
            continue
        rows: dict[str, Any] = {}
        for name, strategy, aff in variants:
            if only and name not in only:
                continue
            print(f"  affinity: {key} {name} ...", flush=True)
            rows[name] = await _variant(bench, f"aff-{key}-{name.replace('+', '-')}", strategy, aff, workload=workload,
                                        shape=shape, users=users)
        if users != Users():
            rows.update(tenants=users.tenants, think_s=users.think, **({"workers": users.workers} if users.workers else {}))
        out[key] = rows
    if not settings or "extras" in settings:
        await _extras(bench, out.setdefault("documents", {}))
    for rows in out.values():
        rows.update(_verdict(rows))
    out["error_count"] = sum(r.get("error_count", 0) for rows in list(out.values()) for r in rows.values()
                             if isinstance(r, dict))
    return out


def _only(var: str) -> set[str]:
    """The names a comma-list environment variable selects (empty: all)."""
    return {v.strip() for v in os.environ.get(var, "").split(",") if v.strip()}


async def _extras(bench: Any, docs: dict) -> None:
    """The documents workload through two replicas (with Redis), and the no-shared-prefix cost of hashing."""
    if bench.o.redis_url:
        print("  affinity: documents, two replicas ...", flush=True)
        docs["two_replicas"] = await _variant(bench, "aff-2rep", "throughput", True, workers=2, shape="similar",
                                              workload="documents")
    for name, aff in (("no_shared_prefix+affinity", True), ("no_shared_prefix", False)):
        print(f"  affinity: similar {name} ...", flush=True)
        docs[name] = await _variant(bench, f"aff-{name.replace('+', '-')}", "throughput", aff, workload="fresh",
                                    shape="similar")


def _verdict(out: dict) -> dict:
    a, b = out.get("throughput+affinity") or {}, out.get("throughput") or {}
    v: dict[str, Any] = {}
    if a.get("ttft_p50_ms") and b.get("ttft_p50_ms"):
        v["ttft_p50_ratio"] = round(b["ttft_p50_ms"] / a["ttft_p50_ms"], 2)  # target >= 2
    if b.get("tok_s"):
        v["tok_s_ratio"] = round(a["tok_s"] / b["tok_s"], 3)  # target >= 1.3
    oracle = (out.get("sticky_oracle") or {}).get("hit_rate")
    if oracle:
        v["hit_rate_vs_oracle"] = round((a.get("hit_rate") or 0) / oracle, 3)  # target >= 0.9
        if "gpu_hit_rate" in a:  # the oracle's own terms: its requests all go to the GPU engines
            v["gpu_hit_rate_vs_oracle"] = round(a["gpu_hit_rate"] / oracle, 3)
    n1, n0 = out.get("no_shared_prefix+affinity"), out.get("no_shared_prefix")
    if n1 and n0 and n0.get("tok_s"):
        v["no_shared_prefix_ratio"] = round(n1["tok_s"] / n0["tok_s"], 3)  # target >= 0.98
    if "two_replicas" in out and a.get("hit_rate") is not None and out["two_replicas"].get("hit_rate") is not None:
        v["two_replicas_hit_rate_points"] = round(100 * (out["two_replicas"]["hit_rate"] - a["hit_rate"]), 1)  # >= -5
    return v


def render(r: dict) -> list[str]:
    lines = ["", "### KV-cache affinity (multi-turn conversations on prefix-caching engines)", ""]
    for shape, title in (("mixed", "tenant prompts, calibrated mixed fleet (H100 + A10G + hosted)"),
                         ("similar", "tenant prompts, four similar H100s"),
                         ("documents", "a document per conversation, four similar H100s"),
                         ("documents_a10g", "a document per conversation, four similar A10Gs"),
                         ("many_tenants", "many tenant prompts, four similar A10Gs + hosted"),
                         ("saturated", "many tenant prompts, four similar A10Gs + hosted, saturated")):
        rows = r.get(shape, {})
        if not rows:
            continue
        if "tenants" in rows:
            title += (f" ({rows['tenants']} tenants, think time {rows['think_s']} s"
                      + (f", {rows['workers']} users)" if "workers" in rows else ")"))
        lines += [f"{title}:", "", "| variant | tok/s | TTFT p50 | TTFT p99 | hit rate | requests | peak util | peak queue | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, x in rows.items():
            if isinstance(x, dict) and "tok_s" in x:
                lines.append(f"| {name} | {x['tok_s']} | {x['ttft_p50_ms']} ms | {x['ttft_p99_ms']} ms | {x['hit_rate']} | "
                             f"{x['requests']} | {x['peak_upstream_utilisation']} | {x['peak_queue']} | {x['error_count']} |")
        lines += ["", f"TTFT p50 without/with affinity "
                  f"{rows.get('ttft_p50_ratio')} (target >= 2); tok/s with/without {rows.get('tok_s_ratio')} (>= 1.3); "
                  f"hit rate / oracle {rows.get('hit_rate_vs_oracle')} (>= 0.9)"
                  + (f"; on the GPU engines alone {rows['gpu_hit_rate_vs_oracle']}" if "gpu_hit_rate_vs_oracle" in rows else ""),
                  ""]
    sim = r.get("documents", {})
    if "no_shared_prefix_ratio" in sim or "two_replicas_hit_rate_points" in sim:
        lines.append(f"Four similar H100s: no shared prefix with/without affinity {sim.get('no_shared_prefix_ratio')} (>= 0.98); "
                     f"two replicas' hit rate minus one's {sim.get('two_replicas_hit_rate_points')} points (>= -5)")
    return lines
