"""Fault tests on loopback: dead upstreams, Redis outages, slow upstreams, 429 storms, broken streams, ejection,
active health checks and graceful shutdown. Each one is bounded in count and time and stops by itself."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.config import CapacityHint, FleetConfig, ModelConfig, UpstreamConfig
from gateway.errors import GatewayError
from gateway.http.api import KEYS
from gateway.http.app import DRAINING, _gate, create_app, readyz
from gateway.http.protocol import GatewayRunner
from gateway.reliability.outlier import OutlierDetector
from gateway.settings import Settings
from gateway.sim import SimConfig, start_sim
from gateway.state.stats import UpstreamStats
from tests.conftest import free_port
from tests.redis_server import RedisServer

MODEL = "m"


def gpu(name: str, **kw) -> SimConfig:
    base = dict(name=name, mode="gpu", base_step=0.01, per_seq=0.0002, slots=64, prefill_per_token=0.0)
    base.update(kw)
    return SimConfig(**base)


def hosted(name: str, **kw) -> SimConfig:
    base = dict(name=name, mode="hosted", ttft=0.02, tok_s=400.0, max_concurrency=None)
    base.update(kw)
    return SimConfig(**base)


def fleet_of(sims, names: list[str], strategy: str | None = None, **per_upstream: dict) -> FleetConfig:
    ups = {}
    for n in names:
        kw = dict(base_url=sims.url(n) + "/v1", model=f"sim-{n}", capacity=CapacityHint(a=0.01, ttft=0.02))
        kw.update(per_upstream.get(n, {}))
        ups[n] = UpstreamConfig(**kw)
    return FleetConfig(upstreams=ups, models={MODEL: ModelConfig(upstreams=names, strategy=strategy)})


def body(stream: bool, max_tokens: int = 8, content: str = "hi") -> dict:
    b = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if stream:
        b["stream"] = True
    return b


@dataclass
class Result:
    kind: str  # ok | error | midstream
    status: int
    detail: str = ""
    chunks: int = 0


def parse_sse(text: str) -> list[str]:
    return [f[6:] for f in text.split("\n\n") if f.startswith("data: ")]


async def call(session: aiohttp.ClientSession, url: str, payload: dict, headers: dict | None = None) -> Result:
    """One request, classified. A stream error counts as `midstream` only after content reached the client."""
    try:
        async with session.post(url + "/v1/chat/completions", json=payload, headers=headers) as r:
            if not payload.get("stream"):
                data = await r.json(content_type=None)
                if r.status == 200 and data.get("choices"):
                    return Result("ok", 200)
                return Result("error", r.status, json.dumps(data)[:300])
            text = await r.text()
            if r.status != 200:
                return Result("error", r.status, text[:300])
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return Result("error", 0, repr(e))
    frames = parse_sse(text)
    content = 0
    for i, f in enumerate(frames):
        if f == "[DONE]":
            return Result("ok" if i == len(frames) - 1 else "error", 200, "frames after [DONE]", content)
        d = json.loads(f)
        if "error" in d:
            if i == len(frames) - 1 and content > 0 and d["error"].get("message"):
                return Result("midstream", 200, d["error"].get("code") or "", content)
            return Result("error", 200, "in-band error before any content or not last: " + f[:200], content)
        if any((c.get("delta") or {}).get("content") for c in d.get("choices") or ()):
            content += 1
    return Result("error", 200, "stream ended without [DONE] or an error event", content)


async def run_load(urls: list[str], seconds: float, concurrency: int, max_tokens: int = 10, headers: dict | None = None,
                   stop: asyncio.Event | None = None) -> list[Result]:
    """`concurrency` workers alternating streamed and non-streamed requests until `seconds` pass (or `stop`)."""
    results: list[Result] = []
    end = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as s:

        async def worker(i: int) -> None:
            n = 0
            while time.monotonic() < end and not (stop and stop.is_set()):
                url = urls[(i + n) % len(urls)]
                results.append(await call(s, url, body((i + n) % 2 == 0, max_tokens), headers))
                n += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return results


async def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(step)
    return bool(pred())


async def settle(gw, sims_apps: list[web.Application] = (), timeout: float = 5.0) -> None:
    """In-flight counts return to 0 on the gateway and on the simulators."""
    ok = await wait_for(
        lambda: all(u.inflight_local == 0 for u in gw.proxy.fleet.upstreams.values())
        and all(a["sim"].stats()["running"] == 0 for a in sims_apps),
        timeout,
    )
    assert ok, (
        {n: u.inflight_local for n, u in gw.proxy.fleet.upstreams.items()},
        [a["sim"].stats()["running"] for a in sims_apps],
    )


# ---------------------------------------------------------------------------------------------------------------
async def test_kill_one_of_three_upstreams_under_load(start_sims, start_gateway):
    sims = await start_sims({n: gpu(n) for n in ("a", "b", "c")})
    gw = await start_gateway(fleet_of(sims, ["a", "b", "c"], strategy="least_busy"), eject_after_failures=3)

    async def killer() -> None:
        await asyncio.sleep(1.5)
        await sims.runners["b"].cleanup()

    results, _ = await asyncio.gather(run_load([gw.url], 4.0, 30), killer())
    ok = [r for r in results if r.kind == "ok"]
    mid = [r for r in results if r.kind == "midstream"]
    errors = [r for r in results if r.kind == "error"]
    assert not errors, errors[:5]
    assert len(ok) > 200
    # Streams already flowing from the killed upstream end with an in-band error event and a clean end.
    assert all(r.chunks > 0 for r in mid)
    b = gw.proxy.fleet.upstreams["b"]
    det = gw.runtime.health
    assert det.ejections(b) >= 1 and det.ejected_until(b) > time.time() - 1
    await settle(gw, [sims.apps["a"], sims.apps["c"]])


async def test_redis_kill_and_restart_under_load(start_sims, start_gateway):
    redis = RedisServer()
    await redis.start()
    try:
        sims = await start_sims({n: gpu(n) for n in ("a", "b")})
        fleet = fleet_of(sims, ["a", "b"])
        common = dict(redis_url=redis.url, redis_prefix=f"gwrel-{uuid.uuid4().hex[:6]}", require_api_key=True,
                      admin_key="adm-reliability-key-123", api_key_refresh_interval=0.3)
        g1 = await start_gateway(fleet, **common)
        g2 = await start_gateway(fleet, **common)
        async with aiohttp.ClientSession() as s:
            async with s.post(g1.url + "/admin/keys", json={"name": "load"},
                              headers={"Authorization": "Bearer adm-reliability-key-123"}) as r:
                assert r.status == 201
                key = (await r.json())["key"]
        auth = {"Authorization": f"Bearer {key}"}
        assert await wait_for(lambda: g2.app[KEYS].lookup(key) is not None, 3.0)

        stop = asyncio.Event()

        async def until(status: str, timeout: float) -> bool:
            end = time.monotonic() + timeout
            async with aiohttp.ClientSession() as s:
                while time.monotonic() < end:
                    statuses = []
                    for g in (g1, g2):
                        async with s.get(g.url + "/healthz") as r:
                            statuses.append((await r.json())["status"])
                    if statuses == [status, status]:
                        return True
                    await asyncio.sleep(0.1)
            return False

        async def chaos() -> tuple[bool, bool]:
            try:
                await asyncio.sleep(1.0)
                await redis.kill()
                degraded = await until("degraded", 5.0)
                await asyncio.sleep(1.0)  # keep serving with Redis down
                await redis.start()  # same port, empty (no persistence)
                recovered = await until("ok", 6.0)
                await asyncio.sleep(1.0)  # and serving after it is back
                return degraded, recovered
            finally:
                stop.set()

        results, (degraded, recovered) = await asyncio.gather(
            run_load([g1.url, g2.url], 15.0, 16, headers=auth, stop=stop), chaos()
        )
        failed = [r for r in results if r.kind != "ok"]
        assert degraded and recovered
        assert not failed, failed[:5]
        assert len(results) > 200
        # The non-persistent Redis came back empty: the replicas wrote the keys back (hashes only).
        import redis.asyncio as aioredis

        r = aioredis.from_url(redis.url)
        try:
            assert await wait_for_async(lambda: r.hlen(common["redis_prefix"] + ":keys"), 1, 3.0)
            raw = json.dumps({k.decode(): v.decode() for k, v in (await r.hgetall(common["redis_prefix"] + ":keys")).items()})
            assert key not in raw and key[6:] not in raw
        finally:
            await r.aclose()
        await settle(g1)
        await settle(g2)
    finally:
        await redis.kill()


async def wait_for_async(fn, at_least: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await fn() >= at_least:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_slow_upstream_ttft_timeout_retries_elsewhere(start_sims, start_gateway):
    sims = await start_sims({"slow": gpu("slow", slowdown=500.0), "ok": gpu("ok")})
    fleet = fleet_of(sims, ["slow", "ok"], strategy="round_robin", slow={"timeout": 1.0})
    gw = await start_gateway(fleet, ttft_timeout=0.4, eject_after_failures=100)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        results = await asyncio.gather(*(call(s, gw.url, body(i % 2 == 0, 5)) for i in range(8)))
    assert all(r.kind == "ok" for r in results), results
    assert time.monotonic() - t0 < 5
    slow = gw.proxy.fleet.upstreams["slow"]
    assert gw.runtime.health.state(slow).fail > 0  # it was tried and timed out (streams: TTFT; non-streamed: total)
    await settle(gw, [sims.apps["slow"], sims.apps["ok"]])


async def test_idle_timeout_mid_stream_sends_in_band_error(start_sims, start_gateway):
    sims = await start_sims({"a": gpu("a", base_step=0.02)})
    gw = await start_gateway(fleet_of(sims, ["a"]), idle_timeout=0.4)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(gw.url + "/v1/chat/completions", json=body(True, 200)) as r:
            assert r.status == 200
            first = await r.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            async with s.post(sims.url("a") + "/sim/faults", json={"slowdown": 1000}) as f:
                assert f.status == 200
            rest = (await r.read()).decode()  # must end by itself (clean chunked end), not hang
    frames = parse_sse(first.decode() + rest)
    err = json.loads(frames[-1])["error"]
    assert err["code"] == "upstream_timeout" and err["type"] == "timeout_error"
    assert "[DONE]" not in frames
    await settle(gw, [sims.apps["a"]])


async def test_429_storm_fails_fast_and_honours_retry_after(start_sims, start_gateway):
    sims = await start_sims({"h1": hosted("h1", rpm=2), "h2": hosted("h2", rpm=2)})
    gw = await start_gateway(fleet_of(sims, ["h1", "h2"], h1={"kind": "hosted"}, h2={"kind": "hosted"}), queue_timeout=2.0)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:

        async def one(stream: bool):
            async with s.post(gw.url + "/v1/chat/completions", json=body(stream, 3)) as r:
                return r.status, r.headers.get("Retry-After"), await r.text()

        first = await asyncio.gather(*(one(i % 2 == 0) for i in range(10)))
        assert time.monotonic() - t0 < 6, "a 429 storm must not hold clients"
        statuses = [st for st, _, _ in first]
        assert set(statuses) <= {200, 429} and statuses.count(200) == 4, statuses
        for st, ra, text in first:
            if st == 429:
                err = json.loads(text)["error"]
                assert err["type"] == "rate_limit_error" and err["message"] and err["code"]
                assert ra is not None and int(ra) >= 30  # the upstreams' window is 60 s
        # Cooldown: further requests are answered by the gateway; the cooling upstreams see nothing.
        seen = {n: sims.apps[n]["sim"].stats() for n in ("h1", "h2")}
        t1 = time.monotonic()
        again = await asyncio.gather(*(one(False) for _ in range(10)))
        assert time.monotonic() - t1 < 2
        assert all(st == 429 and ra for st, ra, _ in again)
        for n in ("h1", "h2"):
            st = sims.apps[n]["sim"].stats()
            assert (st["completed"], st["rejected_429"]) == (seen[n]["completed"], seen[n]["rejected_429"])
    await settle(gw)


async def test_429_storm_with_one_healthy_upstream_all_succeed(start_sims, start_gateway):
    sims = await start_sims({"h1": hosted("h1", rpm=1), "h2": hosted("h2", rpm=1), "g": gpu("g")})
    fleet = fleet_of(sims, ["h1", "h2", "g"], strategy="round_robin", h1={"kind": "hosted"}, h2={"kind": "hosted"})
    gw = await start_gateway(fleet, queue_timeout=2.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        results = []
        for _ in range(3):
            results += await asyncio.gather(*(call(s, gw.url, body(i % 2 == 0, 4)) for i in range(8)))
    assert all(r.kind == "ok" for r in results), [r for r in results if r.kind != "ok"][:3]
    assert sum(sims.apps[n]["sim"].stats()["rejected_429"] for n in ("h1", "h2")) >= 1  # the storm did happen
    assert all(gw.proxy.fleet.upstreams[n].cooldown_until > time.time() for n in ("h1", "h2"))
    await settle(gw)


async def test_short_retry_after_waits_in_gateway_then_succeeds(start_sims, start_gateway):
    """Retry-After shorter than the queue timeout: the request waits out the cooldown and is served."""
    sims = await start_sims({"h": hosted("h", rpm=1, window=1.0)})
    gw = await start_gateway(fleet_of(sims, ["h"], h={"kind": "hosted"}), queue_timeout=5.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        r1 = await call(s, gw.url, body(False, 2))
        t0 = time.monotonic()
        r2 = await call(s, gw.url, body(False, 2))  # sim says 429 Retry-After: 1 -> cooldown -> served after it
    assert r1.kind == "ok" and r2.kind == "ok", (r1, r2)
    assert 0.5 < time.monotonic() - t0 < 4.0
    assert sims.apps["h"]["sim"].stats()["rejected_429"] == 1  # no hammering during the cooldown


async def test_mid_stream_failure_openai_sdk_and_slot_freed(start_sims, start_gateway):
    sims = await start_sims({"a": gpu("a")})
    gw = await start_gateway(fleet_of(sims, ["a"]))
    async with aiohttp.ClientSession() as s:
        async with s.post(sims.url("a") + "/sim/faults", json={"fail_streams_after": 3}) as r:
            assert r.status == 200
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-test", max_retries=0, timeout=10)
    got = []
    with pytest.raises(openai.APIError) as ei:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=50, stream=True)
        async for ch in stream:
            got += [c.delta.content for c in ch.choices if c.delta.content]
    assert len(got) == 3
    assert "stream" in str(ei.value.message) or "closed" in str(ei.value.message)
    # Raw SSE: the last frame is the error event and the chunked body ends cleanly.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        res = await call(s, gw.url, body(True, 50))
    assert res.kind == "midstream" and res.chunks == 3 and res.detail == "upstream_disconnected"
    await settle(gw, [sims.apps["a"]])
    # Non-streamed requests are unaffected by the stream fault.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        assert (await call(s, gw.url, body(False, 50))).kind == "ok"


async def test_mid_stream_failure_anthropic_client_gets_error_event(start_sims, start_gateway):
    import anthropic

    sims = await start_sims({"a": gpu("a")})
    gw = await start_gateway(fleet_of(sims, ["a"]))
    async with aiohttp.ClientSession() as s:
        async with s.post(sims.url("a") + "/sim/faults", json={"fail_streams_after": 2}) as r:
            assert r.status == 200
    c = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-test", max_retries=0, timeout=10)
    with pytest.raises(anthropic.APIError):
        async with c.messages.stream(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "x"}]) as st:
            async for _ in st:
                pass
    await settle(gw, [sims.apps["a"]])


async def test_outlier_ejection_and_half_open_recovery(start_sims, start_gateway):
    sims = await start_sims({"bad": gpu("bad", error_rate=1.0), "good": gpu("good")})
    # Passive ejection alone: the active prober (its /models answers even while completions fail) would end the
    # ejection early on its own timer (tested in test_faults.py).
    gw = await start_gateway(fleet_of(sims, ["bad", "good"], strategy="round_robin"),
                             eject_after_failures=3, eject_base_seconds=1.0, eject_probe_interval=0)
    bad = gw.proxy.fleet.upstreams["bad"]
    det = gw.runtime.health
    st = det.state(bad)
    sim_bad = sims.apps["bad"]["sim"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for i in range(8):
            assert (await call(s, gw.url, body(i % 2 == 0, 3))).kind == "ok"
        assert det.is_ejected(bad, time.time()) and st.ejections == 1
        assert sim_bad.errors_500 == 3
        # Ejected: no traffic reaches it.
        for i in range(6):
            assert (await call(s, gw.url, body(False, 3))).kind == "ok"
        assert sim_bad.errors_500 == 3
        # Still broken when half-open: one probe fails, the ejection doubles.
        await asyncio.sleep(max(0.0, st.ejected_until - time.time()) + 0.05)
        for i in range(4):
            assert (await call(s, gw.url, body(False, 3))).kind == "ok"
        assert sim_bad.errors_500 == 4 and st.ejections == 2
        assert st.ejected_until - time.time() > 1.2  # 2 s backoff now
        # Fixed: after the backoff one probe succeeds and it is back in rotation.
        async with s.post(sims.url("bad") + "/sim/faults", json={"error_rate": 0}) as r:
            assert r.status == 200
        await asyncio.sleep(max(0.0, st.ejected_until - time.time()) + 0.05)
        for i in range(6):
            assert (await call(s, gw.url, body(i % 2 == 0, 3))).kind == "ok"
    assert st.consecutive == 0 and not st.probing and not st.half_open and not det.is_ejected(bad, time.time())
    assert sim_bad.completed >= 2


def test_half_open_allows_one_probe_and_abandoned_probe_frees_it():
    det = OutlierDetector(2, 1.0, 10.0)
    u = UpstreamStats(UpstreamConfig(name="u", base_url="http://127.0.0.1:1/v1"))
    det.failure(u)
    det.failure(u)
    now = time.time()
    assert not det.available(u, now)
    later = det.ejected_until(u) + 0.01
    assert det.available(u, later)
    det.dispatched(u)  # the probe
    assert not det.available(u, later)  # only one at a time
    det.abandoned(u)  # its client went away: no verdict
    assert det.available(u, later)
    det.dispatched(u)
    det.success(u)
    assert det.available(u, later) and det.state(u).consecutive == 0 and not det.state(u).half_open


async def test_active_health_checks_eject_and_restore(start_sims, start_gateway):
    sims = await start_sims({"a": gpu("a"), "b": gpu("b")})
    gw = await start_gateway(fleet_of(sims, ["a", "b"]), health_check_interval=0.2, health_check_timeout=0.5)
    b = gw.proxy.fleet.upstreams["b"]
    det = gw.runtime.health
    port = sims.ports["b"]
    await asyncio.sleep(0.5)
    assert not det.is_ejected(b, time.time())
    await sims.runners["b"].cleanup()
    assert await wait_for(lambda: det.is_ejected(b, time.time()), 3.0)  # no traffic needed
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for i in range(4):
            assert (await call(s, gw.url, body(i % 2 == 0, 3))).kind == "ok"
    runner, _ = await start_sim(gpu("b"), "127.0.0.1", port)
    try:
        assert await wait_for(lambda: not det.is_ejected(b, time.time()), 3.0)  # restored before its backoff ends
    finally:
        await runner.cleanup()


# ---- graceful shutdown ------------------------------------------------------------------------------------------
async def _own_gateway(fleet: FleetConfig, **settings) -> tuple[str, web.Application, web.AppRunner]:
    """A gateway this test shuts down itself (the fixture's would clean it up a second time)."""
    s = Settings(replica_id=f"t-{uuid.uuid4().hex[:6]}", **settings)
    app = create_app(s, fleet)
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=s.shutdown_grace)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", app, runner


