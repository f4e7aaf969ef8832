"""The optimum of a closed-loop workload made of several request classes, on the simulators' own formulas.

A class is (prompt tokens P, output tokens M, closed-loop workers). tools/bench.py's `optimum` handles one class;
a mix of lengths cannot be reduced to one class (a 16-token request costs the GPU a prefill per 16 tokens, a
1024-token one spends one of the hosted API's scarce requests on 64x the output), so this places every worker of
every class on an upstream, exactly:

* GPU (continuous batching): a class-j worker runs M_j steps then is re-admitted one step later, so it keeps
  M_j/(M_j+1) sequences running and admits P_j/(M_j+1) prompt tokens per step. With R running and A prompt tokens
  admitted per step, step = base + per_seq*R + prefill_per_token*A and tok/s = R/step (past `slots`, R is capped
  and A scaled with it: the rest wait FIFO). For one class this is bench.gpu_tok_s.
* Hosted: a request takes ttft + (M_j-1)/tok_s; the allocation must stay within max_concurrency, rpm and tpm
  (the pinned oracle would otherwise be refused), as bench.hosted_max_workers does for one class.

Every worker is placed (the routers compared are work-conserving); the search is exhaustive over integer
allocations: hosted upstreams first (few feasible vectors), then the GPUs, the last GPU taking the remainder.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gateway.sim import SimConfig


@dataclass(frozen=True)
class Klass:
    prompt: int
    output: int
    workers: int


Vec = tuple[int, ...]


def gpu_mix_tok_s(c: SimConfig, v: Vec, ks: Sequence[Klass], slow: float = 1.0) -> float:
    """Steady-state output tok/s of the GPU sim with v[j] closed-loop workers of class ks[j]."""
    run = sum(n * k.output / (k.output + 1) for n, k in zip(v, ks))
    if run <= 0:
        return 0.0
    admitted = sum(n * k.prompt / (k.output + 1) for n, k in zip(v, ks))
    if run > c.slots:
        admitted *= c.slots / run
        run = float(c.slots)
    return run / (slow * (c.base_step + c.per_seq * run + c.prefill_per_token * admitted))


def hosted_mix_tok_s(c: SimConfig, v: Vec, ks: Sequence[Klass], slow: float = 1.0) -> float | None:
    """Output tok/s of the hosted sim with these workers, None if they exceed a limit (concurrency, rpm, tpm)."""
    cycles = [slow * (c.ttft + (k.output - 1) / c.tok_s) for k in ks]
    if c.max_concurrency and sum(v) > c.max_concurrency:
        return None
    rps = sum(n / t for n, t in zip(v, cycles))
    if c.rpm and rps > c.rpm / c.window + 1e-9:
        return None
    if c.tpm and sum(n * (k.prompt + k.output) / t for n, k, t in zip(v, ks, cycles)) > c.tpm / c.window + 1e-9:
        return None
    return sum(n * k.output / t for n, k, t in zip(v, ks, cycles))


def _below(r: Vec, cap: int) -> Iterator[Vec]:
    """Every vector v <= r (elementwise) with sum(v) <= cap."""
    for v in itertools.product(*(range(x + 1) for x in r)):
        if sum(v) <= cap:
            yield v


def mixed_optimum(sims: dict[str, SimConfig], ks: Sequence[Klass], slow: dict[str, float] | None = None) -> dict:
    """Best placement of every class's workers: {"allocation": {upstream: [workers per class]}, "tok_s", "per_upstream"}.

    Hosted upstreams take a feasible vector each, GPUs (but the last) at most `slots` workers (more would only
    wait there), the last GPU the rest. Raises ValueError when the fleet has no GPU to take the remainder.
    """
    slow = slow or {}
    hosted = [n for n, c in sims.items() if c.mode != "gpu"]
    gpus = [n for n, c in sims.items() if c.mode == "gpu"]
    if not gpus:
        raise ValueError("mixed_optimum needs a GPU upstream to take the workers the limits leave")
    order = hosted + gpus
    total: Vec = tuple(k.workers for k in ks)
    memo: dict[tuple[int, Vec], tuple[float, list[Vec]]] = {}

    def value(name: str, v: Vec) -> float | None:
        c = sims[name]
        if c.mode == "gpu":
            return gpu_mix_tok_s(c, v, ks, slow.get(name, 1.0))
        return hosted_mix_tok_s(c, v, ks, slow.get(name, 1.0))

    def best(i: int, r: Vec) -> tuple[float, list[Vec]]:
        if (i, r) in memo:
            return memo[(i, r)]
        name = order[i]
        if i == len(order) - 1:
            out = (value(name, r) or 0.0, [r])
        else:
            c = sims[name]
            cap = c.slots if c.mode == "gpu" else (c.max_concurrency or sum(r))
            out = (-math.inf, [])
            for v in _below(r, cap):
                here = value(name, v)
                if here is None:
                    continue
                rest, tail = best(i + 1, tuple(a - b for a, b in zip(r, v)))
                if here + rest > out[0] + 1e-9:
                    out = (here + rest, [v, *tail])
        memo[(i, r)] = out
        return out

    tok_s, vecs = best(0, total)
    alloc = {n: list(v) for n, v in zip(order, vecs)}
    per = {n: round(value(n, tuple(alloc[n])) or 0.0, 1) for n in sims}
    return {"allocation": {n: alloc[n] for n in sims}, "tok_s": round(tok_s, 1), "per_upstream": per}
