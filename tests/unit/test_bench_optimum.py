"""The bench's reference figures for mixed and open-loop workloads (tools/mixed.py, tools/openloop.py)."""

from __future__ import annotations

import itertools

import pytest

from gateway.sim import SimConfig
from gateway.sim.reference import REFERENCE_SIMS
from gateway.tools.bench import gpu_tok_s, optimum
from gateway.tools.mixed import Klass, gpu_mix_tok_s, hosted_mix_tok_s, mixed_optimum
from gateway.tools.openloop import best_split, capacity, latency, max_rate


def test_one_class_mix_is_the_single_workload_optimum():
    for c, m, p in ((32, 128, 200), (16, 64, 2000)):
        single = optimum(REFERENCE_SIMS, c, m, p)
        mixed = mixed_optimum(REFERENCE_SIMS, [Klass(p, m, c)])
        assert mixed["tok_s"] == pytest.approx(single["tok_s"], abs=0.1)
        assert {k: v[0] for k, v in mixed["allocation"].items()} == single["allocation"]
    fast = REFERENCE_SIMS["fast-gpu"]
    assert gpu_mix_tok_s(fast, (10,), [Klass(200, 128, 10)]) == pytest.approx(gpu_tok_s(fast, 10, 128, 200))


def test_gpu_cost_of_a_mix_counts_each_class_prefill_per_output_token():
    """Two workers of 16 tokens prefill 8x as often per step as two of 128: more per-step cost, fewer tok/s."""
    fast = REFERENCE_SIMS["fast-gpu"]
    ks = [Klass(2000, 16, 2), Klass(2000, 128, 2)]
    assert gpu_mix_tok_s(fast, (2, 0), ks) < gpu_mix_tok_s(fast, (0, 2), ks)


def test_hosted_mix_within_its_limits_only():
    h = SimConfig(mode="hosted", ttft=0.4, tok_s=60.0, rpm=120, max_concurrency=32)
    ks = [Klass(200, 16, 8), Klass(200, 1024, 8)]
    assert hosted_mix_tok_s(h, (0, 8), ks) == pytest.approx(8 * 1024 / (0.4 + 1023 / 60))
    assert hosted_mix_tok_s(h, (2, 0), ks) is None  # 2 workers of 16 tokens: ~3 requests/s > 120 rpm


def test_mixed_optimum_is_the_best_complete_placement():
    """Brute force over every placement of a small mix (every worker placed, hosted within its limits)."""
    sims = REFERENCE_SIMS
    ks = [Klass(200, 16, 3), Klass(200, 512, 3)]
    res = mixed_optimum(sims, ks)
    names = list(sims)
    best = 0.0
    per_class = [list(itertools.product(range(k.workers + 1), repeat=len(names))) for k in ks]
    for split in itertools.product(*per_class):
        if any(sum(s) != k.workers for s, k in zip(split, ks)):
            continue
        total = 0.0
        for i, n in enumerate(names):
            v = tuple(s[i] for s in split)
            c = sims[n]
            x = gpu_mix_tok_s(c, v, ks) if c.mode == "gpu" else hosted_mix_tok_s(c, v, ks)
            if x is None or (c.mode == "gpu" and n != names[-1] and sum(v) > c.slots):
                total = -1.0
                break
            total += x
        best = max(best, total)
    assert res["tok_s"] == pytest.approx(best, abs=0.1)
    assert all(sum(v[j] for v in res["allocation"].values()) == k.workers for j, k in enumerate(ks))


def test_open_loop_latency_grows_to_the_capacity():
    fast = REFERENCE_SIMS["fast-gpu"]
    cap = max_rate(fast, 128, 200)
    ls = [latency(fast, f * cap, 128, 200) for f in (0.0, 0.5, 0.9, 0.99)]
    assert ls == sorted(ls) and ls[0] == pytest.approx(129 * fast.base_step)
    assert latency(fast, 1.01 * cap, 128, 200) == float("inf")
    assert max_rate(REFERENCE_SIMS["hosted"], 128, 200) == pytest.approx(2.0)  # 120 rpm binds


def test_best_split_uses_every_upstream_only_where_it_is_cheapest():
    sims = REFERENCE_SIMS
    cap = capacity(sims, 128, 200)
    low, high = best_split(sims, 0.2 * cap, 128, 200), best_split(sims, 0.8 * cap, 128, 200)
    assert sum(low.values()) == pytest.approx(0.2 * cap) and sum(high.values()) == pytest.approx(0.8 * cap)
    assert low["slow-gpu"] < high["slow-gpu"] and high["fast-gpu"] > high["slow-gpu"]
    assert all(latency(sims[k], x, 128, 200) < float("inf") for k, x in high.items())
    with pytest.raises(ValueError):
        best_split(sims, cap, 128, 200)
