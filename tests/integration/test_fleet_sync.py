"""Replicas share one fleet view through the real Redis; a crashed replica's load disappears; outages degrade."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.routing.capacity import Sample
from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.state.fleet import Fleet
from gateway.state.upstream_rates import OUT
from gateway.sync.fleet_sync import HEARTBEAT_TTL, FleetSync
from tests.conftest import REDIS_URL
from tests.redis_server import RedisServer


def replica(name: str, prefix: str, url: str = REDIS_URL) -> tuple[Fleet, FleetSync]:
    fleet = Fleet(reference_fleet(DEMO_PORTS), "throughput")
    return fleet, FleetSync(fleet, name, url, prefix, interval=0.05)


@pytest.fixture
async def pair(redis_client, redis_prefix):
    """Two started replicas A and B sharing the real Redis under a fresh prefix."""
    (fa, a), (fb, b) = replica("A", redis_prefix), replica("B", redis_prefix)
    await a.start()
    await b.start()
    yield (fa, a), (fb, b)
    await a.stop()
    await b.stop()


async def test_two_replicas_share_inflight_tokens_weights_and_cooldowns(pair, redis_client, redis_prefix):
    (fa, a), (fb, b) = pair
    fast_a, fast_b = fa.upstreams["fast-gpu"], fb.upstreams["fast-gpu"]
    for _ in range(3):
        fast_a.credit(300)
    fast_a.record_tokens(500)
    await a.set_weight("slow-gpu", 0.25)
    a.set_cooldown("hosted", time.time() + 30)
    await asyncio.sleep(0.4)
    assert fast_b.inflight_remote == 3 and fast_b.inflight == 3
    assert fast_b.replicas == 2
    assert fast_b.rates.others.sum(OUT, 0) == 500 and fast_b.window_sum(OUT) == 500
    assert fast_b.tok_s > 0
    assert fast_b.rates.used_req_60 == 3 and fast_b.rates.used_tok_60 == 900
    assert fb.upstreams["slow-gpu"].weight == 0.25
    assert fb.upstreams["hosted"].state(time.time()) == "cooldown"
    # B's own load shows up on A; A's own count is exact and never double counted.
    fast_b.credit(0)
    await asyncio.sleep(0.3)
    assert fast_a.inflight == 4 and fast_a.inflight_local == 3
    assert await redis_client.hget(f"{redis_prefix}:weights", "slow-gpu") == b"0.25"


async def test_samples_are_shared_and_fit_on_every_replica(pair):
    (fa, a), (fb, b) = pair
    now = time.time()
    slow_a = fa.upstreams["slow-gpu"]
    for i in range(200):
        n = 1 + i % 16
        slow_a.record_sample(Sample(now, n, 0.05 + 0.004 * n, 0.3, 100, 64))  # truth: a=0.05, b=0.004
    await asyncio.sleep(1.4)  # > REFIT_EVERY
    curve = fb.upstreams["slow-gpu"].curve
    assert curve.samples >= 200
    assert abs(curve.a - 0.05) < 0.01 and abs(curve.b - 0.004) < 0.001


async def test_crashed_replica_load_expires(pair, redis_client, redis_prefix):
    (fa, a), (fb, b) = pair
    for _ in range(5):
        fa.upstreams["fast-gpu"].credit(0)
    await asyncio.sleep(0.3)
    assert fb.upstreams["fast-gpu"].inflight_remote == 5
    await a._loop.stop()  # A dies without cleaning up (no goodbye to Redis)
    await asyncio.sleep(HEARTBEAT_TTL + 0.5)
    assert fb.upstreams["fast-gpu"].inflight_remote == 0
    assert fb.upstreams["fast-gpu"].replicas == 1
    assert await redis_client.hget(f"{redis_prefix}:inflight", "A") is None  # cleaned by a live replica


async def test_clean_stop_removes_replica_at_once(pair):
    (fa, a), (fb, b) = pair
    fa.upstreams["hosted"].credit(0)
    await asyncio.sleep(0.2)
    assert fb.upstreams["hosted"].inflight_remote == 1
    await a.stop()
    await asyncio.sleep(0.2)
    assert fb.upstreams["hosted"].inflight_remote == 0


async def test_redis_outage_degrades_then_recovers_without_losing_counts():
    server = RedisServer()
    await server.start()
    fa, a = replica("A", "gwtest-outage", server.url)
    await a.start()
    try:
        fast = fa.upstreams["fast-gpu"]
        fast.record_tokens(100)
        await asyncio.sleep(0.2)
        assert a.status == "ok"
        await server.kill()
        fast.record_tokens(50)
        await asyncio.sleep(1.5)
        assert a.status == "degraded"
        assert fast.window_sum(OUT) == 150  # the local view keeps working
        assert fast.tok_s > 0
        restarted = RedisServer(server.port)
        await restarted.start()
        server = restarted
        for _ in range(60):
            await asyncio.sleep(0.1)
            if a.status == "ok":
                break
        assert a.status == "ok"
        await asyncio.sleep(0.3)
        # Redis restarted empty: the replica wrote its whole window back, once (writes are idempotent).
        fb, b = replica("B", "gwtest-outage", server.url)
        await b.start()
        try:
            assert fb.upstreams["fast-gpu"].window_sum(OUT) == 150
        finally:
            await b.stop()
    finally:
        await a.stop()
        await server.kill()


async def test_flush_retried_after_a_timeout_does_not_double_count(pair):
    """A write that timed out may still have landed; writing absolute totals again must not add twice."""
    (fa, a), (fb, b) = pair
    fast = fa.upstreams["fast-gpu"]
    for _ in range(10):
        fast.credit(100)
    await asyncio.sleep(0.2)
    fast.rates.mark_dirty()  # as after a failed (timed-out) flush
    await asyncio.sleep(0.3)
    seen = fb.upstreams["fast-gpu"]
    assert seen.rates.used_req_60 == 10 and seen.rates.used_tok_60 == 1000


async def test_in_process_store_without_redis():
    fleet = Fleet(reference_fleet(DEMO_PORTS), "throughput")
    sync = FleetSync(fleet, "solo", "", interval=0.05)
    await sync.start()
    try:
        up = fleet.upstreams["fast-gpu"]
        up.credit(10)
        up.record_tokens(40)
        await asyncio.sleep(0.15)
        assert sync.status == "disabled"
        assert up.window_sum(OUT) == 40 and up.rates.used_req_60 == 1 and up.inflight == 1
    finally:
        await sync.stop()
