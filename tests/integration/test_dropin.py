"""Drop-in behaviour for existing apps (issue 12): headers both ways, bring-your-own-key, the translation policy
(translate, 400 naming the parameter, or drop-and-say when the pool opts in) and one rule for the response `model`
field, all through real gateways with the real openai/anthropic SDKs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from pydantic import ValidationError

from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.settings import Settings
from gateway.sim import SimConfig
from tests.conftest import free_port

USER = [{"role": "user", "content": "hi STOP_AFTER_3"}]


def oai(gw, key: str = "sk-test", **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, **kw)


def ant(gw, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-ant-test", max_retries=0, **kw)


class Recorder:
    """A hand-written Anthropic-wire upstream that records what reached it and answers like Anthropic does
    (request-id and anthropic-ratelimit-* headers)."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.bodies: list[dict] = []

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        body = await request.json()
        self.bodies.append(body)
        hdrs = {"request-id": "req_up_1", "anthropic-ratelimit-requests-remaining": "41", "x-internal": "no"}
        msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-real", "stop_reason": "end_turn",
               "stop_sequence": None, "content": [{"type": "text", "text": "ok"}], "usage": {"input_tokens": 3, "output_tokens": 1}}
        return web.json_response(msg, headers=hdrs)


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_post("/v1/messages", rec.messages)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield rec, f"http://127.0.0.1:{port}"
    await runner.cleanup()


