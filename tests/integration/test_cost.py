"""Cost and key budgets through two gateway replicas sharing the real Redis, called with the real openai SDK.

Prices are whole dollars per 1M tokens, so a request's cost in micro-dollars is prompt*IN + output*OUT exactly:
the recomputation below is independent of gateway/cost.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import aiohttp
import anthropic
import openai
import pytest

from gateway.config import FleetConfig
from gateway.http.api import LEDGER
from gateway.sim import SimConfig
from gateway.tokens import prompt_tokens
from tests.conftest import REDIS_URL
from tests.redis_server import RedisServer

ADMIN = "adm-" + "c" * 24
H = {"Authorization": f"Bearer {ADMIN}"}
IN, OUT = 100, 400  # USD per 1M input / output tokens on "good"; "flaky" is dearer (and always fails)
MODEL = "m"


def _sims() -> dict[str, SimConfig]:
    good = SimConfig(name="good", mode="gpu", base_step=0.002, per_seq=0.0001, slots=64, prefill_per_token=0.0)
    flaky = SimConfig(name="flaky", mode="gpu", base_step=0.002, per_seq=0.0001, slots=64, error_rate=1.0)
    return {"good": good, "flaky": flaky}


def _fleet(ports: dict[str, int]) -> FleetConfig:
    def up(name: str, pin: int, pout: int) -> dict:
        return {
            "provider": "openai", "kind": "hosted", "base_url": f"http://127.0.0.1:{ports[name]}/v1", "model": name,
            "max_concurrency": 64, "capacity": {"a": 0.002, "b": 0.0001, "ttft": 0.01},
            "price": {"input_per_1m": pin, "output_per_1m": pout},
        }

    return FleetConfig.model_validate({
        "upstreams": {"good": up("good", IN, OUT), "flaky": up("flaky", 1000, 4000)},
        "models": {MODEL: {"upstreams": ["flaky", "good"], "strategy": "round_robin", "aliases": ["m-alias"]},
                   "broken": {"upstreams": ["flaky"]}, "cheap": {"upstreams": ["good"]}},
    })


async def _replicas(start_sims, start_gateway, redis_prefix, n: int = 2, **kw):
    sims = await start_sims(_sims())
    cfg = _fleet(sims.ports)
    common = dict(redis_url=REDIS_URL, redis_prefix=redis_prefix, admin_key=ADMIN, require_api_key=True,
                  api_key_refresh_interval=0.1, spend_sync_interval=0.1, eject_after_failures=1000,
                  retry_budget_min=1000, max_attempts=3, shutdown_grace=2.0, **kw)
    gws = [await start_gateway(cfg, **common) for _ in range(n)]
    return sims, gws


async def _key(s: aiohttp.ClientSession, url: str, **body) -> dict:
    async with s.post(url + "/admin/keys", json={"name": "k", **body}, headers=H) as r:
        assert r.status == 201, await r.text()
        return await r.json()


def _client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


def _msgs(i: int) -> list[dict]:
    return [{"role": "user", "content": f"request number {i} " + "x" * (i % 7 * 9)}]


async def _settled(gws) -> None:
    """Both replicas flushed their charges and read the totals back."""
    await asyncio.sleep(0.35)
    for g in gws:
        await g.app[LEDGER].sync()


async def _spend_micros(s: aiohttp.ClientSession, url: str, group_by: str = "key") -> dict:
    async with s.get(url + f"/admin/spend?group_by={group_by}", headers=H) as r:
        assert r.status == 200, await r.text()
        return {k: v["usd_micros"] for k, v in (await r.json())["totals"].items()}


async def test_spend_matches_recomputation_to_the_cent(start_sims, start_gateway, redis_client, redis_prefix):
    sims, gws = await _replicas(start_sims, start_gateway, redis_prefix)
    async with aiohttp.ClientSession() as s:
        ka = await _key(s, gws[0].url, metadata={"team": "search", "owner": "ana"})
        kb = await _key(s, gws[0].url)
        await asyncio.sleep(0.3)  # keys reach replica 2
        expected = 0

        async def full(i: int) -> int:
            c = _client(gws[i % 2].url, ka["key"])
            mt = 5 + i % 11
            if i % 3 == 0:  # streamed, with usage
                stream = await c.chat.completions.create(model=MODEL, messages=_msgs(i), max_tokens=mt, stream=True,
                                                         stream_options={"include_usage": True})
                usage = None
                async for chunk in stream:
                    usage = chunk.usage or usage
            else:
                usage = (await c.chat.completions.create(model=MODEL, messages=_msgs(i), max_tokens=mt)).usage
            assert usage is not None and usage.completion_tokens == mt
            return usage.prompt_tokens * IN + usage.completion_tokens * OUT

        async def failing(i: int) -> None:  # never produces tokens: must cost nothing
            c = _client(gws[i % 2].url, ka["key"])
            with pytest.raises(openai.APIStatusError) as e:
                await c.chat.completions.create(model="broken", messages=_msgs(i), max_tokens=5)
            assert e.value.status_code == 502

        seen: list[int] = []

        async def cut(i: int) -> None:  # the client walks away after 3 chunks
            c = _client(gws[i % 2].url, kb["key"])
            stream = await c.chat.completions.create(model=MODEL, messages=_msgs(i), max_tokens=40, stream=True)
            n = 0
            async for chunk in stream:
                n += bool(chunk.choices and chunk.choices[0].delta.content)
                if n == 3:
                    break
            await stream.close()
            seen.append(n)

        results = await asyncio.gather(*(full(i) for i in range(30)), *(failing(i) for i in range(4)), *(cut(i) for i in range(6)))
        expected = sum(r for r in results if isinstance(r, int))
        assert sims.apps["flaky"]["sim"].stats()["errors_500"] > 4, "no retries happened"  # round robin hit flaky
        await asyncio.sleep(0.3)  # cut streams end on the gateway side
        await _settled(gws)
        by_key = await _spend_micros(s, gws[1].url)
        assert by_key[ka["id"]] == expected  # exact to the micro-dollar, so to the cent
        # Cut streams: charged for at least the tokens the client saw and at most the whole request.
        p_hi = max(prompt_tokens({"messages": _msgs(i)}) for i in range(6)) + 20
        assert sum(seen) * OUT <= by_key[kb["id"]] <= 6 * (p_hi * IN + 40 * OUT)
        by_up = await _spend_micros(s, gws[0].url, "upstream")
        assert set(by_up) == {"good"} and by_up["good"] == by_key[ka["id"]] + by_key[kb["id"]]
        async with s.get(gws[1].url + "/admin/keys", headers=H) as r:
            rows = {k["id"]: k for k in (await r.json())["data"]}
        assert round(rows[ka["id"]]["spend_usd_today"] * 1e6) == expected
        assert rows[ka["id"]]["metadata"] == {"team": "search", "owner": "ana"}
        async with s.get(gws[0].url + "/admin/upstreams", headers=H) as r:
            admin_view = {k["id"]: k for k in (await r.json())["keys"]}
        assert round(admin_view[ka["id"]]["spend_usd_today"] * 1e6) == expected
        async with s.get(gws[0].url + "/metrics") as r:
            text = await r.text()
        assert f'gateway_key_spend_usd{{key_id="{ka["id"]}"' in text
        assert 'gateway_cost_usd_per_1m_output_tokens{name="good",scope="upstream"}' in text
        async with s.get(gws[0].url + "/v1/gateway/upstreams") as r:
            snap = await r.json()
        good = next(u for u in snap["upstreams"] if u["name"] == "good")
        assert good["usd_per_1m_output"] > OUT  # input included
        assert snap["cost"]["fleet_usd_per_1m_output"] is not None


async def test_budget_stops_within_one_request_on_both_replicas_then_resets(start_sims, start_gateway, redis_client, redis_prefix):
    _, gws = await _replicas(start_sims, start_gateway, redis_prefix)
    async with aiohttp.ClientSession() as s:
        k = await _key(s, gws[0].url, budget_usd_day=0.05)
        await asyncio.sleep(0.3)
        msgs = [{"role": "user", "content": "budget"}]
        one = 0  # one request's cost, from its usage
        refused = [False, False]

        async def call(i: int) -> tuple[int, int, bool]:
            """(replica, cost, refused for good)"""
            try:
                r = await _client(gws[i].url, k["key"]).chat.completions.create(model="cheap", messages=msgs, max_tokens=20)
            except openai.RateLimitError as e:
                body = e.body if isinstance(e.body, dict) else {}
                if body.get("code") == "rate_limit_exceeded":  # this replica's share is busy: not the end
                    return i, 0, False
                assert body.get("code") == "insufficient_quota", e.body
                assert "resets at" in body.get("message", "")
                return i, 0, True
            assert r.usage is not None
            return i, r.usage.prompt_tokens * IN + r.usage.completion_tokens * OUT, False

        for _ in range(60):
            results = await asyncio.gather(*(call(i % 2) for i in range(6)))  # 3 at a time on each replica
            one = max(one, *(c for _, c, _ in results))
            refused = [all(stop for j, _, stop in results if j == i) for i in (0, 1)]
            if all(refused):
                break
            await asyncio.sleep(0.12)
        assert all(refused), "a replica never stopped the key"
        await _settled(gws)
        spent = (await _spend_micros(s, gws[0].url))[k["id"]]
        assert 50_000 - one <= spent <= 50_000 + one, (spent, one)
        for g in gws:  # stays stopped on both
            with pytest.raises(openai.RateLimitError):
                await _client(g.url, k["key"]).chat.completions.create(model="cheap", messages=msgs, max_tokens=20)
        # Anthropic clients get the same refusal in Anthropic's error shape.
        ac = anthropic.AsyncAnthropic(base_url=gws[1].url, api_key=k["key"], max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as ae:
            await ac.messages.create(model="cheap", max_tokens=20, messages=[{"role": "user", "content": "budget"}])
        assert ae.value.body["type"] == "error" and "resets at" in ae.value.body["error"]["message"]  # type: ignore[index]
        # The next UTC day: a fresh budget on both replicas.
        for g in gws:
            g.app[LEDGER].clock = lambda: time.time() + 86400
        for g in gws:
            r = await _client(g.url, k["key"]).chat.completions.create(model="cheap", messages=msgs, max_tokens=20)
            assert r.usage is not None


async def test_key_expiry_allow_list_unknown_fields_and_headers(start_sims, start_gateway, redis_client, redis_prefix):
    _, gws = await _replicas(start_sims, start_gateway, redis_prefix, n=1)
    url = gws[0].url
    async with aiohttp.ClientSession() as s:
        for bad in ({"budget_usd": 5}, {"models": "m"}, {"budget_usd_day": -1}, {"expires_at": "soon"}, {"metadata": {"team": 1}}):
            async with s.post(url + "/admin/keys", json={"name": "x", **bad}, headers=H) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["type"] == "invalid_request_error", (bad, body)
        async with s.post(url + "/admin/keys", json={"name": "x", "budget_usd": 5}, headers=H) as r:
            assert "budget_usd" in (await r.json())["error"]["message"]
        for q in ("group_by=team", "from=yesterday", "from=2026-02-01&to=2026-01-01", "from=2020-01-01&to=2026-01-01"):
            async with s.get(url + "/admin/spend?" + q, headers=H) as r:
                assert r.status == 400, q
        async with s.get(url + "/admin/spend") as r:
            assert r.status == 401
        short = await _key(s, url, expires_at=time.time() + 1.0, models=["m"], rpm=100, tpm=100000)
        c = _client(url, short["key"])
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=_msgs(1), max_tokens=5)
        assert raw.headers["x-ratelimit-limit-requests"] == "100"
        assert int(raw.headers["x-ratelimit-remaining-requests"]) == 99
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000" and "x-ratelimit-reset-tokens" in raw.headers
        raw = await c.chat.completions.with_raw_response.create(model="m-alias", messages=_msgs(1), max_tokens=5, stream=True)
        assert raw.headers["x-ratelimit-remaining-requests"] == "98"
        async for _ in raw.parse():
            pass
        with pytest.raises(openai.PermissionDeniedError) as e:
            await c.chat.completions.create(model="broken", messages=_msgs(1), max_tokens=5)
        assert e.value.body["code"] == "model_not_allowed"  # type: ignore[index]
        await asyncio.sleep(1.1)
        with pytest.raises(openai.AuthenticationError) as e2:
            await c.chat.completions.create(model=MODEL, messages=_msgs(1), max_tokens=5)
        assert e2.value.body["code"] == "key_expired"  # type: ignore[index]


async def test_keys_and_spend_survive_a_restart(start_sims, start_gateway, redis_client, redis_prefix):
    sims, gws = await _replicas(start_sims, start_gateway, redis_prefix, n=1)
    async with aiohttp.ClientSession() as s:
        k = await _key(s, gws[0].url, budget_usd_month=10)
        r = await _client(gws[0].url, k["key"]).chat.completions.create(model=MODEL, messages=_msgs(2), max_tokens=5)
        assert r.usage is not None
        await gws[0].stop()  # flushes the last charges
        _, fresh = await _replicas(start_sims, start_gateway, redis_prefix, n=1)
        await asyncio.sleep(0.3)
        r2 = await _client(fresh[0].url, k["key"]).chat.completions.create(model=MODEL, messages=_msgs(2), max_tokens=5)
        assert r2.usage is not None
        await _settled(fresh)
        spent = (await _spend_micros(s, fresh[0].url))[k["id"]]
        assert spent == 2 * (r.usage.prompt_tokens * IN + r.usage.completion_tokens * OUT)
    # `gateway spend` (the CLI, in its own process: it blocks on HTTP) shows the same figure.
    env = {**os.environ, "GATEWAY_ADMIN_KEY": ADMIN}
    for args, want in ((["--group-by", "key"], f"{spent / 1e6:.6f}"), (["--group-by", "upstream", "--json"], '"usd_micros": ' + str(spent))):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from gateway.cli import main; raise SystemExit(main())", "spend", "--url", fresh[0].url, *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        assert want in out.decode(), out.decode()


async def test_redis_outage_neither_fails_open_nor_blocks(start_sims, start_gateway):
    """Redis dies mid-run: requests keep flowing fast, the budget still stops the key on both replicas, and the
    charges made during the outage reach Redis exactly once when it is back."""
    redis = RedisServer()
    await redis.start()
    try:
        sims = await start_sims(_sims())
        cfg = _fleet(sims.ports)
        common = dict(redis_url=redis.url, redis_prefix="gwcost", admin_key=ADMIN, require_api_key=True,
                      api_key_refresh_interval=0.1, spend_sync_interval=0.1, shutdown_grace=2.0)
        gws = [await start_gateway(cfg, **common) for _ in range(2)]
        async with aiohttp.ClientSession() as s:
            k = await _key(s, gws[0].url, budget_usd_day=0.05)
        await asyncio.sleep(0.4)
        msgs = [{"role": "user", "content": "outage"}]
        await redis.kill()
        ok_cost, refused, one = 0, [False, False], 0
        for _ in range(20):
            for i in (0, 1):
                t0 = time.monotonic()
                try:
                    r = await _client(gws[i].url, k["key"]).chat.completions.create(model="cheap", messages=msgs, max_tokens=20)
                    assert r.usage is not None
                    c = r.usage.prompt_tokens * IN + r.usage.completion_tokens * OUT
                    ok_cost, one = ok_cost + c, max(one, c)
                except openai.RateLimitError as e:
                    assert isinstance(e.body, dict) and e.body.get("code") == "insufficient_quota"
                    refused[i] = True
                assert time.monotonic() - t0 < 2.0  # nothing waits on the dead Redis
            if all(refused):
                break
        assert all(refused), "budget failed open during the outage"
        assert ok_cost <= 50_000 + one
        redis2 = RedisServer(redis.port)
        await redis2.start()
        redis = redis2
        await asyncio.sleep(0.6)
        for g in gws:
            await g.app[LEDGER].sync()
        async with aiohttp.ClientSession() as s:
            spent = (await _spend_micros(s, gws[0].url))[k["id"]]
        assert spent == ok_cost  # flushed once, none lost, none doubled
    finally:
        await redis.kill()


async def test_request_cost_on_spans(start_sims, start_gateway, otlp_receiver, monkeypatch):
    sims = await start_sims(_sims())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
    gw = await start_gateway(_fleet(sims.ports))
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    r = await openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model="cheap", messages=_msgs(3), max_tokens=7, extra_headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert r.usage is not None
    spans = await otlp_receiver.wait_for(lambda s: s["trace_id"] == trace, count=2, timeout=10)
    want = (r.usage.prompt_tokens * IN + r.usage.completion_tokens * OUT) / 1e6
    (server,) = [s for s in spans if s["kind"] == "SERVER"]  # the request's span carries the request's cost
    assert server["attributes"]["gateway.request.cost_usd"] == pytest.approx(want)


# ---- per-class cost preference and cost per class ---------------------------------------------------------------
DEAR, CHEAP = (10, 40), (1, 2)  # USD per 1M input / output tokens (a chargeback rate on each GPU server)


def _class_fleet(ports: dict[str, int], batch_prefer: str | None) -> FleetConfig:
    """A fast dear GPU server and a slower cheap one; the batch class (its built-in settings, plus `prefer`)."""
    def up(name: str, a: float, price: tuple[int, int]) -> dict:
        return {"provider": "openai", "kind": "gpu", "base_url": f"http://127.0.0.1:{ports[name]}/v1", "model": name,
                "max_concurrency": 32, "capacity": {"a": a, "b": 0.0001, "ttft": 0.01},
                "price": {"input_per_1m": price[0], "output_per_1m": price[1]}}

    batch = {"priority": 10, "min_share": 0.1, "wait_s": 0.0, "aging_s": 10.0, "max_wait_s": 300.0, "prefer": batch_prefer}
    return FleetConfig.model_validate({
        "upstreams": {"dear": up("dear", 0.002, DEAR), "cheap": up("cheap", 0.01, CHEAP)},
        "models": {MODEL: {"upstreams": ["dear", "cheap"], "classes": {"batch": batch}}},
    })


async def _served(url: str, cls: str, n: int) -> list[tuple[str, int, int]]:
    """(upstream, prompt tokens, completion tokens) of `n` concurrent requests of class `cls`."""
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20)

    async def one(i: int) -> tuple[str, int, int]:
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=_msgs(i), max_tokens=6 + i, extra_headers={"X-Gateway-Class": cls})
        r = raw.parse()
        assert raw.headers["x-gateway-class"] == cls and r.usage is not None
        return raw.headers["x-gateway-upstream"], r.usage.prompt_tokens, r.usage.completion_tokens

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_batch_prefer_cost_sends_batch_to_the_cheapest_and_prices_each_class(start_sims, start_gateway):
    sims = await start_sims({
        "dear": SimConfig(name="dear", mode="gpu", base_step=0.002, per_seq=0.0001, slots=32, prefill_per_token=0.0),
        "cheap": SimConfig(name="cheap", mode="gpu", base_step=0.01, per_seq=0.0001, slots=32, prefill_per_token=0.0),
    })
    off = await start_gateway(_class_fleet(sims.ports, None))
    assert {u for u, _, _ in await _served(off.url, "batch", 4)} == {"dear"}  # without: the throughput choice
    gw = await start_gateway(_class_fleet(sims.ports, "cost"))
    batch, inter = await _served(gw.url, "batch", 6), await _served(gw.url, "interactive", 4)
    assert {u for u, _, _ in batch} == {"cheap"}  # batch flows to the cheapest tokens
    assert {u for u, _, _ in inter} == {"dear"}  # interactive keeps the fastest upstream
    want = {"batch": sum(p * CHEAP[0] + o * CHEAP[1] for _, p, o in batch),
            "interactive": sum(p * DEAR[0] + o * DEAR[1] for _, p, o in inter)}
    tokens = {"batch": sum(o for *_, o in batch), "interactive": sum(o for *_, o in inter)}
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/v1/gateway/upstreams") as r:
            classes = (await r.json())["cost"]["classes"][MODEL]
        async with s.get(gw.url + "/metrics") as r:
            text = await r.text()
    for cls in ("batch", "interactive"):
        f = classes[cls]
        assert (f["spend_micros"], f["output_tokens"], f["requests"]) == (want[cls], tokens[cls], len(batch if cls == "batch" else inter))
        assert f["usd_per_1m_output"] == pytest.approx(want[cls] / tokens[cls], abs=1e-6)
        assert f'gateway_class_spend_usd_total{{model="{MODEL}",service_class="{cls}"}} {want[cls] / 1e6}' in text
    assert classes["batch"]["usd_per_1m_output"] * 5 < classes["interactive"]["usd_per_1m_output"]
