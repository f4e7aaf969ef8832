"""Admin API: live stats and weights that apply to every replica through Redis and persist."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import openai
import redis.asyncio as aioredis

from tests.conftest import REDIS_URL
from tests.redis_server import RedisServer

ADMIN = "adm-" + "k" * 24
H = {"Authorization": f"Bearer {ADMIN}"}


async def test_weights_apply_to_all_replicas_and_persist(sim_fleet, start_gateway, redis_client, redis_prefix):
    cfg = sim_fleet.config()
    common = dict(redis_url=REDIS_URL, redis_prefix=redis_prefix, admin_key=ADMIN)
    a = await start_gateway(cfg, **common)
    b = await start_gateway(cfg, **common)
    async with aiohttp.ClientSession() as s:
        async with s.put(a.url + "/admin/upstreams/fast-gpu/weight", json={"weight": 0}, headers=H) as r:
            assert r.status == 200 and (await r.json())["weight"] == 0.0
        await asyncio.sleep(0.5)
        async with s.get(b.url + "/admin/upstreams", headers=H) as r:
            snap = await r.json()
        fast = next(u for u in snap["upstreams"] if u["name"] == "fast-gpu")
        assert fast["weight"] == 0.0 and fast["state"] == "draining"
        assert snap["redis"] == "ok"
        # Drained on replica b too: traffic through b never reaches fast-gpu.
        c = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
        for _ in range(6):
            await c.chat.completions.create(model="fleet-model", messages=[{"role": "user", "content": "STOP_AFTER_2"}])
        assert sim_fleet.apps["fast-gpu"]["sim"].stats()["completed"] == 0
        # A replica that starts later picks the weight up from Redis.
        late = await start_gateway(cfg, **common)
        await asyncio.sleep(0.3)
        assert late.proxy.fleet.upstreams["fast-gpu"].weight == 0.0
        async with s.put(b.url + "/admin/upstreams/fast-gpu/weight", json={"weight": 2.5}, headers=H) as r:
            assert r.status == 200
        await asyncio.sleep(0.5)
        assert a.proxy.fleet.upstreams["fast-gpu"].weight == 2.5


async def test_admin_errors(sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config(), admin_key=ADMIN)
    off = await start_gateway(sim_fleet.config())
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/admin/upstreams") as r:
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        async with s.get(gw.url + "/admin/upstreams", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.put(gw.url + "/admin/upstreams/nope/weight", json={"weight": 1}, headers=H) as r:
            assert r.status == 404
        for bad in ({"weight": -1}, {"weight": "x"}, {}, {"weight": True}):
            async with s.put(gw.url + "/admin/upstreams/fast-gpu/weight", json=bad, headers=H) as r:
                assert r.status == 400, bad
        async with s.get(off.url + "/admin/upstreams", headers=H) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "admin_disabled"
        async with s.get(gw.url + "/v1/gateway/upstreams") as r:
            view = await r.json()
        assert {u["name"] for u in view["upstreams"]} == {"fast-gpu", "slow-gpu", "hosted"}
        assert view["redis"] == "disabled" and "queue_depth" in view
        assert ADMIN not in str(view)


async def test_weights_survive_redis_restart_and_outage_is_a_clean_503(sim_fleet, start_gateway):
    """Redis restarts empty: the replicas write the admin weight back (no replica falls back to the config weight);
    a change while Redis is down or frozen is a 503 store_unavailable that changes nothing on any replica."""
    redis = RedisServer()
    await redis.start()
    try:
        cfg = sim_fleet.config()
        common = dict(redis_url=redis.url, redis_prefix=f"gwadm-{uuid.uuid4().hex[:6]}", admin_key=ADMIN)
        a = await start_gateway(cfg, **common)
        b = await start_gateway(cfg, **common)
        weight = lambda g: g.proxy.fleet.upstreams["fast-gpu"].weight  # noqa: E731
        url = "/admin/upstreams/fast-gpu/weight"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.put(a.url + url, json={"weight": 0}, headers=H) as r:
                assert r.status == 200
            assert await _until(lambda: weight(b) == 0.0, 2.0)
            await redis.kill()
            async with s.put(b.url + url, json={"weight": 3}, headers=H) as r:
                err = await r.json()
                assert r.status == 503 and err["error"]["code"] == "store_unavailable", err
                assert r.headers["Retry-After"] == "1"
            assert weight(a) == 0.0 and weight(b) == 0.0
            await redis.start()  # same port, empty
            seen: set[float] = set()
            rc = aioredis.from_url(redis.url)
            try:
                async def written_back() -> bool:
                    seen.update((weight(a), weight(b)))
                    return await rc.hget(common["redis_prefix"] + ":weights", "fast-gpu") == b"0.0"

                assert await _until_async(written_back, 6.0)
                await asyncio.sleep(0.5)
                seen.update((weight(a), weight(b)))
                assert seen == {0.0}, seen  # never back to the config weight (1.0), not even for a cycle
                # A newer change after the restart wins over every replica's remembered one.
                async with s.put(a.url + url, json={"weight": 1.5}, headers=H) as r:
                    assert r.status == 200
                assert await _until(lambda: weight(b) == 1.5, 2.0)
                await asyncio.sleep(0.5)
                assert weight(a) == weight(b) == 1.5
                assert await rc.hget(common["redis_prefix"] + ":weights", "fast-gpu") == b"1.5"
                # Frozen Redis (SIGSTOP): bounded, clean 503, nothing changed.
                redis.freeze()
                try:
                    t0 = time.monotonic()
                    async with s.put(b.url + url, json={"weight": 0.5}, headers=H) as r:
                        assert r.status == 503 and (await r.json())["error"]["code"] == "store_unavailable"
                    assert time.monotonic() - t0 < 3.0
                finally:
                    redis.thaw()
                await asyncio.sleep(0.5)
                assert weight(a) == weight(b) == 1.5
            finally:
                await rc.aclose()
    finally:
        await redis.kill()


async def _until(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return bool(pred())


async def _until_async(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if await pred():
                return True
        except (OSError, aioredis.RedisError):
            pass
        await asyncio.sleep(0.05)
    return False
