"""The engine-metrics scraper's per-tick budget (pure: which servers a tick scrapes)."""

from __future__ import annotations

from gateway.sim.scaled import scaled_fleet
from gateway.state.fleet import Fleet
from gateway.sync.engine_metrics import EngineMetricsScraper, parse_load
from tests.state_helpers import hold


def fleet(n: int) -> Fleet:
    cfg = scaled_fleet(n, ["http://127.0.0.1:9/v1"])
    for u in cfg.upstreams.values():
        u.metrics_url = "http://127.0.0.1:9/metrics"
    return Fleet(cfg, "throughput")


def test_small_fleet_scrapes_everyone_every_tick():
    s = EngineMetricsScraper(fleet(5), per_tick=8)
    assert [u.name for u in s.due()] == [u.name for u in s.targets]


def test_large_fleet_scrapes_busy_every_tick_and_rotates_the_idle():
    f = fleet(100)
    s = EngineMetricsScraper(f, per_tick=10)
    hold(f.upstreams["up-42"], 1)
    f.upstreams["up-77"].set_external_load(3.0)
    seen: set[str] = set()
    for _ in range(13):  # 98 idle servers, 8 a tick: all seen within 13 ticks
        due = [u.name for u in s.due()]
        assert len(due) == 10 and {"up-42", "up-77"} <= set(due)
        seen.update(due)
    assert len(seen) == 100


def test_all_busy_rotates_within_budget():
    f = fleet(30)
    s = EngineMetricsScraper(f, per_tick=8)
    for u in f.upstreams.values():
        hold(u, 1)
    seen: set[str] = set()
    for _ in range(4):
        due = s.due()
        assert len(due) == 8
        seen.update(u.name for u in due)
    assert len(seen) == 30


def test_parse_skips_other_families_quickly():
    page = "".join(f"vllm:other_metric_{i}{{x=\"1\"}} {i}\n" for i in range(2000))
    page += "vllm:num_requests_running 2\nvllm:num_requests_waiting{a=\"b\"} 1\n"
    assert parse_load(page) == (2.0, 1.0)
