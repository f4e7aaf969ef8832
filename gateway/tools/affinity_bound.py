"""`python -m gateway.tools.affinity_bound`: what placement can win on the affinity bench's workload, from the
simulator's own cost model, without a gateway, sockets or wall-clock time.

The bench's tok/s ratio (with / without affinity) is bounded by the workload: closed-loop users who think
between turns, answers of 100-300 tokens decoded at the A10G's ~31 ms per step, and prompts of which the
prefix-blind router already finds part cached by chance (the tenants' shared system prompts). This drives the
simulator's KvEngine (gateway/sim/kv_engine.py: the same scheduler, step prices and prefix cache the bench's
simulators run) in virtual time with the scenario's workload (gateway/tools/scenarios/affinity.py: tenants'
prompts of 1-4k tokens, 5-10 turns, 20-60-token questions, 100-300-token answers, exponential think time), and
places every turn by one of:

- `tenant`: each tenant's conversations on one engine (tenant index mod engines): the partition that keeps each
  engine's share of the system prompts hot, the best any placement does with these caches;
- `sticky`: the bench's sticky oracle (a conversation stays on the engine with the fewest open conversations
  when it started);
- `home`: a new conversation on the first engine, in rendezvous order of its system prompt's first block
  (affinity.home_order), whose requests in flight stay within the bounded-load limit (affinity.sticky_bound's
  rule: `--load-factor`, default affinity.HOME_LOAD_FACTOR, times its share of the pool's); later turns stay (the
  tenant partition without knowing the tenants);
- `holder`: the same order, but only among the engines holding the longest cached prefix (the router's home
  rule, Affinity.home_withheld), else the least busy: homes derived from where prefixes already are;
- `least`: the engine with the fewest requests in flight (prefix-blind; what the router without affinity does
  at best) and `random`;
- `least` on engines with prefix caching off: the no-caching floor.

Optionally the hosted API (`--hosted`: 100k TPM as a token bucket, 0.4 s to the first token, 60 tok/s, no
prompt cache) takes any request its budget allows, as the throughput router sends it whatever fits. The ratio
of `tenant` (or `sticky`) to `least` is the most the tok/s ratio can reach on the simulator's cost model; the
bench measures less on a loaded machine (client and simulators share its CPUs).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
from dataclasses import dataclass, field, replace

from gateway.routing.affinity import HOME_LOAD_FACTOR, home_order
from gateway.routing.prefix import BLOCK_SIZE, block_hashes
from gateway.sim.kv_engine import KvEngine, KvSeq, StepPlan
from gateway.sim.server import SimConfig

#: Placements, in the order they are reported.
PLACEMENTS = ("tenant", "home", "holder", "sticky", "least", "random")
#: The calibrated hosted API (sim/reference.py): its TPM limit, time to first token and decode rate.
HOSTED_TPM, HOSTED_TTFT, HOSTED_TOK_S = 100_000, 0.4, 60.0


@dataclass(frozen=True)
class Workload:
    """The affinity bench's `many_tenants` users by default; `documents`: a 2-4k-token document per conversation."""

    users: int = 32
    think: float = 2.0
    tenants: int = 24
    documents: bool = False
    engines: int = 4
    hosted: bool = False
    seed: int = 7
    load_factor: float = HOME_LOAD_FACTOR