async def test_graceful_shutdown_drains_streams(start_sims):
    sims = await start_sims({"a": gpu("a", base_step=0.02)})
    url, app, runner = await _own_gateway(fleet_of(sims, ["a"]), shutdown_grace=10.0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        async with s.post(url + "/v1/chat/completions", json=body(True, 60)) as r:
            assert r.status == 200
            first = await r.content.readuntil(b"\n\n")
            t0 = time.monotonic()
            shutdown = asyncio.create_task(runner.cleanup())
            await asyncio.sleep(0.1)
            assert app[DRAINING]
            # Draining: not ready, and new API requests (e.g. on a kept-alive connection) get a 503 to retry elsewhere.
            assert (await readyz(make_mocked_request("GET", "/readyz", app=app))).status == 503
            with pytest.raises(GatewayError) as ei:
                _gate(make_mocked_request("POST", "/v1/chat/completions", app=app))
            assert ei.value.status == 503 and ei.value.retry_after
            # The listener is closed: new connections are refused.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s2:
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with s2.post(url + "/v1/chat/completions", json=body(False, 2)):
                        pass
            rest = (await r.read()).decode()
    frames = parse_sse(first.decode() + rest)
    assert frames[-1] == "[DONE]"
    assert sum(1 for f in frames[:-1] if json.loads(f)["choices"] and json.loads(f)["choices"][0]["delta"].get("content")) == 60
    await asyncio.wait_for(shutdown, 5.0)
    assert time.monotonic() - t0 < 5.0  # it did not sit out the whole grace


async def test_shutdown_grace_expiry_ends_streams_in_band(start_sims):
    sims = await start_sims({"a": gpu("a", base_step=0.05)})
    url, app, runner = await _own_gateway(fleet_of(sims, ["a"]), shutdown_grace=0.5)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        async with s.post(url + "/v1/chat/completions", json=body(True, 500)) as r:
            first = await r.content.readuntil(b"\n\n")
            t0 = time.monotonic()
            shutdown = asyncio.create_task(runner.cleanup())
            rest = (await r.read()).decode()
    frames = parse_sse(first.decode() + rest)
    err = json.loads(frames[-1])["error"]
    assert err["code"] == "shutting_down"
    await asyncio.wait_for(shutdown, 5.0)
    assert time.monotonic() - t0 < 4.0
    assert sims.apps["a"]["sim"].stats()["running"] == 0 or await wait_for(
        lambda: sims.apps["a"]["sim"].stats()["running"] == 0, 3.0
    )


async def test_no_retry_after_first_byte(start_sims, start_gateway):
    """Once content reached the client a failure is never retried elsewhere (it would duplicate output)."""
    sims = await start_sims({"a": gpu("a"), "b": gpu("b")})
    gw = await start_gateway(fleet_of(sims, ["a", "b"], strategy="round_robin"), eject_after_failures=100)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for n in ("a", "b"):
            async with s.post(sims.url(n) + "/sim/faults", json={"fail_streams_after": 2}) as r:
                assert r.status == 200
        results = [await call(s, gw.url, body(True, 20)) for _ in range(6)]
    assert all(r.kind == "midstream" and r.chunks == 2 for r in results), results
    assert sum(sims.apps[n]["sim"]._ids for n in ("a", "b")) == 6  # one upstream request per client request
    await settle(gw, [sims.apps["a"], sims.apps["b"]])


async def test_retry_budget_caps_retries_when_everything_fails(start_sims, start_gateway):
    sims = await start_sims({n: gpu(n, error_rate=1.0) for n in ("a", "b", "c")})
    gw = await start_gateway(fleet_of(sims, ["a", "b", "c"]), eject_after_failures=1000, retry_budget_ratio=0.2,
                             retry_budget_min=5, max_attempts=3)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        results = [await call(s, gw.url, body(i % 2 == 0, 3)) for i in range(30)]
    assert all(r.kind == "error" and r.status == 502 for r in results)
    err = json.loads(results[-1].detail)["error"]
    assert err["type"] == "upstream_error" and err["code"] == "upstream_500"
    attempts = sum(sims.apps[n]["sim"].errors_500 for n in ("a", "b", "c"))
    assert 30 + 5 <= attempts <= 30 + 6  # 30 first attempts + max(5, 20% of 30) retries, not 90


def test_retry_budget_unit():
    from gateway.reliability.retry_budget import RetryBudget

    b = RetryBudget(0.5, 2, window=10.0)
    assert b.try_spend() and b.try_spend() and not b.try_spend()  # the minimum
    for _ in range(10):
        b.request()
    assert sum(b.try_spend() for _ in range(10)) == 3  # 50% of 10 requests = 5 retries in the window, 2 used


async def test_malformed_chunk_mid_stream_ends_with_in_band_error(start_gateway, start_upstream):
    """Valid SSE carrying JSON that is not a chunk object: a clean in-band error, never a second HTTP response."""

    async def chat(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ok = {"id": "c", "object": "chat.completion.chunk", "model": "x", "choices": [{"index": 0, "delta": {"content": " hi"}, "finish_reason": None}]}
        await resp.write(b"data: " + json.dumps(ok).encode() + b"\n\n")
        await asyncio.sleep(0.05)
        await resp.write(b'data: "oops"\n\n')
        await asyncio.sleep(0.05)
        return resp

    url = await start_upstream(chat)
    gw = await start_gateway(FleetConfig(upstreams={"odd": UpstreamConfig(base_url=url)}, models={"m": ModelConfig(upstreams=["odd"])}))
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 200
            body = await asyncio.wait_for(r.text(), 5)
    assert "HTTP/1.1" not in body
    frames = [f for f in body.split("\n\n") if f]
    err = json.loads(frames[-1][6:])
    assert err["error"]["code"] == "upstream_bad_response"
    assert gw.proxy.fleet.upstreams["odd"].inflight_local == 0


async def test_client_that_stops_reading_releases_the_upstream(start_gateway, start_upstream):
    """Writes to a client that no longer reads get the idle budget; then the slot is freed."""
    big = " word" * 6000

    async def chat(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "x", "choices": [{"index": 0, "delta": {"content": big}, "finish_reason": None}]}
        frame = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        for _ in range(5000):  # ~150 MB if nobody stops it
            await resp.write(frame)
        return resp

    url = await start_upstream(chat)
    gw = await start_gateway(
        FleetConfig(upstreams={"big": UpstreamConfig(base_url=url)}, models={"m": ModelConfig(upstreams=["big"])}),
        idle_timeout=1.0,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    await reader.read(100)  # the stream started; from now on this client never reads
    up = gw.proxy.fleet.upstreams["big"]
    for _ in range(150):
        await asyncio.sleep(0.1)
        if up.inflight_local == 0:
            break
    assert up.inflight_local == 0, "a client that stopped reading still holds the upstream"
    writer.close()
