"""The capacity curve fit recovers a GPU server's t(n) = a + b*n from noisy samples and forgets old behaviour."""

from __future__ import annotations

import random
import time

from gateway.config import CapacityHint
from gateway.routing.capacity import CapacityCurve, Sample


def samples(a: float, b: float, ns, now: float, age: float = 0.0, noise: float = 0.05, seed: int = 1):
    rnd = random.Random(seed)
    out = []
    for i, n in enumerate(ns):
        t = (a + b * n) * (1 + rnd.uniform(-noise, noise))
        out.append(Sample(now - age - i * 0.01, n, t, 0.1, 100, 128))
    return out


def test_fit_recovers_true_curve_despite_wrong_hint():
    now = time.time()
    c = CapacityCurve(CapacityHint(a=0.05, b=0.0, ttft=1.0), slots=64)
    c.fit(samples(0.008, 0.0004, [random.Random(i).randint(1, 60) for i in range(300)], now), now)
    assert abs(c.a - 0.008) / 0.008 < 0.15
    assert abs(c.b - 0.0004) / 0.0004 < 0.15
    assert 1800 < c.saturation() < 2000  # 64 / (0.008 + 0.0256)


def test_hint_holds_slope_when_samples_see_one_concurrency():
    now = time.time()
    c = CapacityCurve(CapacityHint(a=0.01, b=0.001), slots=32)
    c.fit(samples(0.011, 0.001, [1] * 50, now), now)
    # All samples at n=1 cannot identify b: the prior keeps it near the hint instead of collapsing to 0 or blowing up.
    assert 0.0005 < c.b < 0.002
    assert abs(c.tpot(1) - 0.012) < 0.002


def test_old_samples_are_forgotten():
    now = time.time()
    c = CapacityCurve(CapacityHint(a=0.008, b=0.0004), slots=64)
    old = samples(0.008, 0.0004, range(1, 60), now, age=600)
    new = samples(0.032, 0.0016, range(1, 60), now)  # the server became 4x slower
    c.fit(old + new, now)
    assert abs(c.a - 0.032) / 0.032 < 0.2 and abs(c.b - 0.0016) / 0.0016 < 0.2


def test_aggregate_is_concave_and_flat_past_slots():
    c = CapacityCurve(CapacityHint(a=0.02, b=0.0015), slots=16)
    gains = [c.aggregate(n + 1) - c.aggregate(n) for n in range(0, 20)]
    assert all(g1 >= g2 for g1, g2 in zip(gains, gains[1:]))
    assert c.aggregate(20) == c.aggregate(16)


def test_sample_row_round_trip():
    s = Sample(1.5, 3.0, 0.01, 0.2, 10, 20)
    assert Sample.from_row(s.to_row().encode()) == s


def test_slowdown_at_one_concurrency_scales_the_hinted_shape():
    """Samples at n=20 only, 4x slower than the hint: the slope follows the hint's shape, scaled, not 0."""
    now = time.time()
    c = CapacityCurve(CapacityHint(a=0.008, b=0.0004), slots=64)
    c.fit(samples(0.032, 0.0016, [20] * 120, now), now)
    assert abs(c.tpot(20) - 0.064) < 0.004
    assert 0.001 < c.b < 0.0025


def test_ttft_grows_with_prompt_size_when_sizes_vary():
    now = time.time()
    c = CapacityCurve(CapacityHint(a=0.01, b=0.001, ttft=0.2), slots=32)
    rnd = random.Random(3)
    rows = []
    for i in range(200):
        p = rnd.randint(100, 4000)
        rows.append(Sample(now - i * 0.01, 4, 0.014, 0.05 + 0.0001 * p, p, 100))
    c.fit(rows, now)
    assert 0.00008 < c.prefill < 0.00011
    assert abs(c.ttft_for(4000) - 0.45) < 0.06 and abs(c.ttft_for(100) - 0.06) < 0.06
    # One prompt size only: no slope is invented.
    c.fit([Sample(now, 4, 0.014, 0.3, 500, 100)] * 50, now)
    assert c.prefill == 0.0 and abs(c.ttft_for(5000) - c.ttft) < 1e-9


def test_router_sends_long_prompts_away_from_a_busy_gpu():
    """A long prompt's prefill would stall the whole batch of a busy GPU server; a hosted API does not care."""
    from gateway.routing.router import Estimate, throughput_gain
    from gateway.sim.reference import DEMO_PORTS, reference_fleet
    from gateway.state.fleet import Fleet

    fleet = Fleet(reference_fleet(DEMO_PORTS), "throughput")
    fast, hosted = fleet.upstreams["fast-gpu"], fleet.upstreams["hosted"]
    fast.curve.prefill = 0.00002  # 20 us per prompt token: 8k tokens stall the batch for 0.16 s
    for _ in range(8):
        fast.credit(0)
    short, long_ = Estimate(200, 128), Estimate(8000, 128)
    assert throughput_gain(fast, short) > throughput_gain(hosted, short)
    assert throughput_gain(fast, long_) < throughput_gain(hosted, long_)


