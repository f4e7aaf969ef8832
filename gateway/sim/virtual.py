"""The KV engine in virtual time: exact figures for a configuration without sockets or sleeping.

The engine's `schedule()` prices a step and `commit()` applies it, so a loop that adds each step's
duration to a virtual clock reproduces what the real-time server would do, thousands of times faster.
Used by tests (calibration, preemption, chunked prefill, speculative decoding) and to compute a KV sim's
closed-loop throughput curve (the bench's per-upstream optimum, where the slot model's closed form no
longer applies), and the capacity hint (a, b, ttft) a fleet file should seed for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gateway.routing.prefix import block_hashes
from gateway.sim.kv_engine import KvEngine, KvSeq

if TYPE_CHECKING:
    from gateway.sim.server import SimConfig


@dataclass
class Driver:
    """Runs a KvEngine step by step on a virtual clock, recording when each sequence got each token."""

    engine: KvEngine
    now: float = 0.0
    seqs: list[KvSeq] = field(default_factory=list)
    times: dict[int, list[float]] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)

    def open(self, prompt: int, n: int, hashes: Sequence[int] = ()) -> KvSeq:
        seq = self.engine.open(prompt, n, 0, hashes)
        assert isinstance(seq, KvSeq)
        self.seqs.append(seq)
        self.times[seq.id] = []
        return seq

    def step(self) -> None:
        plan = self.engine.schedule()
        if not plan.prefill and not plan.decode:
            raise RuntimeError("engine stuck with work queued")
        live = [s for s in self.seqs if s.emitted < s.n]
        before = [s.emitted for s in live]
        self.now += plan.seconds
        self.steps.append(plan.seconds)
        self.engine.commit(plan)
        for seq, n in zip(live, before):
            self.times[seq.id] += [self.now] * (seq.emitted - n)
        self.seqs = [s for s in self.seqs if s.emitted < s.n]  # finished ones need no more bookkeeping

    @property
    def busy(self) -> bool:
        return bool(self.engine.running or self.engine.waiting)

    def run(self, until: KvSeq | None = None, max_steps: int = 1_000_000) -> None:
        """Step until idle (or until `until` has all its tokens); at most `max_steps` steps."""
        for _ in range(max_steps):
            if not self.busy or (until is not None and until.emitted >= until.n):
                return
            self.step()


@dataclass(frozen=True)
class LoopResult:
    tok_s: float  # output tokens per second, aggregate
    ttft: float  # mean seconds from submission to first token
    tpot: float  # mean seconds per output token after the first, per sequence (what the gateway samples)
    preemptions_per_min: float
    hit_rate: float  # prefix-cache hit tokens / prompt tokens looked up


def closed_loop(cfg: SimConfig, workers: int, prompt_tokens: int, max_tokens: int, *, shared_prefix: int = 0,
                requests: int | None = None, warmup: int | None = None) -> LoopResult:
    """`workers` clients each sending a request as soon as their previous one finished, in virtual time.

    Prompts are `prompt_tokens` long; the first `shared_prefix` tokens are common to all, the rest unique.
    Measures the requests after the first `warmup` (default: one per worker) of `requests` (default 4 per
    worker, at least 16) completed.
    """
    if workers < 1:
        return LoopResult(0.0, 0.0, 0.0, 0.0, 0.0)
    engine = KvEngine(replace(cfg))
    d = Driver(engine)
    total = requests or max(16, 4 * workers)
    skip = workers if warmup is None else warmup
    issued = done = 0
    inflight: dict[int, tuple[KvSeq, float]] = {}
    ttfts: list[float] = []
    tpots: list[float] = []
    t0, base = 0.0, (0, 0, 0, 0)  # (preemptions, output tokens, prefix queries, prefix hits) at t0

    def submit() -> None:
        nonlocal issued
        head = list(range(shared_prefix))
        tail = [1_000_000 + issued * prompt_tokens + i for i in range(prompt_tokens - shared_prefix)]
        seq = d.open(prompt_tokens, max_tokens, block_hashes(head + tail, cfg.block_size))
        inflight[seq.id] = (seq, d.now)
        issued += 1

    def counters() -> tuple[int, int, int, int]:
        return engine.preemptions, engine.tokens_generated, engine.prefix_queries, engine.prefix_hits

    for _ in range(workers):
        submit()
    while done < total:
        d.step()
        for sid, (seq, start) in list(inflight.items()):
            if seq.emitted < seq.n:
                continue
            del inflight[sid]
            done += 1
            if done > skip:
                times = d.times[sid]
                ttfts.append(times[0] - start)
                if len(times) > 1:
                    tpots.append((times[-1] - times[0]) / (len(times) - 1))
            elif done == skip:
                t0, base = d.now, counters()
            submit()
    span = max(d.now - t0, 1e-9)
    pre, out, queries, hits = (now - then for now, then in zip(counters(), base))
    return LoopResult(out / span, sum(ttfts) / max(1, len(ttfts)), sum(tpots) / max(1, len(tpots)), pre * 60.0 / span,
                      hits / max(1, queries))


def capacity_hint(cfg: SimConfig, prompt_tokens: int = 256, max_tokens: int = 128) -> dict[str, float]:
    """Seed {a, b, ttft, prefill, prompt_tokens} for t(n) = a + b*n seconds per output token of one sequence,
    fitted through the closed-loop figures at 1 and at `slots`/2 concurrent sequences (so t(n) includes the
    stalls of `prompt_tokens`-token prefills); `prefill`: TTFT seconds per prompt token, from an idle engine's
    TTFT at `prompt_tokens` and at 8x that (what prefix-cache hits save)."""
    n2 = max(2, cfg.slots // 2)
    one = closed_loop(cfg, 1, prompt_tokens, max_tokens, requests=3, warmup=1)
    half = closed_loop(cfg, n2, prompt_tokens, max_tokens, requests=2 * n2, warmup=n2)
    long = closed_loop(cfg, 1, 8 * prompt_tokens, max_tokens, requests=3, warmup=1)
    t1, t2 = 1.0 / one.tok_s, n2 / half.tok_s
    b = max(0.0, (t2 - t1) / (n2 - 1))
    prefill = max(0.0, (long.ttft - one.ttft) / (7 * prompt_tokens))
    return {"a": round(max(1e-4, t1 - b), 6), "b": round(b, 7), "ttft": round(one.ttft, 4), "prefill": round(prefill, 9),
            "prompt_tokens": prompt_tokens}


def tok_s_curve(cfg: SimConfig, max_workers: int, prompt_tokens: int, max_tokens: int,
                shared_prefix: int = 0) -> list[float]:
    """Closed-loop aggregate tok/s for 0..max_workers workers (capped at `slots` running; the rest queue):
    the per-upstream curve the bench's optimum needs for a KV sim, where the slot model's formula is wrong."""
    return [0.0] + [closed_loop(cfg, n, prompt_tokens, max_tokens, shared_prefix=shared_prefix).tok_s
                    for n in range(1, max_workers + 1)]
