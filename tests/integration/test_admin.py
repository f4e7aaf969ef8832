"""Admin API: live stats and weights that apply to every replica through Redis and persist."""

from __future__ import annotations

import asyncio

import aiohttp
import openai

from tests.conftest import REDIS_URL

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
