"""Gateway API keys, the admin key, per-key limits, size limits, redirects, and a secret-leak check over
everything the gateway writes (logs, spans, client responses, what upstreams receive)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.auth import digest
from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.errors import GatewayError
from gateway.http.api import KEYS
from gateway.observability.redact import scrub
from gateway.observability.telemetry import Telemetry
from gateway.sim import SimConfig

ADMIN_KEY = "adm_Zq81LmN0pXr7Tt"
UPSTREAM_KEY = "upk_live_7Hc9QeZ2xV4mN8wB"
WRONG_CLIENT_KEY = "sk-client-WRONG-1234567890abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def start_fake(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def leaky_upstream(seen: list[dict]):
    """An OpenAI-ish upstream that echoes credentials in its errors (some real ones do, partly)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        body = await request.json()
        text = json.dumps(body["messages"])
        auth = request.headers.get("Authorization", "")
        leak = f"bad credentials {auth} for https://svc:{UPSTREAM_KEY}@up.internal/v1?api-key={UPSTREAM_KEY} key={UPSTREAM_KEY}"
        if "LEAK500" in text:
            return web.json_response({"error": {"message": leak}}, status=500)
        if "LEAK400" in text:
            return web.json_response({"error": {"message": leak}}, status=400)
        if "LEAKSTREAM" in text:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "x",
                     "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.05)  # so the chunk reaches the client before the error
            await resp.write(b"data: " + json.dumps({"error": {"message": leak}}).encode() + b"\n\n")
            await resp.write_eof()
            return resp
        return web.json_response({
            "id": "c2", "object": "chat.completion", "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        })

    return handler


async def test_no_secret_leaks_in_logs_spans_or_responses(start_sims, start_gateway, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("GOOD_KEY", UPSTREAM_KEY)
    seen: list[dict] = []
    leaky_runner, leaky_url = await start_fake(leaky_upstream(seen))
    try:
        sims = await start_sims({"good": SimConfig(name="good", api_key=UPSTREAM_KEY),
                                 "wrongkey": SimConfig(name="wrongkey", api_key="another-key-entirely")})
        fleet = FleetConfig(
            upstreams={
                "good": UpstreamConfig(base_url=sims.url("good") + "/v1", api_key_env="GOOD_KEY"),
                "wrongkey": UpstreamConfig(base_url=sims.url("wrongkey") + "/v1", api_key_env="GOOD_KEY"),
                "leaky": UpstreamConfig(base_url=leaky_url + "/v1", api_key_env="GOOD_KEY"),
            },
            models={"mixed": ModelConfig(upstreams=["wrongkey", "good"], strategy="round_robin"),
                    "leaky": ModelConfig(upstreams=["leaky"])},
        )
        exporter = InMemorySpanExporter()
        tel = Telemetry(span_exporter=exporter)
        gw = await start_gateway(fleet, require_api_key=True, admin_key=ADMIN_KEY, telemetry=tel)
        texts: list[str] = []  # everything the clients saw

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:

            async def post(path: str, payload: dict, headers: dict) -> tuple[int, str]:
                async with s.post(gw.url + path, json=payload, headers=headers) as r:
                    t = await r.text()
                    texts.append(t + json.dumps(dict(r.headers)))
                    return r.status, t

            st, t = await post("/admin/keys", {"name": "sec", "rpm": 1000}, ADMIN)
            assert st == 201
            key = json.loads(t)["key"]
            texts.pop()  # the one response that must carry the key
            bearer = {"Authorization": f"Bearer {key}", "X-Client-Secret": "client-private-value-42"}
            msg = lambda c: {"model": "mixed", "messages": [{"role": "user", "content": c}], "max_tokens": 4}  # noqa: E731

            assert (await post("/admin/keys", {"name": "x"}, {"Authorization": f"Bearer {WRONG_CLIENT_KEY}"}))[0] == 401
            assert (await post("/v1/chat/completions", msg("a"), {}))[0] == 401
            assert (await post("/v1/chat/completions", msg("a"), {"Authorization": f"Bearer {WRONG_CLIENT_KEY}"}))[0] == 401
            for i in range(4):  # round robin: half start on the upstream that rejects our key, then retry
                st, t = await post("/v1/chat/completions", {**msg("STOP_AFTER_2"), "stream": i % 2 == 1}, bearer)
                assert st == 200, t
            st, _ = await post("/v1/chat/completions", msg("a"), {"x-api-key": key})
            assert st == 200
            leaky = lambda c, **kw: {**msg(c), "model": "leaky", **kw}  # noqa: E731
            st, t = await post("/v1/chat/completions", leaky("LEAK500"), bearer)
            assert st == 502 and "bad credentials" in t
            st, t = await post("/v1/chat/completions", leaky("LEAK400"), bearer)
            assert st == 400 and "bad credentials" in t
            st, t = await post("/v1/chat/completions", leaky("LEAKSTREAM", stream=True), bearer)
            assert st == 200 and "bad credentials" in t and '"error"' in t
            st, t = await post("/v1/messages", {"model": "leaky", "max_tokens": 5, "messages": [
                {"role": "user", "content": "LEAK400"}]}, {"x-api-key": key})
            assert st == 400 and "bad credentials" in t

        # Anything else that might log a credential goes through the same scrubbing.
        logging.getLogger("gateway.anything").warning("retrying with Authorization: Bearer %s", key)
        logging.getLogger("thirdparty").info("headers %s", {"x-api-key": UPSTREAM_KEY, "api-key": ADMIN_KEY})
        try:
            raise RuntimeError(f"connect to https://u:{UPSTREAM_KEY}@host failed with key {key}")
        except RuntimeError:
            logging.getLogger("gateway.anything").exception("unexpected")

        await tel.force_flush()
        spans = exporter.get_finished_spans()
        assert spans, "spans were recorded"
        span_text = []
        for sp in spans:
            span_text.append(sp.name)
            span_text.append(json.dumps(dict(sp.attributes or {}), default=str))
            span_text.append(sp.status.description or "")
            for ev in sp.events:
                span_text.append(ev.name + json.dumps(dict(ev.attributes or {}), default=str))
        log_text = [caplog.text] + [r.getMessage() + (r.exc_text or "") for r in caplog.records]
        assert any("bad credentials" in t for t in log_text + span_text), "the upstream errors were logged/traced"

        secrets = [key, key[6:], ADMIN_KEY, UPSTREAM_KEY, WRONG_CLIENT_KEY, "client-private-value-42"]
        for where, blobs in (("logs", log_text), ("spans", span_text), ("responses", texts)):
            for blob in blobs:
                for sec in secrets:
                    assert sec not in blob, f"secret leaked into {where}: ...{blob[max(0, blob.find(sec) - 80):blob.find(sec) + 40]}..."
        # Upstreams get their own key, never the client's credentials or headers.
        assert seen
        for h in seen:
            flat = json.dumps(h)
            assert key not in flat and "client-private-value-42" not in flat
            assert h.get("Authorization") == f"Bearer {UPSTREAM_KEY}"
            assert "User-Agent" not in h  # nor the gateway's stack (aiohttp's default User-Agent)
        await tel.shutdown()
    finally:
        await leaky_runner.cleanup()


def test_scrub_patterns():
    cases = {
        "Authorization: Bearer abc.def-ghi": "abc.def-ghi",
        "{'authorization': 'Bearer tok123456'}": "tok123456",
        "x-api-key=sk-ant-api03-abcdefghijkl": "abcdefghijkl",
        "api-key: 0123456789abcdef": "0123456789abcdef",
        "https://user:pa55word@example.com/v1": "pa55word",
        "https://h/v1/x?api-version=1&api-key=qwertyuiop": "qwertyuiop",
        "key sk-proj-ABCDEFGHIJKLMNOP used": "ABCDEFGHIJKLMNOP",
        "AKIAABCDEFGHIJKLMNOP": "AKIAABCDEFGHIJKLMNOP",
    }
    for text, secret in cases.items():
        out = scrub(text)
        assert secret not in out and "[REDACTED]" in out, (text, out)
    assert scrub("plain words, no secrets: 42 tokens") == "plain words, no secrets: 42 tokens"


async def test_api_keys_lifecycle_and_constant_time(sim_fleet, start_gateway, monkeypatch):
    calls: list[tuple] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    gw = await start_gateway(sim_fleet.config(), require_api_key=True, admin_key=ADMIN_KEY)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        # Admin API: a wrong or missing admin key is a 401, compared as fixed-length digests.
        for h in ({}, {"Authorization": "Bearer nope"}, {"x-admin-key": ADMIN_KEY + "x"}, {"Authorization": f"Bearer {ADMIN_KEY[:-1]}"}):
            async with s.get(gw.url + "/admin/keys", headers=h) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_admin_key"
        assert calls and all(n == 32 and m == 32 for _, n, m in calls)
        async with s.get(gw.url + "/admin/keys", headers={"x-admin-key": ADMIN_KEY}) as r:
            assert r.status == 200
        # A gateway key is not an admin key.
        async with s.post(gw.url + "/admin/keys", json={"name": "svc", "rpm": 100}, headers=ADMIN) as r:
            assert r.status == 201
            created = await r.json()
        key = created["key"]
        assert key.startswith("sk-gw-") and len(key) > 40 and created["prefix"] == key[:10] + "..."
        async with s.get(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 401
        async with s.get(gw.url + "/admin/keys", headers=ADMIN) as r:
            listed = await r.json()
        assert [k["id"] for k in listed["data"]] == [created["id"]]
        assert key not in json.dumps(listed) and digest(key) not in json.dumps(listed)

        calls.clear()
        c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        r = await c.chat.completions.create(model="fleet-model", messages=[{"role": "user", "content": "STOP_AFTER_2"}])
        assert r.usage.completion_tokens == 2
        assert calls, "the key lookup compares digests with hmac.compare_digest"
        a = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0)  # sends x-api-key
        m = await a.messages.create(model="fleet-model", max_tokens=5, messages=[{"role": "user", "content": "STOP_AFTER_3"}])
        assert m.usage.output_tokens == 3
        models = await c.models.list()
        assert [x async for x in models]

        async with s.post(gw.url + "/v1/chat/completions", json={"model": "fleet-model"}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        for bad in ("sk-gw-" + "A" * 43, key + "x", key[:-1], key.upper()):
            cc = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=bad, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as ei:
                await cc.chat.completions.create(model="fleet-model", messages=[{"role": "user", "content": "x"}])
            assert ei.value.status_code == 401 and ei.value.body["code"] == "invalid_api_key"
        with pytest.raises(anthropic.AuthenticationError):
            await anthropic.AsyncAnthropic(base_url=gw.url, api_key="wrong-key", max_retries=0).messages.create(
                model="fleet-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        # Health and readiness stay open (probes carry no keys).
        async with s.get(gw.url + "/healthz") as r:
            assert r.status == 200

        async with s.delete(gw.url + f"/admin/keys/{created['id']}", headers=ADMIN) as r:
            assert r.status == 200
        async with s.delete(gw.url + f"/admin/keys/{created['id']}", headers=ADMIN) as r:
            assert r.status == 404
        async with s.delete(gw.url + "/admin/keys/%C3%A9t%C3%A9", headers=ADMIN) as r:
            assert r.status == 404
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(model="fleet-model", messages=[{"role": "user", "content": "x"}])
        # Bad admin input.
        for payload in ({}, {"name": ""}, {"name": "x", "rpm": 0}, {"name": "x", "tpm": "many"}, {"name": 5}):
            async with s.post(gw.url + "/admin/keys", json=payload, headers=ADMIN) as r:
                assert r.status == 400, payload


async def test_per_key_rpm_and_tpm_limits(sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config(), require_api_key=True, admin_key=ADMIN_KEY)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(gw.url + "/admin/keys", json={"name": "rpm3", "rpm": 3}, headers=ADMIN) as r:
            rpm_key = (await r.json())["key"]
        async with s.post(gw.url + "/admin/keys", json={"name": "tpm", "tpm": 300}, headers=ADMIN) as r:
            tpm_key = (await r.json())["key"]
        body = {"model": "fleet-model", "messages": [{"role": "user", "content": "STOP_AFTER_2"}], "max_tokens": 10}
        statuses = []
        for _ in range(5):
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {rpm_key}"}) as r:
                statuses.append(r.status)
                if r.status == 429:
                    err = (await r.json())["error"]
                    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
                    assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert statuses == [200, 200, 200, 429, 429]
        # TPM: charged prompt + max_tokens up front, settled to the real usage after.
        tk = {"Authorization": f"Bearer {tpm_key}"}
        async with s.post(gw.url + "/v1/chat/completions", json={**body, "max_tokens": 400}, headers=tk) as r:
            assert r.status == 429 and "tokens per minute" in (await r.json())["error"]["message"]
        ok = 0
        for _ in range(6):  # ~20 tokens each once settled (estimate 10 + prompt), so several fit in 300
            async with s.post(gw.url + "/v1/chat/completions", json={**body, "max_tokens": 100}, headers=tk) as r:
                ok += r.status == 200
        assert ok >= 4


async def test_keys_shared_between_replicas_through_redis(sim_fleet, start_gateway, redis_client, redis_prefix):
    common = dict(require_api_key=True, admin_key=ADMIN_KEY, redis_url="redis://127.0.0.1:6379/0",
                  redis_prefix=redis_prefix, api_key_refresh_interval=0.5)
    g1 = await start_gateway(sim_fleet.config(), **common)
    g2 = await start_gateway(sim_fleet.config(), **common)
    body = {"model": "fleet-model", "messages": [{"role": "user", "content": "STOP_AFTER_1"}]}

    async def status(gw, key) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers={"x-api-key": key}) as r:
                return r.status

    async with aiohttp.ClientSession() as s:
        async with s.post(g1.url + "/admin/keys", json={"name": "shared"}, headers=ADMIN) as r:
            created = await r.json()
    key = created["key"]
    assert await status(g1, key) == 200  # at once on the replica that created it
    t0 = time.monotonic()
    while await status(g2, key) != 200:
        assert time.monotonic() - t0 < 2.0, "a new key must work on every replica within ~1-2 s"
        await asyncio.sleep(0.05)
    # At rest only the SHA-256 is stored.
    stored = await redis_client.hgetall(f"{redis_prefix}:keys")
    assert list(stored) == [digest(key).encode()]
    assert key.encode() not in b"".join(stored.values()) and key[6:].encode() not in b"".join(stored.values())
    async with aiohttp.ClientSession() as s:
        async with s.delete(g2.url + f"/admin/keys/{created['id']}", headers=ADMIN) as r:
            assert r.status == 200
    assert await status(g2, key) == 401
    t0 = time.monotonic()
    while await status(g1, key) != 401:
        assert time.monotonic() - t0 < 2.0, "a deleted key must stop working everywhere within ~1-2 s"
        await asyncio.sleep(0.05)
    assert g1.app[KEYS].lookup(key) is None


async def _raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        return await asyncio.wait_for(r.read(65536), timeout)
    finally:
        w.close()


async def test_header_and_body_size_limits(gateway):
    port = int(gateway.url.rsplit(":", 1)[1])
    big = "a" * (20 * 1024)
    t0 = time.monotonic()
    resp = await _raw_request(port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode())
    assert resp.split(b" ", 2)[1] in (b"400", b"431"), resp[:100]
    resp = await _raw_request(port, f"GET /v1/models?{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert resp.split(b" ", 2)[1] in (b"400", b"414", b"431"), resp[:100]
    many = "".join(f"X-H{i}: v\r\n" for i in range(300))
    resp = await _raw_request(port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert resp.split(b" ", 2)[1] in (b"400", b"431"), resp[:100]
    # A declared body over the limit is refused without reading it.
    resp = await _raw_request(
        port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n{",
    )
    assert resp.split(b" ", 2)[1] == b"413" and b"body_too_large" in resp
    assert time.monotonic() - t0 < 10
    # Normal-sized headers still work.
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/v1/models", headers={"X-Ok": "a" * 4000}) as r:
            assert r.status == 200


async def test_redirects_not_followed_and_urls_only_from_config(start_gateway):
    hits: list[str] = []

    async def capture(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({})

    cap_runner, cap_url = await start_fake(capture)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(cap_url + "/v1/chat/completions")

    red_runner, red_url = await start_fake(redirect)
    try:
        fleet = FleetConfig(upstreams={"r": UpstreamConfig(base_url=red_url + "/v1")}, models={"m": ModelConfig(upstreams=["r"])})
        gw = await start_gateway(fleet)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 502
                assert (await r.json())["error"]["code"] == "upstream_bad_response"
            for model in (cap_url + "/v1", "../../etc/passwd", f"m@{cap_url}", "m/../../x"):
                async with s.post(gw.url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]}) as r:
                    assert r.status in (400, 404)
        assert hits == []
    finally:
        await red_runner.cleanup()
        await cap_runner.cleanup()


def test_scrub_stays_linear_on_hostile_text():
    """scrub() runs over untrusted upstream error bodies (up to 64 KB): no catastrophic backtracking."""
    hostile = ["a." * 32000, "a://" * 16000, "a://b:" * 11000, "x:" * 32000 + "@", "authorization:" * 5000,
               "sk-" * 20000, "Bearer " * 9000, "?key=" * 12000, "-" * 64000]
    for text in hostile:
        t0 = time.perf_counter()
        scrub(text)
        assert time.perf_counter() - t0 < 0.5, text[:20]


def test_key_tpm_refund_lapses_with_its_charge():
    """A long request that used less than charged gets the difference back in the second it was charged,
    never later (a late refund would outlive the charge and lend the key extra tokens)."""
    from gateway.auth import KEY_TOK, ApiKey

    k = ApiKey("d", "id", "team", "sk-gw-x", tpm=10000)
    t0 = 1_000_000.0
    booked = k.admit(9000, 1, now=t0)
    k.settle(-8000, booked, now=t0 + 70)  # finished 70 s later: the charge already left the window
    assert all(b[KEY_TOK] >= 0 for b in k.usage.buckets.values())
    k.admit(9000, 1, now=t0 + 71)
    with pytest.raises(GatewayError):
        k.admit(2000, 1, now=t0 + 72)  # 11000 > 10000 within one minute
    k2 = ApiKey("d", "id", "team", "sk-gw-x", tpm=10000)
    booked = k2.admit(9000, 1, now=t0)
    k2.settle(-8000, booked, now=t0 + 5)  # refund in time: 1000 used
    k2.admit(9000, 1, now=t0 + 6)
