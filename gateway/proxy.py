"""The request path: admit -> send to the chosen upstream -> relay -> record. Retries live here.

A request is retried on another upstream (within the attempt limit and the retry budget) on connect errors,
timeouts, 429 and 5xx, but only before its first byte reached the client. Every attempt gets its own client span.

Timeouts: connect (settings.connect_timeout); streams: time to first token (ttft_timeout, from the start of the
attempt to the first content) and idle between chunks (idle_timeout); every attempt: total (the upstream's
`timeout` or total_timeout). A non-streamed response only arrives when generation is done, so it is bounded by
the total timeout alone. A 429 (or 503 with Retry-After) puts the upstream in cooldown for Retry-After seconds;
when every upstream of a pool is cooling down or ejected for longer than the queue timeout the client gets a 429
(or 503) with Retry-After at once instead of waiting. After the first byte there is no retry: the client gets an
in-band SSE error event and a clean end of stream, and the upstream connection is closed (its slot freed).
Upstream error text is scrubbed of secrets before it reaches the client, the logs or a span.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.cost import Tokens
from gateway.dialects.anthropic_wire import UpstreamStreamError, chat_response_to_messages
from gateway.dialects.client_stream import AnthropicClientStream, OpenAIClientStream
from gateway.dialects.sse import SSEDecoder
from gateway.errors import GatewayError
from gateway.observability import telemetry as T
from gateway.observability.redact import scrub
from gateway.reliability.outlier import OutlierDetector
from gateway.reliability.retry_budget import RetryBudget
from gateway.routing.router import Decision, Estimate, Router
from gateway.settings import Settings
from gateway.state.fleet import Fleet, Pool
from gateway.state.measure import PROGRESS_SAMPLE_EVERY, Outcome, finish, mean_load, observe_body, observe_chunk, progress_sample
from gateway.state.stats import UpstreamStats
from gateway.sync.fleet_sync import FleetSync
from gateway.tokens import max_output_tokens
from gateway.upstream import provider_for

log = logging.getLogger("gateway.proxy")

_RETRYABLE_STATUS = {401, 403, 404, 408, 409, 429, 500, 502, 503, 504, 529}
_MAX_ERROR_BODY = 64 * 1024
STREAMING = web.RequestKey("gw_streaming", bool)  # response headers went out: errors must go in-band
_MAX_RETRY_AFTER = 300.0  # an upstream cannot park itself (or be parked) for longer than this per 429


@dataclass(slots=True)
class Exchange:
    """One client request, parsed once."""

    operation: str  # chat | text_completion | embeddings
    model: str
    body: dict
    stream: bool
    include_usage: bool
    dialect: str  # openai | anthropic
    est: Estimate
    headers: Any  # the client's request headers (for traceparent)
    native: dict | None = None  # the client's own body when it is not in the canonical (OpenAI) dialect
    principal: Any = None  # the gateway API key (auth.ApiKey) when keys are required
    used_tokens: int = 0  # prompt + output tokens really used (for the key's TPM settlement)
    # Spend accounting (gateway/http/api.py): the last attempt's upstream and usage; 0 tokens = nothing to charge.
    upstream: str | None = None
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class AttemptFailure(Exception):
    """An attempt failed before anything reached the client; `status` is what the client would get."""

    status: int
    message: str
    error_type: str
    retry_after: float | None = None
    rate_limited: bool = False


class Proxy:
    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        router: Router,
        health: OutlierDetector,
        sync: FleetSync,
        telemetry: T.Telemetry,
    ) -> None:
        self.s = settings
        self.fleet = fleet
        self.router = router
        self.health = health
        self.sync = sync
        self.tel = telemetry
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min)
        self.session: aiohttp.ClientSession | None = None
        self.active: set[asyncio.Task] = set()
        #: Set when the shutdown grace ran out: requests still running are cancelled and end with an error.
        self.stopping = False

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=conn,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.s.connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def stop(self) -> None:
        if self.session:
            await self.session.close()

    # ---- entry ---------------------------------------------------------------------------------------------------
    async def handle(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        pool = self.fleet.pool(ex.model)
        if pool is None:
            raise GatewayError(404, f"The model '{ex.model}' does not exist", code="model_not_found", param="model")
        if not any(ex.operation in u.operations for u in pool.upstreams):
            raise GatewayError(
                400, f"The model '{ex.model}' does not support {ex.operation.replace('_', ' ')}",
                code="unsupported_operation", param="model",
            )
        task = asyncio.current_task()
        ctx = self.tel.extract(ex.headers)
        started = time.monotonic()
        with self.tel.tracer.start_as_current_span(
            f"{ex.operation} {ex.model}", context=ctx, kind=SpanKind.SERVER, end_on_exit=True
        ) as span:
            span.set_attribute(T.ATTR_GEN_AI_OPERATION_NAME, ex.operation)
            span.set_attribute(T.ATTR_GEN_AI_REQUEST_MODEL, ex.model)
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("url.path", request.path)
            mt = max_output_tokens(ex.body)
            if mt is not None:
                span.set_attribute(T.ATTR_GEN_AI_REQUEST_MAX_TOKENS, mt)
            if self.tel.capture_content and "messages" in ex.body:
                span.set_attribute(T.ATTR_GEN_AI_INPUT_MESSAGES, T.input_messages_json(ex.body["messages"]))
            if task:
                self.active.add(task)
            try:
                try:
                    resp = await self._attempts(request, ex, pool, span, started)
                except asyncio.CancelledError:
                    if self.stopping and task is not None and not request.get(STREAMING):
                        # Past the shutdown grace: answer 503 instead of dropping the connection.
                        task.uncancel()
                        raise GatewayError(503, "the gateway is shutting down; retry the request", code="shutting_down", retry_after=1) from None
                    raise
                span.set_attribute("http.response.status_code", resp.status)
                return resp
            except GatewayError as e:
                span.set_attribute("http.response.status_code", e.status)
                span.set_attribute(T.ATTR_ERROR_TYPE, str(e.status))
                span.set_status(Status(StatusCode.ERROR, e.message))
                raise
            finally:
                if task:
                    self.active.discard(task)

    async def _attempts(
        self, request: web.Request, ex: Exchange, pool: Pool, span: trace.Span, started: float
    ) -> web.StreamResponse:
        self.budget.request()
        tried: set[str] = set()
        last: AttemptFailure | None = None
        for attempt in range(1, self.s.max_attempts + 1):
            if attempt > 1 and not self.budget.try_spend():
                span.add_event("retry budget exhausted")
                break
            try:
                d = await self.router.admit(pool, ex.est, frozenset(tried))
            except GatewayError as e:
                if last is None:
                    raise
                if last.status in (429, 503) and e.retry_after:
                    last.retry_after = max(last.retry_after or 0.0, e.retry_after)
                break  # nowhere left to retry: report the upstream failure
            tried.add(d.upstream.name)
            if span.is_recording():  # the attributes cost more than the decision when nobody looks
                if attempt == 1:
                    span.set_attribute(T.ATTR_ROUTE_STRATEGY, d.strategy)
                    span.set_attribute(T.ATTR_QUEUE_WAIT_MS, round(d.queue_wait * 1000, 2))
                span.set_attribute(T.ATTR_UPSTREAM, d.upstream.name)
                span.set_attribute(T.ATTR_ROUTE_REASON, d.reason)
                span.set_attribute(T.ATTR_ROUTE_CANDIDATES, json.dumps({k: round(v, 3) for k, v in d.scores.items()}))
                span.set_attribute(T.ATTR_RETRY_COUNT, attempt - 1)
            try:
                return await self._attempt(request, ex, d, attempt, span, started)
            except AttemptFailure as f:
                last = f
                if f.rate_limited:  # not broken, only busy: it may serve the retry once its cooldown is over
                    tried.discard(d.upstream.name)
                log.info("attempt %d on %s failed: %s", attempt, d.upstream.name, f.message)
        assert last is not None
        raise GatewayError(last.status, last.message, code=last.error_type, retry_after=last.retry_after)

    # ---- one attempt ----------------------------------------------------------------------------------------------
    async def _attempt(
        self, request: web.Request, ex: Exchange, d: Decision, attempt: int, server_span: trace.Span, started: float
    ) -> web.StreamResponse:
        u = d.upstream
        cfg = u.cfg
        prov = provider_for(cfg.provider)
        url = prov.url(cfg, ex.operation)
        upstream_model = cfg.model or ex.model
        headers = prov.headers(cfg)
        out = Outcome()
        n_start = u.load_area()
        t0 = time.monotonic()
        error_type: str | None = None
        verdict = False  # the outcome was reported to the outlier detector
        contacted = False  # the upstream was actually called
        with self.tel.tracer.start_as_current_span(f"{ex.operation} {upstream_model}", kind=SpanKind.CLIENT) as span:
            span.set_attribute(T.ATTR_GEN_AI_OPERATION_NAME, ex.operation)
            span.set_attribute(T.ATTR_GEN_AI_PROVIDER_NAME, T.provider_name(cfg.provider))
            span.set_attribute(T.ATTR_GEN_AI_REQUEST_MODEL, upstream_model)
            span.set_attribute(T.ATTR_SERVER_ADDRESS, _host(cfg.base_url))
            span.set_attribute(T.ATTR_UPSTREAM, u.name)
            span.set_attribute(T.ATTR_ATTEMPT, attempt)
            self.tel.inject(headers)
            try:
                try:
                    if ex.native is not None and prov.dialect == ex.dialect:
                        data = prov.encode_native(ex.native, upstream_model)
                    else:
                        data = prov.encode_request(ex.operation, ex.body, upstream_model)
                except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
                    # The client's fields do not fit this upstream's wire format: the request's fault, not the upstream's.
                    raise GatewayError(
                        400, f"the request cannot be sent to {cfg.provider} upstreams: {type(e).__name__}: {scrub(str(e))[:200]}",
                        code="invalid_request",
                    ) from None
                contacted = True
                deadline = t0 + (cfg.timeout or self.s.total_timeout)
                # Streams: headers within the TTFT budget. Non-streamed: the body comes when generation is done.
                head_limit = min(self.s.ttft_timeout, deadline - t0) if ex.stream else deadline - t0
                try:
                    async with asyncio.timeout(head_limit):
                        resp = await self.session.post(url, data=data, headers=headers, allow_redirects=False)  # type: ignore[union-attr]
                except TimeoutError:  # first: TimeoutError is an OSError (and aiohttp's timeouts are both)
                    raise AttemptFailure(504, f"upstream {u.name} did not answer in time", "upstream_timeout")
                except (aiohttp.ClientError, OSError) as e:
                    raise AttemptFailure(502, f"upstream {u.name} unreachable ({type(e).__name__})", "upstream_connect_error")
                clean = False
                try:
                    span.set_attribute("http.response.status_code", resp.status)
                    if not 200 <= resp.status < 300:
                        raise await self._upstream_error(u, resp)
                    if ex.stream:
                        result = await self._relay_stream(request, ex, u, prov, resp, out, t0, deadline, span)
                    else:
                        result = await self._relay_body(ex, u, prov, resp, out, t0, deadline)
                    clean = True
                finally:
                    if clean:
                        resp.release()
                    else:
                        resp.close()  # never reuse a half-read connection; the upstream sees the disconnect
                self.health.success(u)
                verdict = True
            except AttemptFailure as f:
                error_type = f.error_type
                span.set_attribute(T.ATTR_ERROR_TYPE, f.error_type)
                span.set_status(Status(StatusCode.ERROR, f.message))
                self._failed(u, f)
                verdict = not f.rate_limited
                raise
            except GatewayError as g:  # the upstream rejected the request itself (4xx): it is healthy
                if contacted:
                    self.health.success(u)
                    verdict = True
                error_type = str(g.status)
                span.set_attribute(T.ATTR_ERROR_TYPE, error_type)
                raise
            except (asyncio.CancelledError, ConnectionResetError):
                error_type = "client_disconnected"
                span.set_attribute(T.ATTR_ERROR_TYPE, error_type)
                raise
            except _MidStreamFailure as m:
                error_type = m.error_type
                span.set_attribute(T.ATTR_ERROR_TYPE, m.error_type)
                span.set_status(Status(StatusCode.ERROR, m.message))
                self.health.failure(u)
                verdict = True
                u.record_error(False)
                result = m.response
            finally:
                if not verdict:
                    self.health.abandoned(u)  # a half-open probe that ended without a verdict frees the probe slot
                self._finish(u, ex, out, n_start, t0)
                self._annotate(span, server_span, ex, out, u, started, error_type)
        return result

    async def _upstream_error(self, u: UpstreamStats, resp: aiohttp.ClientResponse) -> Exception:
        """Turn an upstream HTTP error into a retryable AttemptFailure or a client-facing GatewayError."""
        try:
            async with asyncio.timeout(min(self.s.idle_timeout, 10.0)):
                body = await resp.content.read(_MAX_ERROR_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError):
            body = b""
        message = _error_message(body)
        st = resp.status
        if st == 429:
            ra = _retry_after(resp.headers)
            self.sync.set_cooldown(u.name, time.time() + (ra if ra is not None else 1.0))
            return AttemptFailure(429, f"upstream {u.name} rate limited: {message}", "rate_limited", ra or 1.0, True)
        if st < 200 or 300 <= st < 400:
            return AttemptFailure(502, f"upstream {u.name} answered {st} (redirects are not followed)", "upstream_bad_response")
        if st in _RETRYABLE_STATUS or st >= 500:
            ra = _retry_after(resp.headers) if st in (503, 529) else None
            if ra:  # overloaded, with a hint: cool down like a 429 (still counts as a failure)
                self.sync.set_cooldown(u.name, time.time() + ra)
            status = 504 if st in (408, 504) else 502
            return AttemptFailure(status, f"upstream {u.name} returned {st}: {message}", f"upstream_{st}", ra)
        # The request itself is bad (400, 413, 422 ...): the client should see it; no retry.
        return GatewayError(st, message, code="upstream_rejected")

    def _failed(self, u: UpstreamStats, f: AttemptFailure) -> None:
        u.record_error(f.rate_limited)
        if not f.rate_limited:
            self.health.failure(u)

    # ---- non-streamed ---------------------------------------------------------------------------------------------
    async def _relay_body(
        self, ex: Exchange, u: UpstreamStats, prov, resp: aiohttp.ClientResponse, out: Outcome, t0: float, deadline: float
    ) -> web.Response:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                raw = await resp.read()
        except TimeoutError:
            raise AttemptFailure(504, f"upstream {u.name} timed out", "upstream_timeout")
        except (aiohttp.ClientError, OSError) as e:
            raise AttemptFailure(502, f"upstream {u.name} failed mid-response ({type(e).__name__})", "upstream_disconnected")
        now = time.monotonic()
        native = prov.dialect == ex.dialect  # the client gets the upstream's bytes
        try:
            data = json.loads(raw)
            if prov.dialect != "openai":
                data = prov.decode_response(data, ex.model)
            observe_body(out, data)
        except Exception:  # not JSON, or not the object this dialect promises
            raise AttemptFailure(502, f"upstream {u.name} returned an invalid response body", "upstream_bad_response")
        out.first_at = out.last_at = now
        if native:
            body = raw
        elif ex.dialect == "anthropic":
            body = json.dumps(chat_response_to_messages(data, ex.model), separators=(",", ":")).encode()
        else:
            body = json.dumps(data, separators=(",", ":")).encode()
        return web.Response(body=body, content_type="application/json")

    # ---- streamed -------------------------------------------------------------------------------------------------
    async def _relay_stream(
        self,
        request: web.Request,
        ex: Exchange,
        u: UpstreamStats,
        prov,
        resp: aiohttp.ClientResponse,
        out: Outcome,
        t0: float,
        deadline: float,
        span: trace.Span,
    ) -> web.StreamResponse:
        client = (
            AnthropicClientStream(ex.model, ex.est.prompt_tokens)
            if ex.dialect == "anthropic"
            else OpenAIClientStream(ex.include_usage)
        )
        native = prov.dialect == ex.dialect  # relay the upstream's frames untouched
        decoder = prov.stream_decoder(ex.model, ex.include_usage)
        sse = SSEDecoder()
        sresp: web.StreamResponse | None = None
        done = False
        content = resp.content
        first_deadline = t0 + self.s.ttft_timeout
        try:
            while not done:
                now = time.monotonic()
                limit = min(deadline, first_deadline) if sresp is None else deadline
                if now >= limit:
                    raise TimeoutError
                try:
                    async with asyncio.timeout(min(limit - now, self.s.idle_timeout)):
                        piece = await content.readany()
                except TimeoutError:
                    raise
                except (aiohttp.ClientError, OSError) as e:
                    raise _StreamBroken(f"upstream {u.name} stream broke ({type(e).__name__})", "upstream_disconnected")
                if not piece:
                    events = sse.tail()
                    if not events and not out.finish_reasons:
                        raise _StreamBroken(f"upstream {u.name} closed the stream early", "upstream_disconnected")
                else:
                    events = sse.feed(piece)
                buf: list[bytes] = []
                for ev in events:
                    if ev.data == b"[DONE]":
                        done = True
                        break
                    try:
                        chunks = decoder.feed(ev)
                        for c in chunks:
                            if "error" in c and "choices" not in c:
                                raise UpstreamStreamError(_error_message(json.dumps(c).encode()))
                            observe_chunk(out, c)
                    except UpstreamStreamError as e:
                        raise _StreamBroken(f"upstream {u.name}: {scrub(str(e.message))[:500]}", "upstream_stream_error")
                    except Exception:  # valid SSE, but not the chunks this dialect promises
                        raise _StreamBroken(f"upstream {u.name} sent an invalid event", "upstream_bad_response")
                    if not native:
                        buf.extend(client.chunk(c) for c in chunks)
                    elif client.keeps(chunks):
                        buf.append(ev.raw)  # (the usage chunk the gateway asked for is dropped if the client did not)
                    if ev.event == "message_stop":
                        done = True
                if not piece and not done:
                    done = True
                if done:
                    for c in decoder.finish():
                        observe_chunk(out, c)
                        if not native:
                            buf.append(client.chunk(c))
                    if not native or ex.dialect == "openai":  # native Anthropic streams end with their own message_stop
                        buf.append(client.done())
                elif out.mark_area is None:
                    if out.first_at is not None:
                        out.mark_area = u.load_area()  # decoding started: progress samples measure from here
                elif out.last_at - (out.mark_at or out.first_at) >= PROGRESS_SAMPLE_EVERY:  # type: ignore[operator]
                    progress_sample(u, out)
                if buf:
                    # A client that stops reading must not hold the upstream slot: writes get the idle budget.
                    try:
                        async with asyncio.timeout(max(0.05, min(self.s.idle_timeout, deadline - time.monotonic()))):
                            if sresp is None:
                                sresp = await self._open_stream(request)
                            await sresp.write(b"".join(buf))
                    except TimeoutError:
                        if request.transport is not None:
                            request.transport.abort()
                        raise ConnectionResetError("the client stopped reading the stream") from None
            assert sresp is not None
            await sresp.write_eof()
            return sresp
        except TimeoutError:
            err = ("upstream_timeout", f"upstream {u.name} timed out" + (" before the first token" if sresp is None else ""))
            if sresp is None:
                raise AttemptFailure(504, err[1], err[0])
            raise await self._fail_stream(sresp, client, err[0], err[1], 504)
        except _StreamBroken as b:
            if sresp is None:
                raise AttemptFailure(502, b.message, b.error_type)
            raise await self._fail_stream(sresp, client, b.error_type, b.message, 502)
        except asyncio.CancelledError:
            if self.stopping and sresp is not None:  # shutdown grace is over: end the stream properly
                await self._fail_stream(sresp, client, "shutting_down", "the gateway is shutting down", 503)
            raise

    async def _open_stream(self, request: web.Request) -> web.StreamResponse:
        sresp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        request[STREAMING] = True
        await sresp.prepare(request)
        return sresp

    async def _fail_stream(self, sresp: web.StreamResponse, client, error_type: str, message: str, status: int):
        """After the first byte there is no retry: tell the client in-band and end the stream cleanly."""
        err = GatewayError(status, message, code=error_type)
        try:
            async with asyncio.timeout(2.0):  # a client that stopped reading cannot hold the slot
                await sresp.write(client.error(err))
                await sresp.write_eof()
        except (ConnectionResetError, RuntimeError, TimeoutError):
            pass
        return _MidStreamFailure(sresp, error_type, message)

    # ---- bookkeeping ----------------------------------------------------------------------------------------------
    def _finish(self, u: UpstreamStats, ex: Exchange, out: Outcome, n_start: tuple[float, float], t0: float) -> None:
        n_mean = mean_load(n_start, u.load_area(), u)
        self.router.release(u)
        used = finish(u, out, stream=ex.stream, prompt_tokens=ex.est.prompt_tokens, n_mean=n_mean, t0=t0)
        if used:
            ex.used_tokens = used
        # Spend (issue 13): each attempt overwrites these, so the attempt that produced the response is charged.
        ex.upstream, ex.output_tokens, ex.cached_tokens = u.name, out.output_tokens, out.cached_tokens
        ex.input_tokens = (out.input_tokens if out.input_tokens is not None else ex.est.prompt_tokens) if used else 0

    def _annotate(
        self,
        span: trace.Span,
        server_span: trace.Span,
        ex: Exchange,
        out: Outcome,
        u: UpstreamStats,
        started: float,
        error_type: str | None,
    ) -> None:
        if span.is_recording() or server_span.is_recording():
            attrs: dict[str, Any] = {}
            if out.response_model:
                attrs[T.ATTR_GEN_AI_RESPONSE_MODEL] = out.response_model
            if out.response_id:
                attrs[T.ATTR_GEN_AI_RESPONSE_ID] = out.response_id
            if out.input_tokens is not None:
                attrs[T.ATTR_GEN_AI_USAGE_INPUT_TOKENS] = out.input_tokens
            attrs[T.ATTR_GEN_AI_USAGE_OUTPUT_TOKENS] = out.output_tokens
            if out.finish_reasons:
                attrs[T.ATTR_GEN_AI_RESPONSE_FINISH_REASONS] = out.finish_reasons
            if out.ttft is not None:
                attrs[T.ATTR_TTFT_MS] = round(out.ttft * 1000, 2)
            if out.first_at and out.last_at and out.output_tokens > 1 and out.last_at > out.first_at:
                attrs[T.ATTR_OUTPUT_TOKENS_PER_SECOND] = round((out.output_tokens - 1) / (out.last_at - out.first_at), 2)
            if u.cfg.price is not None:  # issue 13: the attempt's cost (the one charged to the key when it answered)
                attrs[T.ATTR_REQUEST_COST_USD] = u.quote(Tokens(ex.input_tokens, ex.cached_tokens, ex.output_tokens)) / 1e6
            span.set_attributes(attrs)
            server_span.set_attributes(attrs)
            if self.tel.capture_content and out.text:
                finish = out.finish_reasons[0] if out.finish_reasons else None
                server_span.set_attribute(T.ATTR_GEN_AI_OUTPUT_MESSAGES, T.output_messages_json("".join(out.text), finish))
        # Metrics are recorded after the response went out: off the request's latency path.
        asyncio.get_running_loop().call_soon(
            functools.partial(
                self.tel.record_operation,
                operation=ex.operation,
                request_model=ex.model,
                response_model=out.response_model,
                provider=T.provider_name(u.cfg.provider),
                upstream=u.name,
                server_address=_host(u.cfg.base_url),
                duration_s=time.monotonic() - started,
                ttft_s=out.ttft if ex.stream else None,  # time to first chunk exists for streams only
                input_tokens=out.input_tokens,
                output_tokens=out.output_tokens,
                error_type=error_type,
            )
        )


class _StreamBroken(Exception):
    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class _MidStreamFailure(Exception):
    """The stream failed after the client got bytes; the response was ended with an SSE error event."""

    def __init__(self, response: web.StreamResponse, error_type: str, message: str) -> None:
        super().__init__(message)
        self.response = response
        self.error_type = error_type
        self.message = message


def _error_message(body: bytes) -> str:
    """The upstream's error text, shortened and scrubbed of secrets (it reaches clients, logs and spans)."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        msg = err.get("message") if isinstance(err, dict) else str(err)
        return scrub(str(msg))[:500] if msg else "no message"  # scrub first: a cut secret would not match
    except (ValueError, AttributeError, RecursionError):
        return scrub(body.decode(errors="replace"))[:200] or "empty body"


def _retry_after(headers) -> float | None:
    """Seconds from retry-after-ms / Retry-After (seconds or HTTP-date); capped, None when absent or unreadable."""
    secs: float | None = None
    v = headers.get("retry-after-ms")
    if v:
        try:
            secs = float(v) / 1000
        except ValueError:
            pass
    v = headers.get("Retry-After")
    if secs is None and v:
        try:
            secs = float(v)
        except ValueError:
            try:  # HTTP-date form
                from email.utils import parsedate_to_datetime

                secs = parsedate_to_datetime(v).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                secs = None
    if secs is None or not math.isfinite(secs):
        return None
    return min(max(0.0, secs), _MAX_RETRY_AFTER)


@functools.lru_cache(maxsize=1024)
def _host(url: str) -> str:
    return urlsplit(url).hostname or ""