@dataclass
class Result:
    tok: int = 0
    requests: int = 0
    prompt: int = 0
    cached: int = 0
    ttfts: list[float] = field(default_factory=list)

    def row(self, seconds: float) -> dict[str, float | int | None]:
        t = sorted(self.ttfts)
        return {"tok_s": round(self.tok / seconds, 1), "requests": self.requests,
                "hit_rate": round(self.cached / self.prompt, 3) if self.prompt else None,
                "ttft_p50_ms": round(1000 * t[len(t) // 2], 1) if t else None}


@dataclass
class _Turn:
    """A user's conversation: its token ids so far, its engine (sticky / tenant), turns left, the request open."""

    ids: list[int]
    engine: int
    turns: int
    seq: KvSeq | None = None
    start: float = 0.0
    first: float | None = None


class _Model:
    def __init__(self, w: Workload, placement: str, caching: bool) -> None:
        cfg = SimConfig(name="a10g", mode="gpu", preset="a10g-llama8b", slots=16, prefix_caching=caching)
        self.w, self.placement = w, placement
        self.engines = [KvEngine(replace(cfg, name=f"gpu-{i}")) for i in range(w.engines)]
        self.rnd = random.Random(w.seed)
        self.fresh = itertools.count(10**6)  # token ids no prompt shares
        self.prompts = [list(range(i * 10**5, i * 10**5 + 1000 + 3000 * i // max(1, w.tenants - 1)))
                        for i in range(w.tenants)]
        self.open = [0] * w.engines
        self.users: dict[int, _Turn] = {}
        self.events: list[tuple[float, int, str, int]] = []
        self.order = itertools.count()
        self.plans: list[StepPlan | None] = [None] * w.engines
        self.bucket, self.bucket_at = HOSTED_TPM / 6, 0.0  # 10 s of budget, as a burst
        self.res = Result()
        self.measure_from = 0.0

    def _new(self, uid: int) -> None:
        w, rnd = self.w, self.rnd
        if w.documents:
            tenant, ids = 0, self.prompts[0][:800] + [next(self.fresh) for _ in range(rnd.randint(2000, 4000))]
        else:
            tenant = rnd.randrange(w.tenants)
            ids = list(self.prompts[tenant])
        if self.placement in ("home", "holder"):  # placed at its first request (_engine_for)
            self.users[uid] = _Turn(ids, -1, rnd.randint(5, 10))
            return
        e = tenant % w.engines if self.placement == "tenant" and not w.documents else \
            min(range(w.engines), key=lambda k: (self.open[k], k))
        self.open[e] += 1
        self.users[uid] = _Turn(ids, e, rnd.randint(5, 10))

    def _at(self, t: float, kind: str, x: int) -> None:
        heapq.heappush(self.events, (t, next(self.order), kind, x))

    def _think(self) -> float:
        return self.rnd.expovariate(1 / self.w.think) if self.w.think else 0.0

    def _inflight(self, k: int) -> int:
        return self.engines[k].running + self.engines[k].waiting

    def _home(self, turn: _Turn) -> int:
        """`home` / `holder`: the first engine in the prompt's rendezvous order within the bounded-load limit."""
        w = self.w
        hashes = block_hashes(turn.ids[:BLOCK_SIZE], BLOCK_SIZE)
        names = [f"gpu-{k}" for k in range(w.engines)]
        order = [names.index(n) for n in home_order(hashes[0], names)]
        total = sum(self._inflight(k) for k in range(w.engines))
        bound = math.ceil(w.load_factor * (total + 1) / w.engines)
        ok = [k for k in order if self._inflight(k) + 1 <= bound]
        if self.placement == "holder":  # the engines holding the longest cached prefix
            hashes = block_hashes(turn.ids, BLOCK_SIZE)
            held = {k: self.engines[k].kv.cached_prefix(hashes, len(turn.ids)) for k in ok}
            ok = [k for k in ok if held[k] and held[k] == max(held.values())]
        return ok[0] if ok else min(range(w.engines), key=lambda k: (self._inflight(k), self.rnd.random()))

    def _engine_for(self, turn: _Turn) -> int:
        if turn.engine < 0:
            turn.engine = self._home(turn)
            self.open[turn.engine] += 1
        if self.placement in ("tenant", "sticky", "home", "holder"):
            return turn.engine
        if self.placement == "least":
            return min(range(self.w.engines), key=lambda k: (self.engines[k].running + self.engines[k].waiting,
                                                             self.rnd.random()))
        return self.rnd.randrange(self.w.engines)

    def _submit(self, now: float, uid: int) -> None:
        turn = self.users[uid]
        turn.ids = turn.ids + [next(self.fresh) for _ in range(self.rnd.randint(20, 60) + 8)]
        n = self.rnd.randint(100, 300)
        if self.w.hosted and self._hosted_takes(now, len(turn.ids) + n):
            self._count(now, len(turn.ids), 0, n, HOSTED_TTFT)
            self._at(now + HOSTED_TTFT + n / HOSTED_TOK_S, "hosted", uid * 1000 + n)
            return
        e = self._engine_for(turn)
        seq = self.engines[e].open(len(turn.ids), n, 0, block_hashes(turn.ids, BLOCK_SIZE))
        assert isinstance(seq, KvSeq)
        turn.seq = seq
        turn.start, turn.first = now, None
        self._kick(now, e)

    def _hosted_takes(self, now: float, charge: int) -> bool:
        self.bucket = min(HOSTED_TPM / 6, self.bucket + (now - self.bucket_at) * HOSTED_TPM / 60)
        self.bucket_at = now
        if self.bucket < charge:
            return False
        self.bucket -= charge
        return True

    def _kick(self, now: float, e: int) -> None:
        if self.plans[e] is not None:
            return
        plan = self.engines[e].schedule()
        if plan.prefill or plan.decode:
            self.plans[e] = plan
            self._at(now + plan.seconds, "step", e)

    def _count(self, now: float, prompt: int, cached: int, n: int, ttft: float) -> None:
        if now >= self.measure_from:
            r = self.res
            r.tok, r.requests, r.prompt, r.cached = r.tok + n, r.requests + 1, r.prompt + prompt, r.cached + cached
            r.ttfts.append(ttft)

    def _answered(self, now: float, uid: int, n: int) -> None:
        turn = self.users[uid]
        turn.seq = None
        turn.ids = turn.ids + [next(self.fresh) for _ in range(n + 4)]
        turn.turns -= 1
        if turn.turns <= 0:
            self.open[turn.engine] -= 1
            self._new(uid)
        self._at(now + self._think(), "arrive", uid)

    def _step(self, now: float, e: int) -> None:
        plan, self.plans[e] = self.plans[e], None
        assert plan is not None
        self.engines[e].commit(plan)
        for uid, turn in list(self.users.items()):
            seq = turn.seq
            if seq is None or seq.engine is not self.engines[e]:
                continue
            if turn.first is None and seq.emitted > 0:
                turn.first = now
            if seq.emitted >= seq.n:
                self._count(now, seq.prompt_tokens, seq.cached_tokens or 0, seq.n, (turn.first or now) - turn.start)
                self._answered(now, uid, seq.n)
        self._kick(now, e)

    def run(self, seconds: float, warmup: float) -> dict[str, float | int | None]:
        self.measure_from = warmup
        for uid in range(self.w.users):
            self._new(uid)
            self._at(self._think(), "arrive", uid)
        while self.events:
            now, _, kind, x = heapq.heappop(self.events)
            if now > warmup + seconds:
                break
            if kind == "arrive":
                self._submit(now, x)
            elif kind == "hosted":
                self._answered(now, x // 1000, x % 1000)
            else:
                self._step(now, x)
        return self.res.row(seconds)


def bound(w: Workload, seconds: float = 50.0, warmup: float = 2.0) -> dict[str, dict[str, float | int | None]]:
    """tok/s, hit rate and TTFT p50 of every placement (PLACEMENTS), and `no_cache` (`least` without caching)."""
    out = {p: _Model(w, p, True).run(seconds, warmup) for p in PLACEMENTS}
    out["no_cache"] = _Model(w, "least", False).run(seconds, warmup)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gateway.tools.affinity_bound", description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--think", type=float, default=2.0, help="mean think time before each turn, seconds")
    ap.add_argument("--tenants", type=int, default=24)
    ap.add_argument("--documents", action="store_true", help="a 2-4k-token document per conversation instead")
    ap.add_argument("--hosted", action="store_true", help="add the hosted API (takes what its TPM budget allows)")
    ap.add_argument("--seconds", type=float, default=50.0, help="measured (virtual) seconds")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--load-factor", type=float, default=HOME_LOAD_FACTOR, help="`home`/`holder`: the bounded-load factor")
    a = ap.parse_args(argv)
    print("| seed | " + " | ".join(f"{p} tok/s (hit)" for p in (*PLACEMENTS, "no_cache")) + " | tenant/least | sticky/least | tenant/no_cache |")
    print("|---" * (len(PLACEMENTS) + 5) + "|")
    for seed in range(7, 7 + a.seeds):
        w = Workload(a.users, a.think, a.tenants, a.documents, hosted=a.hosted, seed=seed, load_factor=a.load_factor)
        r = bound(w, a.seconds, a.warmup)
        tok = {k: float(v["tok_s"] or 0) for k, v in r.items()}
        print(f"| {seed} | " + " | ".join(f"{tok[k]:.0f} ({r[k]['hit_rate']})" for k in r)
              + f" | {tok['tenant'] / tok['least']:.2f} | {tok['sticky'] / tok['least']:.2f} | {tok['tenant'] / tok['no_cache']:.2f} |")


if __name__ == "__main__":
    main()