# ------------------------------------------------------------------------------------------------------ headers
async def test_upstream_rate_limit_headers_reach_the_client(start_sims, start_gateway):
    sims = await start_sims({"h": SimConfig(name="h", mode="hosted", rpm=1000, tpm=1_000_000, ttft=0.01, tok_s=500)})
    fleet = FleetConfig(
        upstreams={"h": UpstreamConfig(base_url=sims.url("h") + "/v1", kind="hosted", rpm=1000, tpm=1_000_000)},
        models={"m": ModelConfig(upstreams=["h"])},
    )
    gw = await start_gateway(fleet)
    raw = await oai(gw).chat.completions.with_raw_response.create(model="m", messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
    async with oai(gw).chat.completions.with_streaming_response.create(model="m", messages=USER, stream=True) as r:
        assert r.headers["x-ratelimit-limit-tokens"] == "1000000"
        assert r.headers["x-upstream-request-id"]  # the upstream's own id, beside the gateway's x-request-id
        assert r.headers["x-request-id"] != r.headers["x-upstream-request-id"]
        [line async for line in r.iter_lines()]


async def test_client_headers_forwarded_by_allow_list_only(recorder, start_gateway):
    rec, url = recorder
    fleet = FleetConfig(
        upstreams={"c": UpstreamConfig(provider="anthropic", base_url=url, model="claude-real")},
        models={"claude": ModelConfig(upstreams=["c"])},
    )
    gw = await start_gateway(fleet)
    hdrs = {"anthropic-beta": "tools-2024-05-16", "anthropic-version": "2099-01-01", "x-custom": "nope", "traceparent":
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "Connection": "keep-alive, x-custom"}
    raw = await ant(gw, default_headers=hdrs).messages.with_raw_response.create(
        model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
    got = rec.headers[-1]
    assert got["anthropic-beta"] == "tools-2024-05-16"
    assert got["anthropic-version"] == "2099-01-01"  # the client's, not the pinned default
    assert got["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"  # same trace
    assert "x-custom" not in got
    assert "x-api-key" not in got and "authorization" not in got  # the client's key never goes upstream
    assert "sk-ant-test" not in json.dumps(got)
    # The upstream's request id and rate-limit state come back; its other headers do not.
    assert raw.headers["request-id"] == "req_up_1"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "41"
    assert "x-internal" not in raw.headers
    # The OpenAI SDK's organization/project headers are forwarded too (to an Anthropic upstream, translated).
    await oai(gw, organization="org-1", project="proj-1").chat.completions.create(model="claude", messages=USER)
    assert rec.headers[-1]["openai-organization"] == "org-1" and rec.headers[-1]["openai-project"] == "proj-1"
    assert rec.headers[-1]["anthropic-version"] == "2023-06-01"  # pinned when the client sends none


def test_forward_list_refuses_credentials_and_hop_by_hop():
    for bad in ("Authorization", "x-api-key", "connection", "transfer-encoding"):
        with pytest.raises(ValidationError, match="never forwarded"):
            Settings(forward_headers=["traceparent", bad])
    assert Settings(forward_headers=["X-Custom"]).forward_headers == ["x-custom"]


async def test_bring_your_own_key(start_sims, start_gateway):
    sims = await start_sims({"s": SimConfig(name="s", api_key="sk-users-own")})
    ups = {
        "byok": UpstreamConfig(base_url=sims.url("s") + "/v1", byok=True),
        "fixed": UpstreamConfig(base_url=sims.url("s") + "/v1"),
    }
    fleet = FleetConfig(upstreams=ups, models={"byok": ModelConfig(upstreams=["byok"]), "fixed": ModelConfig(upstreams=["fixed"])})
    gw = await start_gateway(fleet)
    r = await oai(gw, key="sk-users-own").chat.completions.create(model="byok", messages=USER)
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.APIStatusError) as e:  # off by default: the client's key is not used
        await oai(gw, key="sk-users-own").chat.completions.create(model="fixed", messages=USER)
    assert e.value.status_code == 502 and "sk-users-own" not in json.dumps(e.value.body)
    # With gateway API keys required, the upstream key comes in x-upstream-api-key.
    gw2 = await start_gateway(fleet, require_api_key=True, admin_key="adm-secret", redis_prefix=f"t{free_port()}")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw2.url + "/admin/keys", json={"name": "k"}, headers={"Authorization": "Bearer adm-secret"}) as resp:
            assert resp.status in (200, 201), await resp.text()
            key = (await resp.json())["key"]
    c = oai(gw2, key=key, default_headers={"x-upstream-api-key": "sk-users-own"})
    assert (await c.chat.completions.create(model="byok", messages=USER)).usage.completion_tokens == 3


async def test_x_request_id_on_every_path(gateway):
    paths = [
        ("/v1/chat/completions", {"model": "fleet-model", "messages": USER}),
        ("/v1/chat/completions", {"model": "fleet-model", "messages": USER, "stream": True}),
        ("/v1/completions", {"model": "fleet-model", "prompt": "hi STOP_AFTER_2"}),
        ("/v1/messages", {"model": "fleet-model", "max_tokens": 5, "messages": USER}),
        ("/v1/messages", {"model": "fleet-model", "max_tokens": 5, "messages": USER, "stream": True}),
        ("/v1/responses", {"model": "fleet-model", "input": "hi STOP_AFTER_2"}),
        ("/v1/responses", {"model": "fleet-model", "input": "hi STOP_AFTER_2", "stream": True}),
        ("/v1/responses", {"model": "no-such-model", "input": "x"}),  # 404
        ("/v1/messages", {"model": "fleet-model", "messages": []}),  # 400
        ("/v1/nope", {}),  # 404 route
    ]
    async with aiohttp.ClientSession() as s:
        for i, (path, body) in enumerate(paths):
            async with s.post(gateway.url + path, json=body, headers={"x-request-id": f"mine-{i}"}) as r:
                await r.read()
                assert r.headers.get("x-request-id") == f"mine-{i}", (path, r.status)
            async with s.post(gateway.url + path, json=body) as r:
                await r.read()
                assert len(r.headers.get("x-request-id", "")) >= 16, (path, r.status)
        async with s.get(gateway.url + "/v1/models") as r:
            assert r.headers.get("x-request-id")


# ------------------------------------------------------------------------------------------ translation policy
async def _policy_gateway(start_sims, start_gateway, drop: bool):
    sims = await start_sims({"an": SimConfig(name="an"), "oa": SimConfig(name="oa")})
    fleet = FleetConfig(
        upstreams={
            "an": UpstreamConfig(provider="anthropic", base_url=sims.url("an"), model="claude-up"),
            "oa": UpstreamConfig(base_url=sims.url("oa") + "/v1", model="llama-up"),
        },
        models={
            "claude": ModelConfig(upstreams=["an"], drop_unsupported_params=drop),
            "llama": ModelConfig(upstreams=["oa"], drop_unsupported_params=drop, aliases=["claude-alias"]),
        },
    )
    return await start_gateway(fleet)


async def test_unsupported_parameters_get_a_400_naming_them(start_sims, start_gateway):
    gw = await _policy_gateway(start_sims, start_gateway, drop=False)
    for extra, name in (({"seed": 7}, "seed"), ({"n": 2}, "n"), ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"logprobs": True}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            await oai(gw).chat.completions.create(model="claude", messages=USER, **extra)
        assert e.value.body["param"] == name and name in e.value.body["message"]
        assert e.value.body["code"] == "unsupported_parameter"
    # Defaults ask for nothing special and pass; top_k is translated.
    r = await oai(gw).chat.completions.create(model="claude", messages=USER, n=1, extra_body={"top_k": 5})
    assert r.usage.completion_tokens == 3
    # Anthropic client, OpenAI-compatible upstream: `thinking` has no equivalent.
    with pytest.raises(anthropic.BadRequestError) as ae:
        await ant(gw).messages.create(model="llama", max_tokens=50, messages=USER, thinking={"type": "enabled", "budget_tokens": 20})
    assert "thinking" in ae.value.body["error"]["message"] and ae.value.body["type"] == "error"
    m = await ant(gw).messages.create(model="llama", max_tokens=50, messages=USER, thinking={"type": "disabled"})
    assert m.usage.output_tokens == 3
    # The same Anthropic request to an Anthropic upstream is relayed as is: thinking is honoured there.
    m = await ant(gw).messages.create(model="claude", max_tokens=50, messages=USER, thinking={"type": "enabled", "budget_tokens": 20})
    assert m.stop_reason == "end_turn"


async def test_pool_opt_in_drops_and_says_so(start_sims, start_gateway):
    gw = await _policy_gateway(start_sims, start_gateway, drop=True)
    raw = await oai(gw).chat.completions.with_raw_response.create(model="claude", messages=USER, seed=7, n=1)
    assert raw.headers["x-gateway-dropped-params"] == "seed"
    assert raw.parse().usage.completion_tokens == 3
    async with oai(gw).chat.completions.with_streaming_response.create(
        model="claude", messages=USER, stream=True, seed=1, response_format={"type": "json_object"}
    ) as r:
        assert set(r.headers["x-gateway-dropped-params"].split(",")) == {"seed", "response_format"}
        [line async for line in r.iter_lines()]
    raw = await ant(gw).messages.with_raw_response.create(
        model="llama", max_tokens=50, messages=USER, thinking={"type": "enabled", "budget_tokens": 20}
    )
    assert raw.headers["x-gateway-dropped-params"] == "thinking"
    clean = await oai(gw).chat.completions.with_raw_response.create(model="claude", messages=USER)
    assert "x-gateway-dropped-params" not in clean.headers


# ---------------------------------------------------------------------------------------- response model field
async def test_response_model_is_the_serving_models_name_on_every_path(start_sims, start_gateway):
    """README rule: `model` in a response is the name of the model that served it, as its upstream names it
    (the upstream config's `model`, or the client's name when none is configured), on every path."""
    gw = await _policy_gateway(start_sims, start_gateway, drop=False)
    c, a = oai(gw), ant(gw)
    for client_name, served in (("claude", "claude-up"), ("claude-alias", "llama-up")):
        r = await c.chat.completions.create(model=client_name, messages=USER)
        assert r.model == served
        chunks = [ch async for ch in await c.chat.completions.create(model=client_name, messages=USER, stream=True)]
        assert {ch.model for ch in chunks} == {served}
        m = await a.messages.create(model=client_name, max_tokens=20, messages=USER)
        assert m.model == served
        async with a.messages.stream(model=client_name, max_tokens=20, messages=USER) as st:
            assert (await st.get_final_message()).model == served
        resp = await c.responses.create(model=client_name, input="hi STOP_AFTER_2")
        assert resp.model == served
        events = [e async for e in await c.responses.create(model=client_name, input="hi STOP_AFTER_2", stream=True)]
        assert events[0].response.model == served and events[-1].response.model == served


async def test_gateway_key_429_carries_rate_limit_headers(sim_fleet, start_gateway, redis_prefix):
    gw = await start_gateway(sim_fleet.config(), require_api_key=True, admin_key="adm-secret", redis_prefix=redis_prefix)
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/admin/keys", json={"name": "k", "rpm": 1}, headers={"Authorization": "Bearer adm-secret"}) as r:
            key = (await r.json())["key"]
    c = oai(gw, key=key)
    await c.chat.completions.create(model="fleet-model", messages=USER)
    with pytest.raises(openai.RateLimitError) as e:
        await c.chat.completions.create(model="fleet-model", messages=USER)
    h = e.value.response.headers
    assert h["x-ratelimit-limit-requests"] == "1" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["x-ratelimit-reset-requests"].endswith("s") and int(h["Retry-After"]) >= 1
    assert h["x-request-id"]
