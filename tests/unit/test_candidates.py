"""Large pools score a constant number of candidates (routing/candidates.py); small pools stay exact."""

from __future__ import annotations

import random

from gateway.config import CapacityHint, FleetConfig, ModelConfig, UpstreamConfig
from gateway.context import Estimate, RequestContext
from gateway.reliability.outlier import OutlierDetector
from gateway.routing import candidates
from gateway.routing.router import Router, throughput_gain
from gateway.state.fleet import Fleet

EST = RequestContext("chat", "m", {}, True, False, "openai", Estimate(prompt_tokens=200, output_tokens=128),
                     service_class="interactive")


def big_fleet(n: int, fast: set[int] | None = None) -> Fleet:
    """n GPU upstreams; those in `fast` have a 4x faster curve."""
    fast = fast or set()
    ups = {}
    for i in range(n):
        a = 0.005 if i in fast else 0.02
        ups[f"u{i}"] = UpstreamConfig(
            name=f"u{i}", provider="openai", kind="gpu", base_url="http://127.0.0.1:9", model="m",
            max_concurrency=8, capacity=CapacityHint(a=a, b=a / 10),
        )
    cfg = FleetConfig(upstreams=ups, models={"m": ModelConfig(upstreams=list(ups))})
    return Fleet(cfg, "throughput")


def router(fleet: Fleet, sample_above: int = candidates.SAMPLE_ABOVE) -> Router:
    return Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=4, queue_timeout=0.3, sample_above=sample_above)


def test_large_pool_scores_a_constant_number_of_candidates():
    for n in (30, 300, 1000):
        fleet = big_fleet(n)
        d = router(fleet).pick(fleet.pools["m"], EST)
        assert len(d.scores) <= candidates.SHORTLIST + candidates.RANDOM_D, n


def test_small_pool_stays_exact():
    fleet = big_fleet(candidates.SAMPLE_ABOVE)
    d = router(fleet).pick(fleet.pools["m"], EST)
    assert len(d.scores) == candidates.SAMPLE_ABOVE


def test_index_shortlists_the_best_and_reranks_on_change():
    fleet = big_fleet(200, fast={17, 123})
    r = router(fleet)
    pool = fleet.pools["m"]
    d = r.pick(pool, EST)
    assert d.upstream.name in ("u17", "u123")  # found through the index, not by luck of the sample
    # Fill the fast ones: after a re-rank they leave the shortlist (no slot) and picks go elsewhere.
    for name in ("u17", "u123"):
        for _ in range(8):
            r._dispatch(r.pick(pool, EST, exclude=frozenset(u for u in fleet.upstreams if u != name)), EST)
    r.reindex()
    assert not {"u17", "u123"} & {u.name for u in r._index(pool).shortlist}
    assert r.pick(pool, EST).upstream.name not in ("u17", "u123")
    for _ in range(8):
        r.release(fleet.upstreams["u17"], EST)
    r.reindex()
    assert "u17" in {u.name for u in r._index(pool).shortlist}


def test_burst_between_reranks_spreads_and_stays_close_to_exact():
    """Without any re-rank a burst still spreads (live scores on shortlist + sample), and the total gain of the
    placements is within a few percent of exact scoring's."""
    def burst(sample_above: int, seed: int) -> float:
        fleet = big_fleet(60, fast={3, 11, 29, 41})
        r = router(fleet, sample_above)
        for idx in r._indexes.values():
            idx.rng = random.Random(seed)
        pool = fleet.pools["m"]
        r._index(pool).rng = random.Random(seed)
        total = 0.0
        for _ in range(120):
            d = r.pick(pool, EST)
            total += throughput_gain(d.upstream, EST.est)
            r._dispatch(d, EST)
        return total
    exact = burst(10_000, 1)
    sampled = [burst(candidates.SAMPLE_ABOVE, s) for s in range(3)]
    assert all(s >= 0.95 * exact for s in sampled), (exact, sampled)


def test_falls_back_to_exact_scan_when_no_candidate_fits():
    fleet = big_fleet(100)
    r = router(fleet)
    pool = fleet.pools["m"]
    only = "u57"
    for u in fleet.upstreams.values():
        if u.name != only:
            u.set_weight(0)  # drained: never a candidate
    r.reindex()
    assert r.pick(pool, EST).upstream.name == only
