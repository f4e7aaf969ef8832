"""Ops-facing HTTP behaviour: /v1/messages/count_tokens, Anthropic-shaped errors on every /v1/messages* error,
the Prometheus exposition (content type, request-level and attempt-level counters, attempt durations)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import CapacityHint, FleetConfig, ModelConfig, UpstreamConfig
from gateway.sim import SimConfig


def aclient(gw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-ant-test", max_retries=0)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    found = [v for n, lbl, v in samples(text) if n == name and all(lbl.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


async def scrape(gw) -> tuple[str, str]:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


async def test_count_tokens_with_the_anthropic_sdk(gateway):
    c = aclient(gateway)
    short = await c.messages.count_tokens(model="claude-fleet", messages=[{"role": "user", "content": "hello"}])
    long = await c.messages.count_tokens(
        model="fleet-model", system="be brief", messages=[{"role": "user", "content": "hello " * 200}]
    )
    assert 0 < short.input_tokens < 20
    assert long.input_tokens > short.input_tokens + 190
    tools = [{"name": "weather", "description": "the weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    with_tools = await c.messages.count_tokens(model="fleet-model", tools=tools, messages=[{"role": "user", "content": "hello"}])
    assert with_tools.input_tokens > short.input_tokens + 10
    with pytest.raises(anthropic.NotFoundError) as e:
        await c.messages.count_tokens(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error", "message": "model: no-such-model"}}
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.count_tokens(model="fleet-model", messages=[])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("POST", "/v1/messages/nope", 404, "not_found_error"),
        ("GET", "/v1/messages", 405, "invalid_request_error"),
        ("GET", "/v1/messages/count_tokens", 405, "invalid_request_error"),
        ("POST", "/v1/messages/count_tokens", 400, "invalid_request_error"),  # empty body
    ],
)
async def test_anthropic_path_errors_are_anthropic_shaped(gateway, method, path, status, kind):
    async with aiohttp.ClientSession() as s, s.request(method, gateway.url + path) as r:
        assert r.status == status
        body = await r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    assert set(body) == {"type", "error"}


async def test_anthropic_path_401_is_anthropic_shaped(sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config(), require_api_key=True)
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        async with aiohttp.ClientSession() as s, s.post(gw.url + path, json={}) as r:
            assert r.status == 401
            body = await r.json()
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/v1/chat/completions", json={}) as r:
        assert (await r.json())["error"]["type"] == "authentication_error"  # the OpenAI shape elsewhere


async def test_metrics_content_type_and_request_level_counters(sim_fleet, start_gateway):
    gw = await start_gateway(sim_fleet.config())
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    for _ in range(2):
        await c.chat.completions.create(model="fleet-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        await c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        await c.chat.completions.create(model="fleet-model", messages=[])
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", data=b"{not json") as r:
            assert r.status == 400
        async with s.get(gw.url + "/v1/nowhere") as r:
            assert r.status == 404
    ctype, text = await scrape(gw)
    assert ctype == CONTENT_TYPE_LATEST
    route = "/v1/chat/completions"
    assert value(text, "gateway_requests_total", route=route, model="fleet-model", code="200") == 2
    assert value(text, "gateway_requests_total", route=route, model="", code="404") == 1  # raw name never a label
    assert value(text, "gateway_requests_total", route=route, model="fleet-model", code="400") == 1
    assert value(text, "gateway_requests_total", route=route, model="", code="400") == 1
    assert value(text, "gateway_requests_total", route="unmatched", code="404") == 1
    assert not [lbl for n, lbl, _ in samples(text) if n == "gateway_requests_total" and lbl["code"] == "error"]
    # attempt-level beside it: only the two routed requests reached an upstream
    attempts = sum(v for n, lbl, v in samples(text) if n == "gateway_upstream_attempts_total")
    assert attempts == 2


async def test_attempt_status_and_duration_from_the_attempt_start(start_sims, start_upstream, start_gateway):
    delay = 0.8

    async def slow_500(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response({"error": {"message": "boom"}}, status=500)

    sims = await start_sims({"good": SimConfig(name="good")})
    fleet = FleetConfig(
        upstreams={
            # The broken one looks faster, so the router tries it first.
            "broken": UpstreamConfig(base_url=await start_upstream(slow_500), model="m-broken", capacity=CapacityHint(a=0.001)),
            "good": UpstreamConfig(base_url=sims.url("good") + "/v1", model="m-good", capacity=CapacityHint(a=0.01)),
        },
        models={"m": ModelConfig(upstreams=["broken", "good"])},
    )
    gw = await start_gateway(fleet)
    c = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    t0 = time.monotonic()
    await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert time.monotonic() - t0 >= delay
    await asyncio.sleep(0.05)  # metrics are recorded just after the response went out
    _, text = await scrape(gw)
    assert value(text, "gateway_upstream_attempts_total", upstream="broken", code="500") == 1
    assert value(text, "gateway_upstream_attempts_total", upstream="good", code="200") == 1
    assert value(text, "gateway_requests_total", model="m", code="200") == 1
    dur = "gen_ai_client_operation_duration_seconds"
    assert value(text, f"{dur}_sum", error_type="upstream_500") >= delay
    ok = [v for n, lbl, v in samples(text) if n == f"{dur}_sum" and "error_type" not in lbl]
    assert len(ok) == 1 and ok[0] < delay / 2  # the good attempt is timed from its own start


async def test_requests_refused_before_routing_are_counted_401_and_429(sim_fleet, start_gateway):
    admin = {"Authorization": "Bearer ops-admin-key-123"}
    gw = await start_gateway(sim_fleet.config(), require_api_key=True, admin_key="ops-admin-key-123")
    body = {"model": "fleet-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/admin/keys", json={"name": "ops", "rpm": 1}, headers=admin) as r:
            assert r.status == 201
            key = (await r.json())["key"]
        statuses = []
        for h in ({}, {"Authorization": f"Bearer {key}"}, {"Authorization": f"Bearer {key}"}):
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers=h) as r:
                statuses.append(r.status)
    assert statuses == [401, 200, 429]
    _, text = await scrape(gw)
    route = "/v1/chat/completions"
    assert value(text, "gateway_requests_total", route=route, model="", code="401") == 1  # before the body is read
    assert value(text, "gateway_requests_total", route=route, model="fleet-model", code="200") == 1
    assert value(text, "gateway_requests_total", route=route, model="fleet-model", code="429") == 1
    assert not [lbl for n, lbl, _ in samples(text) if n == "gateway_requests_total" and lbl["route"].startswith("/admin")]