def _rows(fn, ns, now: float, age: float = 0.0, seed: int = 3, ttft=lambda s: 0.1, prompt=lambda i: 100):
    rnd = random.Random(seed)
    return [Sample(now - age - i * 0.01, n, fn(n) * (1 + rnd.uniform(-0.05, 0.05)), ttft(prompt(i)), prompt(i), 128)
            for i, n in enumerate(ns)]


def test_slope_stays_identified_when_recent_samples_sit_at_the_operating_point():
    """300 fresh samples at n=30 would drown the earlier spread-out ones under plain recency; per-bucket
    memory keeps them, so the curve is still right away from the operating point."""
    now = time.time()
    true = lambda n: 0.008 + 0.0004 * n  # noqa: E731
    spread = _rows(true, [1 + i % 10 for i in range(60)], now, age=20.0)
    at_op = _rows(true, [30.0] * 300, now, seed=4)
    c = CapacityCurve(CapacityHint(a=0.05, b=0.0), slots=64)
    c.fit(at_op + spread, now)
    assert abs(c.tpot(2) - true(2)) / true(2) < 0.1
    assert abs(c.b - 0.0004) / 0.0004 < 0.2


def test_a_server_that_changes_is_followed_by_its_newest_samples():
    now = time.time()
    before = _rows(lambda n: 0.008 + 0.0004 * n, [1 + i % 60 for i in range(200)], now, age=15.0)
    after = _rows(lambda n: 4 * (0.008 + 0.0004 * n), [30.0] * 40, now, seed=5)
    c = CapacityCurve(CapacityHint(a=0.008, b=0.0004), slots=64)
    c.fit(after + before, now)
    assert abs(c.tpot(30) - 0.08) / 0.08 < 0.15


def test_outliers_do_not_tilt_the_line():
    now = time.time()
    ns = [1 + i % 40 for i in range(200)]
    rows = _rows(lambda n: 0.01 + 0.0005 * n, ns, now)
    for i in random.Random(7).sample(range(200), 20):  # 10% stalled streams, 8x slower
        rows[i].tpot *= 8
    c = CapacityCurve(CapacityHint(a=0.02, b=0.0), slots=64)
    c.fit(rows, now)
    assert abs(c.tpot(1) - 0.0105) / 0.0105 < 0.2 and abs(c.tpot(40) - 0.03) / 0.03 < 0.1


def test_speculative_decoding_shape_is_followed_not_forced_onto_a_line():
    """Speculation halves the per-token time at low batch and gains nothing at high batch."""
    now = time.time()

    def true(n: float) -> float:
        return (0.01 + 0.0005 * n) * (0.5 if n < 3 else 0.75 if n < 6 else 1.0)

    ns = [1 + i % 48 for i in range(480)]
    c = CapacityCurve(CapacityHint(a=0.01, b=0.0005), slots=64)
    c.fit(_rows(true, ns, now), now)
    for n in (1, 2, 40):
        assert abs(c.tpot(n) - true(n)) / true(n) < 0.15, (n, c.tpot(n), true(n))
    assert c.snapshot()["shape"]
    plain = CapacityCurve(CapacityHint(a=0.01, b=0.0005), slots=64)
    plain.fit(_rows(lambda n: 0.01 + 0.0005 * n, ns, now), now)
    assert plain.snapshot()["shape"] == []  # a line where the data is a line


def test_ttft_grows_with_multi_thousand_token_prompts():
    """Hosted and GPU TTFT alike: 0.3 s + 0.1 ms per prompt token over 2-6k-token prompts."""
    now = time.time()
    rows = _rows(lambda n: 0.02, [4.0] * 200, now, ttft=lambda p: 0.3 + 1e-4 * p, prompt=lambda i: 2000 + (i * 97) % 4000)
    c = CapacityCurve(CapacityHint(a=0.02, b=0.0, ttft=0.2), slots=32)
    c.fit(rows, now)
    assert abs(c.prefill - 1e-4) / 1e-4 < 0.1
    assert abs(c.ttft_for(6000) - 0.9) < 0.06 and abs(c.ttft_for(2000) - 0.5) < 0.06


