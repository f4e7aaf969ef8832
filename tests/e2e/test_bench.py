"""`gateway bench`: the analytic optimum (pure) and a --quick run end to end (real subprocesses, bounded)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.sim.reference import REFERENCE_SIMS
from gateway.tools.bench import gpu_tok_s, hosted_max_workers, optimum, upstream_tok_s

M, P = 128, 200


def test_hosted_workers_respect_rate_limits() -> None:
    h = REFERENCE_SIMS["hosted"]
    n = hosted_max_workers(h, M, P)
    cycle = h.ttft + (M - 1) / h.tok_s
    assert n / cycle * 60 <= h.rpm < (n + 1) / cycle * 60  # the most workers that stay under 120 rpm
    assert upstream_tok_s(h, n + 3, M, P) == upstream_tok_s(h, n, M, P)


def test_gpu_curve_is_concave_and_capped_by_slots() -> None:
    f = REFERENCE_SIMS["fast-gpu"]
    xs = [gpu_tok_s(f, n, M, P) for n in range(0, 80)]
    gains = [b - a for a, b in zip(xs, xs[1:])]
    assert all(g >= -1e-9 for g in gains)
    assert all(g2 <= g1 + 1e-9 for g1, g2 in zip(gains, gains[1:]))
    assert xs[79] == xs[66]  # past the slots the extra requests only wait
    assert gpu_tok_s(f, 20, M, P, slow=4) == pytest.approx(xs[20] / 4)


@pytest.mark.parametrize("c", [1, 7, 20])
def test_optimum_matches_brute_force(c: int) -> None:
    res = optimum(REFERENCE_SIMS, c, M, P)
    names = list(REFERENCE_SIMS)
    best = max(
        sum(upstream_tok_s(REFERENCE_SIMS[k], n, M, P) for k, n in zip(names, alloc))
        for alloc in itertools.product(range(c + 1), repeat=len(names))
        if sum(alloc) <= c
    )
    assert res["tok_s"] == pytest.approx(best, abs=0.1)
    assert sum(res["allocation"].values()) <= c


def test_default_workload_needs_all_three_upstreams() -> None:
    res = optimum(REFERENCE_SIMS, 32, M, P)
    assert all(n > 0 for n in res["allocation"].values())
    assert res["allocation"]["hosted"] == hosted_max_workers(REFERENCE_SIMS["hosted"], M, P)
    slowed = optimum(REFERENCE_SIMS, 32, M, P, {"fast-gpu": 4})
    assert slowed["tok_s"] < res["tok_s"]
    assert slowed["allocation"]["slow-gpu"] > res["allocation"]["slow-gpu"]


def test_slo_feasible_best_caps_the_cheapest_gpu_at_its_floor() -> None:
    from gateway.tools.scenarios.classes import FLOOR_TOK_S, best_total, floor_slots, slo_feasible_best

    fast, slow = REFERENCE_SIMS["fast-gpu"], REFERENCE_SIMS["slow-gpu"]
    n = floor_slots(fast, 512)
    assert n == 42  # (1/40 - 0.008) / (0.0004 + 0.00001 * 200 / 512)
    step = lambda k: fast.base_step + k * (fast.per_seq + fast.prefill_per_token * 200 / 512)  # noqa: E731
    assert 1 / step(n) >= FLOOR_TOK_S > 1 / step(n + 1)
    assert floor_slots(slow, 512) == 3
    loss_fast = gpu_tok_s(fast, 64, 512, 200) - gpu_tok_s(fast, 42, 512, 200)
    loss_slow = gpu_tok_s(slow, 16, 512, 200) - gpu_tok_s(slow, 3, 512, 200)
    assert loss_fast < loss_slow
    assert slo_feasible_best(REFERENCE_SIMS) == pytest.approx(best_total(REFERENCE_SIMS) - loss_fast)


@pytest.mark.timeout(120)
def test_quick_bench_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.tools.bench", "--quick", "--concurrency", "16",
         "--scenarios", "throughput,adapt,overhead", "--out", str(out)],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| throughput |" in proc.stdout and "Added p50" in proc.stdout
    res = json.loads(out.read_text())
    meta, sc = res["meta"], res["scenarios"]
    assert meta["analytic_optimum"]["tok_s"] > 0 and meta["concurrency"] == 16
    assert set(sc) == {"oracle", "throughput", "adapt", "overhead"}
    for name in ("oracle", "throughput", "adapt"):
        r = sc[name]
        assert r["tok_s"] > 0 and r["requests"] > 0, name
        assert r["error_count"] == 0, (name, r["errors"])
        assert r["usage_mismatch"] == 0, name  # content chunks counted == usage.completion_tokens
        assert r["latency_p50_ms"] > 0 and r["ttft_p50_ms"] > 0
        assert set(r["upstreams"]) == {"fast-gpu", "slow-gpu", "hosted"}
        assert r["pct_of_oracle"] > 0 and r["per_second"]
    assert sc["oracle"]["pct_of_oracle"] == 100.0
    # The oracle is pinned to the analytic allocation.
    for n, k in meta["analytic_optimum"]["allocation"].items():
        assert sc["oracle"]["upstreams"][n]["mean_inflight"] == pytest.approx(k, abs=1.0)
    a = sc["adapt"]["adapt"]
    assert 0 < a["new_optimum"]["tok_s"] < meta["analytic_optimum"]["tok_s"]
    assert a["before_tok_s"] > 0 and a["after_tok_s_last"] > 0
    ov = sc["overhead"]
    assert ov["error_count"] == 0  # also counts a missing nginx (`make test` installs it)
    for path in ("direct", "nginx", "gateway"):
        assert ov["plain"][path]["rps"] > 0 and ov["stream"][path]["rps"] > 0, path
    assert ov["workers"]["1"]["rps"] > 0 and ov["workers"]["2"]["rps"] > 0
    assert ov["added_p50_ms"] is not None and ov["rps_ratio"] > 0
    assert ov["cpu_ratio_gateway_nginx"] > 1 and ov["stream_ratio_gateway_direct"] > 0
    assert "| non-streamed, via nginx |" in proc.stdout
    assert (out.parent / "logs").is_dir()


@pytest.mark.timeout(120)
def test_quick_batch_scenario(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.tools.bench", "--quick", "--concurrency", "16", "--scenarios", "batch",
         "--out", str(out)],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "### batch" in proc.stdout and "| with batch |" in proc.stdout
    r = json.loads(out.read_text())["scenarios"]["batch"]
    assert r["status"] == "completed" and r["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
    assert r["batch_seconds"] > 0 and r["batch_tok_s"] > 0 and r["batch_tok_s_during_interactive"] > 0
    for phase in ("interactive_alone", "interactive_with_batch"):
        assert r[phase]["tok_s"] > 0 and r[phase]["ttft_p50_ms"] > 0 and r[phase]["error_count"] == 0


def test_kv_optimum_matches_brute_force_over_the_kv_curves() -> None:
    """kv_pressure/spec_decode's optimum: the exact split of workers over virtual.tok_s_curve (KV engines) and
    the hosted formula, checked against every allocation for a small worker count."""
    from gateway.sim.reference import calibrated_sims
    from gateway.sim.virtual import tok_s_curve
    from gateway.tools.scenarios.kv_fleet import kv_optimum

    sims = calibrated_sims(kv_scale=0.1)
    c, m, p = 4, 32, 1500
    res = kv_optimum(sims, c, m, p)
    curves = {k: tok_s_curve(s, c, p, m) if s.kv_engine else [upstream_tok_s(s, n, m, p) for n in range(c + 1)]
              for k, s in sims.items()}
    names = list(sims)
    best = max(sum(curves[k][n] for k, n in zip(names, alloc))
               for alloc in itertools.product(range(c + 1), repeat=len(names)) if sum(alloc) <= c)
    assert res["tok_s"] == pytest.approx(best, abs=0.1) and sum(res["allocation"].values()) <= c


def test_new_scenarios_are_registered() -> None:
    from gateway.tools.scenarios import registry

    assert {"rpm_closed", "rpm_open", "kv_pressure", "spec_decode", "long_prompts", "wide_lengths",
            "cold_start", "class_cost", "poisson"} <= set(registry())


def test_cpu_ab_pairs_two_trees(tmp_path: Path) -> None:
    """The paired A/B tool (gateway/tools/cpu_ab.py), this tree against itself: both gateways answer the same
    alternating load, each round measures both, and the ratio of a tree to itself is near 1."""
    tree = str(Path(__file__).resolve().parents[2])
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.tools.cpu_ab", "--a", tree, "--b", tree, "--rounds", "2", "--seconds", "1.5",
         "--warmup", "0.5", "--concurrency", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["errors"] == 0 and [r["a_first"] for r in res["rounds"]] == [True, False]
    for r in res["rounds"]:
        na, nb = r["requests"]
        assert na > 50 and abs(na - nb) <= 8  # every worker alternates: the two sides get the same load
        assert r["a_ms"] > 0 and r["b_ms"] > 0
    assert 0.5 < res["median_ratio_b_a"] < 2.0
