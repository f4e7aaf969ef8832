"""Helper fleets of gateway.sim.reference for the calibrated / speculative-decoding benches (pure)."""

from __future__ import annotations

from gateway.sim.reference import (
    DEMO_PORTS,
    REFERENCE_SIMS,
    calibrated_fleet,
    calibrated_sims,
    reference_fleet,
    spec_decode_sims,
)


def test_calibrated_fleets_keep_the_reference_shape() -> None:
    sims = calibrated_sims()
    assert list(sims) == list(REFERENCE_SIMS)
    assert sims["fast-gpu"].preset == "h100-llama8b" and sims["slow-gpu"].preset == "a10g-llama8b"
    assert all(s.kv_engine and s.prefix_caching for s in (sims["fast-gpu"], sims["slow-gpu"]))
    assert sims["hosted"].prompt_cache_min_tokens == 1024 and sims["hosted"].rpm == REFERENCE_SIMS["hosted"].rpm
    small = calibrated_sims(kv_scale=0.25)
    assert small["fast-gpu"].kv_cache_tokens == 427_000 // 4
    spec = spec_decode_sims()
    assert spec["fast-gpu"].spec_k == 4 and spec["slow-gpu"].spec_k == 0
    assert REFERENCE_SIMS["fast-gpu"].preset is None and not REFERENCE_SIMS["fast-gpu"].kv_engine


def test_calibrated_fleet_seeds_capacity_from_the_profiles() -> None:
    sims = calibrated_sims()
    fleet = calibrated_fleet(DEMO_PORTS, sims)
    ref = reference_fleet(DEMO_PORTS)
    fast, slow = fleet.upstreams["fast-gpu"], fleet.upstreams["slow-gpu"]
    assert fast.max_concurrency == 64 and slow.max_concurrency == 16
    assert 0.004 < fast.capacity.a < 0.007 and slow.capacity.a > 4 * fast.capacity.a
    assert fast.capacity != ref.upstreams["fast-gpu"].capacity
    assert fleet.upstreams["hosted"].capacity == ref.upstreams["hosted"].capacity
    assert fast.base_url == "http://127.0.0.1:9101/v1"
