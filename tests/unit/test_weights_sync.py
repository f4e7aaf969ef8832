"""Durable admin weights: which side wins when a replica's view and Redis's disagree (pure; no Redis here)."""

from __future__ import annotations

from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.state.fleet import Fleet
from gateway.sync.fleet_sync import FleetSync


def replica() -> FleetSync:
    return FleetSync(Fleet(reference_fleet(DEMO_PORTS), "throughput"), "r1", "")  # no redis_url: no connection


def test_newer_redis_weight_is_adopted_and_missing_one_is_written_back():
    s = replica()
    fast = s.fleet.upstreams["fast-gpu"]
    assert s._apply_weights({"fast-gpu": 0.0}, {"fast-gpu": 100}) == []
    assert fast.weight == 0.0 and s.weight_versions["fast-gpu"] == 100
    # Redis restarted empty: keep the admin weight (not the config one) and ask to write it back.
    assert s._apply_weights({}, {}) == ["fast-gpu"]
    assert fast.weight == 0.0
    # Another replica wrote back an older change: ours is newer, so ours goes back.
    assert s._apply_weights({"fast-gpu": 3.0}, {"fast-gpu": 50}) == ["fast-gpu"]
    assert fast.weight == 0.0
    # A newer change made elsewhere wins.
    assert s._apply_weights({"fast-gpu": 2.0}, {"fast-gpu": 200}) == []
    assert fast.weight == 2.0


def test_never_changed_weights_follow_the_config():
    s = replica()
    slow = s.fleet.upstreams["slow-gpu"]
    assert s._apply_weights({}, {}) == []
    assert slow.weight == slow.cfg.weight
    assert s._apply_weights({"slow-gpu": 0.5}, {}) == []  # written by an older gateway without versions
    assert slow.weight == 0.5