# ---------------------------------------------------------------- the speculative H100 of the spec_decode fleet (issue 16)
def _spec_rows(ns, now: float, seed: int = 11):
    """Samples as the gateway takes them from the speculative H100 sim (virtual time: its exact closed-loop
    per-sequence decode time at each concurrency), with 5% noise, 200-token prompts."""
    from gateway.sim.reference import spec_decode_sims
    from gateway.sim.virtual import closed_loop

    cfg = spec_decode_sims()["fast-gpu"]
    true = {n: closed_loop(cfg, n, 200, 128) for n in sorted(set(ns))}
    rnd = random.Random(seed)
    rows = [Sample(now - i * 0.01, n, true[n].tpot * (1 + rnd.uniform(-0.05, 0.05)), true[n].ttft, 200, 128)
            for i, n in enumerate(ns)]
    return rows, {n: r.tpot for n, r in true.items()}


def test_fit_follows_the_speculative_servers_bent_curve():
    """Speculation makes per-token time grow slowly at low batch and faster past ~16 streams (the draft passes
    cost more as the batch becomes compute-bound): the fit stays within a few % of the sim at every batch size,
    from samples spread over the range and from samples at a high operating point only."""
    now = time.time()
    spread, true = _spec_rows([n for n in (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64) for _ in range(30)], now)
    assert (true[64] - true[16]) / 48 > 1.2 * (true[16] - true[1]) / 15  # the sim's curve does bend
    hint = CapacityHint(a=0.004, b=0.0001, ttft=0.05)  # 40% off at n=1, 75% at 64
    c = CapacityCurve(hint, slots=64)
    c.fit(spread, now)
    for n in true:
        assert abs(c.tpot(n) / true[n] - 1) < 0.05, (n, c.tpot(n), true[n])
    at_op, true_op = _spec_rows([44, 46, 48] * 100, now)
    c = CapacityCurve(hint, slots=64)
    c.fit(at_op, now)
    for n in true_op:
        assert abs(c.tpot(n) / true_op[n] - 1) < 0.03, (n, c.tpot(n), true_op[n])


def test_prefill_stall_counts_only_beyond_the_mean_prompt_the_curve_measured():
    """Measured t(n) includes the batch's stalls for prefills of the mean prompt: only the difference is extra."""
    now = time.time()
    c = CapacityCurve(CapacityHint(a=0.003, b=0.00005, prefill=2e-5), slots=64)
    assert c.excess_prefill(200) == c.prefill * 200  # nothing measured, a hint without prefills: the whole prefill
    seeded = CapacityCurve(CapacityHint(a=0.003, b=0.00005, prefill=2e-5, prompt_tokens=256), slots=64)
    assert seeded.excess_prefill(256) == 0.0  # the hint was measured with 256-token prompts
    c.fit(_rows(lambda n: 0.003 + 0.00005 * n, [8.0] * 100, now, prompt=lambda i: 150 + (i % 3) * 50), now)
    assert abs(c.excess_prefill(200)) < c.prefill * 10  # the weighted mean prompt: ~200
    assert c.excess_prefill(4000) > 0 > c.excess_prefill(50)


def test_marginal_gain_keeps_48_streams_on_the_speculative_h100():
    """spec_decode at C=48: the optimum puts all 48 on the H100 (its 48th stream adds ~100 tok/s, the hosted API's
    first ~50, the A10G's ~30). With the curve learned at the operating point the router must rank it first.
    (Charging every request's whole prefill on top of the measured curve ranked it below the hosted API from ~44.)"""
    from gateway.routing.router import Estimate, throughput_gain
    from gateway.sim.reference import DEMO_PORTS, calibrated_fleet, spec_decode_sims
    from gateway.state.fleet import Fleet

    now = time.time()
    fleet = Fleet(calibrated_fleet(DEMO_PORTS, spec_decode_sims()), "throughput")
    fast, slow, hosted = (fleet.upstreams[n] for n in ("fast-gpu", "slow-gpu", "hosted"))
    rows, _ = _spec_rows([40, 44, 46, 48] * 100, now)
    fast.curve.fit(rows, now)
    est = Estimate(200, 128)
    gains = {}
    for n in range(1, 48):
        fast.credit(0)
        gains[n] = throughput_gain(fast, est)
    assert all(g1 >= g2 for g1, g2 in zip(list(gains.values()), list(gains.values())[1:]))  # concave: falls with n
    assert gains[47] > 1.3 * throughput_gain(hosted, est) > 1.3 * throughput_gain(slow, est)


# ---------------------------------------------------------------- the prefill slope under queueing (issue 11)
#: The A10G preset's hint (sim/virtual.capacity_hint of calibrated_sims()["slow-gpu"]).
A10G = CapacityHint(a=0.031155, b=0.0003951, ttft=0.0544, prefill=0.000145642, prompt_tokens=256)


