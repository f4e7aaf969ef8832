"""The whole request path without sockets: routing, retry after a failing upstream, measurement and spans, through
the proxy with a scripted fake transport and the in-process writer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.dialects.sse import Event
from gateway.errors import GatewayError, UpstreamConnectError, UpstreamRejected, UpstreamStatusError
from gateway.hooks import Hooks
from gateway.http.validation import build_context, validate
from gateway.observability.subscribers import Metrics, Tracing
from gateway.observability.telemetry import Telemetry
from gateway.proxy import Proxy
from gateway.reliability.outlier import OutlierDetector
from gateway.reliability.verdicts import Verdicts
from gateway.routing.router import Router
from gateway.settings import Settings
from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.state.fleet import Fleet
from gateway.state.measure import Measurement
from gateway.state.upstream_rates import ERR, OUT
from gateway.upstream.base import StreamDecoder
from gateway.upstream.client import Frame, Timeouts
from gateway.writers import InProcessWriter

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]
    c: dict = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": choices}
    if usage:
        c["usage"] = usage
    return c


@dataclass
class FakeReply:
    """A scripted 2xx reply: a whole body, or stream chunks (an exception among them breaks the stream there)."""

    body_json: dict | None = None
    chunks: list = field(default_factory=list)
    status: int = 200
    headers: dict = field(default_factory=dict)
    terminated: bool = False
    closed: bool | None = None

    async def body(self, deadline: float) -> tuple[bytes, dict]:
        assert self.body_json is not None
        return json.dumps(self.body_json).encode(), self.body_json

    async def frames(self, decoder: StreamDecoder, t: Timeouts) -> AsyncIterator[Frame]:
        for c in self.chunks:
            if isinstance(c, Exception):
                raise c
            data = json.dumps(c).encode()
            ev = Event(b"data: " + data + b"\n\n", None, data)
            yield Frame(ev, decoder.feed(ev))
        self.terminated = True

    def close(self, clean: bool) -> None:
        self.closed = clean


class FakeTransport:
    """Answers the n-th POST with script[n]: a FakeReply, or an UpstreamError to raise."""

    def __init__(self, *script: FakeReply | Exception) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, dict, Mapping[str, str]]] = []

    async def send(self, name: str, url: str, data: bytes, headers: Mapping[str, str], limit: float) -> FakeReply:
        step = self.script[len(self.calls)]
        self.calls.append((name, json.loads(data), dict(headers)))
        if isinstance(step, Exception):
            raise step
        return step


@dataclass
class Rig:
    proxy: Proxy
    fleet: Fleet
    transport: FakeTransport
    spans: InMemorySpanExporter
    tel: Telemetry


def rig(transport: FakeTransport) -> Rig:
    settings = Settings(replica_id="unit", max_attempts=3, retry_budget_min=10)
    fleet = Fleet(reference_fleet(DEMO_PORTS), "throughput")
    detector = OutlierDetector(3, 1.0, 10.0)
    router = Router(fleet, detector, queue_max=4, queue_timeout=0.3)
    spans = InMemorySpanExporter()
    tel = Telemetry(span_exporter=spans)
    from gateway.sync.fleet_sync import FleetSync

    sync = FleetSync(fleet, "unit")  # no Redis URL: in-process only, nothing connects
    hooks = Hooks()
    for sub in (Measurement(), Verdicts(detector, sync), Tracing(tel), Metrics(tel)):
        hooks.subscribe(sub)
    return Rig(Proxy(settings, fleet, router, transport, hooks), fleet, transport, spans, tel)


def request(stream: bool, **extra) -> dict:
    body = {"model": "fleet-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": stream}
    body.update(extra)
    validate("chat", body)
    return body


def finished_spans(r: Rig) -> dict[str, list]:
    assert r.tel.tracer_provider is not None
    r.tel.tracer_provider.force_flush()
    out: dict[str, list] = {}
    for s in r.spans.get_finished_spans():
        out.setdefault(s.kind.name, []).append(s)
    return out


async def test_retry_after_failing_upstream_then_measured_and_traced() -> None:
    ok = {"id": "r1", "object": "chat.completion", "model": "m", "usage": USAGE,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}]}
    r = rig(FakeTransport(UpstreamConnectError("upstream down", code="upstream_connect_error"), FakeReply(body_json=ok)))
    ctx = build_context("chat", request(stream=False), path="/v1/chat/completions")
    w = InProcessWriter()
    await r.proxy.handle(ctx, w)

    assert w.status == 200 and w.json()["choices"][0]["message"]["content"] == "hi there"
    first, second = (c[0] for c in r.transport.calls)
    assert first != second, "the retry must go to another upstream"
    assert ctx.upstream == second and ctx.status == 200
    assert (ctx.usage.input_tokens, ctx.usage.output_tokens) == (12, 5)
    ups = r.fleet.upstreams
    assert ups[first].rates.mine.sum(ERR, 0) == 1 and ups[second].rates.mine.sum(OUT, 0) == 5
    assert all(u.inflight_local == 0 for u in ups.values()), "every slot is released"
    # Each attempt was told its upstream's traceparent; spans: one server, two clients, the retry visible.
    assert all("traceparent" in c[2] for c in r.transport.calls)
    spans = finished_spans(r)
    (server,) = spans["SERVER"]
    assert server.attributes["gateway.upstream.name"] == second
    assert server.attributes["gateway.retry.count"] == 1
    assert server.attributes["gen_ai.usage.output_tokens"] == 5
    clients = sorted(spans["CLIENT"], key=lambda s: s.attributes["gateway.attempt"])
    assert [c.attributes["gateway.upstream.name"] for c in clients] == [first, second]
    assert clients[0].attributes["error.type"] == "upstream_connect_error"
    await r.tel.shutdown()


async def test_stream_relayed_in_dialect_with_usage_dropped_when_not_asked() -> None:
    reply = FakeReply(chunks=[chunk("Hel"), chunk("lo"), chunk(finish="stop"), chunk(usage=USAGE)])
    r = rig(FakeTransport(reply))
    ctx = build_context("chat", request(stream=True))
    w = InProcessWriter()
    await r.proxy.handle(ctx, w)
    frames = [e for e in w.body.split(b"\n\n") if e]
    assert frames[-1] == b"data: [DONE]"
    (perf,) = [f for f in frames if f.startswith(b":")]  # the client's own speed, as an SSE comment
    assert f"upstream={ctx.upstream} class=interactive ttft_ms=".encode() in perf and b" tok_s=" in perf
    assert w.headers["x-gateway-class"] == "interactive" and w.headers["x-gateway-upstream"] == ctx.upstream
    payloads = [json.loads(e[6:]) for e in frames[:-1] if e.startswith(b"data: ")]
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads if p["choices"]) == "Hello"
    assert not any("usage" in p for p in payloads), "the client did not ask for usage"
    assert r.transport.calls[0][1]["stream_options"] == {"include_usage": True}, "the gateway asks upstream for it"
    assert ctx.usage.output_tokens == 5 and reply.closed is True
    await r.tel.shutdown()


async def test_failure_after_first_byte_ends_stream_in_band_without_retry() -> None:
    broken = FakeReply(chunks=[chunk("partial"), UpstreamStatusError("upstream x: boom", code="upstream_stream_error")])
    r = rig(FakeTransport(broken, FakeReply(chunks=[chunk("never")])))
    ctx = build_context("chat", request(stream=True))
    w = InProcessWriter()
    await r.proxy.handle(ctx, w)
    assert len(r.transport.calls) == 1, "no retry once bytes reached the client"
    last = json.loads(w.body.split(b"\n\n")[-2][6:])
    assert last["error"]["code"] == "upstream_stream_error" and w.complete
    assert broken.closed is False, "a half-read upstream connection is closed, not reused"
    await r.tel.shutdown()


async def test_unknown_model_and_non_retryable_rejection_reach_the_caller() -> None:
    r = rig(FakeTransport())
    ctx = build_context("chat", request(stream=False, model="nope"))
    with pytest.raises(GatewayError) as e:
        await r.proxy.handle(ctx, InProcessWriter())
    assert e.value.status == 404 and e.value.code == "model_not_found"
    r = rig(FakeTransport(UpstreamRejected("context too long", code="upstream_rejected", status=400), FakeReply()))
    with pytest.raises(GatewayError) as e:
        await r.proxy.handle(build_context("chat", request(stream=False)), InProcessWriter())
    assert e.value.status == 400 and len(r.transport.calls) == 1, "the client's own fault is not retried"
    await r.tel.shutdown()


def test_spans_carry_the_upstreams_own_response_id() -> None:
    """Anthropic's msg_ id, not the chatcmpl- form the canonical chunks carry, and never an id the gateway made up."""
    from gateway.hooks import Attempt
    from gateway.observability.subscribers import _upstream_id
    from gateway.routing.router import Decision

    fleet = Fleet(reference_fleet(DEMO_PORTS), "throughput")
    u = fleet.upstreams["hosted"]
    a = Attempt(1, Decision(u, "throughput", ""), None)  # type: ignore[arg-type]
    assert _upstream_id(a, "chatcmpl-abc") == "chatcmpl-abc"  # an OpenAI-compatible upstream's own id
    u.cfg = u.cfg.model_copy(update={"provider": "anthropic"})
    assert _upstream_id(a, "chatcmpl-msg_01XY") == "msg_01XY"
    assert _upstream_id(a, "chatcmpl-3f2a9c") is None  # the upstream gave none: no synthesized id on spans
