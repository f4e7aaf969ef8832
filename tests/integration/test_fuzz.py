"""Property-based fuzzing of the inbound API with hypothesis against one real gateway (and simulators).

Every answer to garbage must be a 4xx with an error body in the endpoint's shape (OpenAI; Anthropic for
/v1/messages), valid requests a complete 2xx; never a 5xx, never a hang (10 s client timeout). The gateway runs
on its own event loop in a background thread so hypothesis can drive it synchronously; examples are bounded.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.http.app import create_app
from gateway.http.protocol import GatewayRunner
from gateway.settings import Settings
from gateway.sim import SimConfig, start_sim
from tests.conftest import free_port

EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages")
MODELS = ("fleet-model", "claude-pool", "nope", "", "fleet-model ", "ﬂeet-model")


@dataclass
class Live:
    url: str
    run: Callable[..., Any]
    session: aiohttp.ClientSession


@pytest.fixture(scope="module")
def live():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-loop", daemon=True)
    thread.start()

    def run(coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    state: dict[str, Any] = {}

    async def setup() -> Live:
        runners = []
        ports = {}
        for name, mode in (("g1", "gpu"), ("g2", "gpu"), ("an", "gpu")):
            r, p = await start_sim(SimConfig(name=name, mode=mode, base_step=0.001, per_seq=0.0, default_max_tokens=8), "127.0.0.1", 0)
            runners.append(r)
            ports[name] = p
        fleet = FleetConfig(
            upstreams={
                "g1": UpstreamConfig(base_url=f"http://127.0.0.1:{ports['g1']}/v1"),
                "g2": UpstreamConfig(base_url=f"http://127.0.0.1:{ports['g2']}/v1"),
                "an": UpstreamConfig(provider="anthropic", base_url=f"http://127.0.0.1:{ports['an']}/v1", model="claude-x"),
            },
            models={"fleet-model": ModelConfig(upstreams=["g1", "g2"], aliases=["gpt-4o-mini"]),
                    "claude-pool": ModelConfig(upstreams=["an"])},
        )
        app = create_app(Settings(replica_id="fuzz", max_body_bytes=256 * 1024, queue_timeout=5.0), fleet)
        runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.insert(0, runner)
        state["runners"] = runners
        state["app"] = app
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        state["session"] = session
        return Live(f"http://127.0.0.1:{port}", run, session)

    lv = run(setup())
    yield lv

    async def teardown() -> None:
        await state["session"].close()
        for r in state["runners"]:
            await r.cleanup()

    run(teardown())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


# ---- strategies -------------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["STOP_AFTER_2", "CALL_TOOL", "\ud800", "\x00", "💥" * 5, "a" * 3000])
)
json_values = st.recursive(
    scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=15
)
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "tool_result"]) | json_values},
                          optional={"text": st.text(max_size=20) | json_values, "image_url": json_values}),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | json_values},
        optional={"content": st.text(max_size=30) | content_parts | json_values, "tool_calls": json_values,
                  "name": json_values, "tool_call_id": json_values},
    )
    | json_values,
    max_size=4,
)
KEYS = ["model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens", "stream", "stream_options",
        "temperature", "top_p", "tools", "tool_choice", "n", "stop", "system", "metadata", "encoding_format", "user",
        "stop_sequences", "logprobs", "dimensions"]
overrides = st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=10),
    json_values | messages | st.sampled_from(MODELS) | st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 1.5, "4", True])
    | st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4),
    max_size=4,
)


def base(path: str, model: str, stream: bool) -> dict:
    if path == "/v1/completions":
        b = {"model": model, "prompt": "STOP_AFTER_2", "max_tokens": 4}
    elif path == "/v1/embeddings":
        b = {"model": model, "input": "hello"}
    elif path == "/v1/messages":
        b = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "STOP_AFTER_2"}]}
    else:
        b = {"model": model, "messages": [{"role": "user", "content": "STOP_AFTER_2"}], "max_tokens": 4}
    if stream:
        b["stream"] = True
    return b


def bounded(body: Any) -> Any:
    """Keep valid generations short: the simulator would honour a max_tokens of a million."""
    if isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and 64 < v < 2**31:
                body[k] = 64
    return body


garbage = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([
        b"", b"null", b"[]", b"0", b'"x"', b"{", b'{"model": NaN}', b'{"model": "fleet-model", "max_tokens": Infinity}',
        b'{"a":' * 5000 + b"1" + b"}" * 5000, b"[" * 100000 + b"]" * 100000, b"\xff\xfe\x00{}", b"{}" * 1000,
        b'{"model":"fleet-model","messages":[{"role":"user","content":"x"}],"model":7}',
        b'{"model":"fleet-model","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":2}',
        b'{"model":"fleet-model","max_tokens":1' + b"0" * 5000 + b"}",
    ]),
)


# ---- the oracle -------------------------------------------------------------------------------------------------
async def _post(lv: Live, path: str, data: bytes, headers: dict | None = None) -> tuple[int, str, str]:
    async with lv.session.post(lv.url + path, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text(errors="replace")


def check(lv: Live, path: str, data: bytes) -> None:
    status, ctype, text = lv.run(_post(lv, path, data), timeout=15)
    assert status < 500, (status, text[:500], data[:300])
    if status >= 400:
        err = json.loads(text)
        if path == "/v1/messages":
            assert err["type"] == "error" and isinstance(err["error"]["type"], str) and isinstance(err["error"]["message"], str)
        else:
            e = err["error"]
            assert isinstance(e["message"], str) and e["message"] and isinstance(e["type"], str) and "code" in e, err
        return
    assert 200 <= status < 300, status
    if ctype.startswith("text/event-stream"):
        assert '"error"' not in text or "message_stop" in text, text[-500:]
        assert text.endswith("data: [DONE]\n\n") or "event: message_stop" in text, text[-300:]
    else:
        json.loads(text)


def encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=False).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_fuzz_json_bodies(live, path):
    @FUZZ
    @given(model=st.sampled_from(MODELS), stream=st.booleans(), extra=overrides)
    def run(model, stream, extra):
        body = bounded({**base(path, model, stream), **extra})
        check(live, path, encode(body))

    run()


@pytest.mark.parametrize("path", ENDPOINTS)
def test_fuzz_any_json_value(live, path):
    @settings(FUZZ, max_examples=EXAMPLES // 3)
    @given(value=json_values)
    def run(value):
        check(live, path, encode(bounded(value)))

    run()


def test_fuzz_garbage_bytes(live):
    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(path=st.sampled_from(ENDPOINTS), data=garbage)
    def run(path, data):
        check(live, path, data)

    run()


def test_gateway_still_healthy_after_fuzzing(live):
    """Nothing the fuzzers sent counted against the upstreams (no ejection from poison requests)."""
    for path in ENDPOINTS:
        model = "claude-pool" if path == "/v1/messages" else "fleet-model"
        check(live, path, encode(base(path, model, False)))

    async def view() -> dict:
        async with live.session.get(live.url + "/v1/gateway/upstreams") as r:
            return await r.json()

    ups = live.run(view())["upstreams"]
    assert all(u["state"] == "healthy" and u["ejections"] == 0 for u in ups), ups