def _queued_rows(seed: int, prefill: float, now: float, wait: float = 0.08, count: int = 150):
    """Multi-turn documents on a busy engine: mostly cache hits (300-600 tokens to prefill) at high load, some
    misses (2-4k tokens) on a quieter engine; TTFT = queue wait (exponential, growing with load, with the odd
    multi-second stall) + prefill of the uncached tokens."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        miss = rnd.random() < 0.2
        x = rnd.randint(2000, 4000) if miss else rnd.randint(300, 600)
        n = rnd.uniform(2, 8) if miss else rnd.uniform(6, 16)
        q = rnd.expovariate(1 / (wait * n)) + (rnd.uniform(2, 5) if rnd.random() < 0.05 else 0.0)
        out.append(Sample(now - i * 0.2, n, 0.04, 0.05 + q + prefill * x, x, 200))
    return out


def test_queueing_does_not_spread_the_prefill_of_identical_engines():
    """Four identical engines whose TTFTs are mostly queue wait: the fitted prefill stays near the true one on
    each (it was up to 50x apart between them when fitted by a plain covariance)."""
    now = time.time()
    fitted = []
    for seed in range(4):
        c = CapacityCurve(A10G, slots=16)
        c.fit(_queued_rows(seed, 1.5e-4, now), now)
        fitted.append(c.prefill)
    assert max(fitted) < 2.5 * min(fitted)
    assert all(0.4e-4 < p < 3e-4 for p in fitted)


def test_prefill_follows_a_real_slope_the_data_shows():
    """An engine prefilling 3x slower than its hint, with little queueing: the data wins over the hint."""
    now = time.time()
    c = CapacityCurve(A10G, slots=16)
    c.fit(_queued_rows(1, 4.5e-4, now, wait=0.005, count=200), now)
    assert abs(c.prefill - 4.5e-4) / 4.5e-4 < 0.15


def test_prefill_is_capped_by_the_ttfts_of_long_prompts():
    """A hint far too slow (5 ms per token) is capped by what the data allows: 4k-token prompts served in ~0.5 s."""
    now = time.time()
    slow_hint = CapacityHint(a=0.031, b=0.0004, ttft=0.05, prefill=5e-3, prompt_tokens=256)
    c = CapacityCurve(slow_hint, slots=16)
    c.fit([Sample(now - i * 0.1, 4, 0.04, 0.05 + 1.2e-4 * (3000 + i), 3000 + i, 200) for i in range(10)], now)
    assert c.prefill <= 0.45 / 3000


def test_a_burst_of_queued_prefills_does_not_set_the_ttft_level():
    """The first turns of 32 conversations arrive at once: 8 long prefills queue behind each other (TTFTs up to
    3.5 s). The later turns are cache hits answered in ~0.1 s: a hit's predicted TTFT follows them, not the burst
    (the burst's mean kept hits on their own engine above a 2 s TTFT target for tens of seconds)."""
    now = time.time()
    rnd = random.Random(5)
    burst = [Sample(now - 30 + i * 0.01, 8, 0.04, 0.45 * (i + 1), 3000, 200) for i in range(8)]
    hits = [Sample(now - 20 + i, 8, 0.04, 0.06 + 1.5e-4 * (x := rnd.randint(300, 600)) + rnd.uniform(0, 0.05), x, 200)
            for i in range(12)]
    c = CapacityCurve(A10G, slots=16)
    c.fit(burst + hits, now)
    assert c.ttft_for(450) < 0.3
    assert 0.4e-4 < c.prefill < 3e-4


def test_samples_bunched_at_the_operating_point_keep_the_hinted_slope():
    """A KV-bound A10G runs at 6-10 streams; prefill stalls make each request's t noisy and skewed. The level is
    identified, the slope is not: it stays near the hint's 0.4 ms per stream (fitted freely it came out anywhere
    from 0 to 5x on identical engines, and t(n+1) with it)."""
    now = time.time()
    for seed in range(6):
        rnd = random.Random(seed)
        rows = [Sample(now - i * 0.3, n, 0.04 * (1 + (rnd.expovariate(3) - 0.33)), 0.2, 400, 200)
                for i, n in enumerate(rnd.choice([6, 7, 8, 9, 10]) + rnd.uniform(-0.5, 0.5) for _ in range(40))]
        c = CapacityCurve(A10G, slots=16)
        c.fit(rows, now)
        assert abs(c.tpot(8) - 0.04) < 0.006
        assert 0.15e-3 < c.b < 0.8e-3
