"""The request path, as orchestration only: admit -> attempt on the chosen upstream -> write in the client's dialect,
with retries on another upstream. Transport lives in gateway/upstream/client.py, wire formats in gateway/upstream/
and gateway/dialects/, measurement, health verdicts, traces and metrics in hook subscribers (gateway/hooks.py), and
the response goes to a `ResponseWriter` (gateway/writers.py): the same path serves HTTP clients and in-process callers.

Retries: an attempt whose exception is `retryable` (connect errors, timeouts, 429, 5xx) moves to another upstream,
within `max_attempts` and the retry budget, but only before the first byte reached the client. After that a failure
ends the stream with an in-band error event and a clean end (the upstream connection is closed, its slot freed).
A rate-limited upstream is busy, not broken: it may serve the retry once its cooldown is over.

Timeouts: streams must produce response headers and a first chunk within ttft_timeout, then a read within
idle_timeout; every attempt ends by its total timeout (the upstream's `timeout` or total_timeout). A non-streamed
response only arrives when generation is done, so it is bounded by the total timeout alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.context import RequestContext
from gateway.dialects import DIALECTS
from gateway.dialects.client_stream import ClientStream
from gateway.errors import ClientDisconnected, GatewayError, Preempted, UpstreamError, UpstreamProtocolError
from gateway.hooks import Attempt, Hooks
from gateway.observability.redact import scrub
from gateway.reliability import deadlines
from gateway.reliability.retry_budget import RetryBudget
from gateway.routing import classes, preempt
from gateway.routing.router import Router
from gateway.settings import Settings
from gateway.state.fleet import Fleet, Pool
from gateway.state.goodput import perf_comment, perf_headers
from gateway.state.measure import PROGRESS_SAMPLE_EVERY, Outcome, observe_body, observe_chunk
from gateway.upstream import Provider, provider_of
from gateway.upstream.client import Reply, Timeouts, Transport
from gateway.upstream.headers import client_key, forwarded, relayed
from gateway.upstream.policy import fit
from gateway.upstream.resume import Resume, stitch, whole_body
from gateway.writers import ClientGone, ResponseWriter

log = logging.getLogger("gateway.proxy")

_JSON = {"Content-Type": "application/json"}


class Proxy:
    def __init__(self, settings: Settings, fleet: Fleet, router: Router, client: Transport, hooks: Hooks) -> None:
        self.s = settings
        self.fleet = fleet
        self.router = router
        self.client = client
        self.hooks = hooks
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min)
        self.active: set[asyncio.Task] = set()
        #: Set when the shutdown grace ran out: requests still running are cancelled and end with an error.
        self.stopping = False

    # ---- entry ---------------------------------------------------------------------------------------------------
    async def handle(self, ctx: RequestContext, writer: ResponseWriter) -> None:
        """Serve one request into `writer`; raise GatewayError when the client must get an error response."""
        pool = self._pool(ctx)
        task = asyncio.current_task()
        error: BaseException | None = None
        self.hooks.emit("request_start", ctx)
        if task:
            self.active.add(task)
        try:
            await self._attempts(ctx, pool, writer)
            ctx.status = 200
        except asyncio.CancelledError as e:
            error = e
            if self.stopping and task is not None and not writer.started:
                # Past the shutdown grace: answer 503 instead of dropping the connection.
                task.uncancel()
                error = GatewayError(503, "the gateway is shutting down; retry the request", code="shutting_down", retry_after=1)
                ctx.status = 503
                raise error from None
            ctx.status = 499
            raise
        except GatewayError as e:
            error, ctx.status = e, e.status
            raise
        except ConnectionResetError as e:
            error, ctx.status = e, 499
            raise
        finally:
            if task:
                self.active.discard(task)
            self.hooks.emit("request_end", ctx, error)

    def _pool(self, ctx: RequestContext) -> Pool:
        pool = self.fleet.pool(ctx.model)
        if pool is None:
            raise GatewayError(404, f"The model '{ctx.model}' does not exist", code="model_not_found", param="model")
        if ctx.operation not in pool.operations:
            raise GatewayError(
                400, f"The model '{ctx.model}' does not support {ctx.operation.replace('_', ' ')}",
                code="unsupported_operation", param="model",
            )
        key_default = getattr(ctx.principal, "service_class", None)
        ctx.service_class = classes.resolve(pool, ctx.service_class or None, ctx.class_source, key_default)
        return pool

    async def _attempts(self, ctx: RequestContext, pool: Pool, writer: ResponseWriter) -> None:
        """Serve the request, resuming it as a continuation each time it is preempted (upstream/resume.py)."""
        self.budget.request()
        exclude: frozenset[str] = frozenset()
        while True:
            try:
                await self._tries(ctx, pool, writer, exclude)
                break
            except Preempted:
                ctx.body, ctx.est = ctx.resume.continuation()
                # Only vLLM-style engines take a continuation (resume.py): never a hosted API.
                exclude = frozenset(u.name for u in pool.upstreams if not preempt.continues(u))
        if ctx.resume is not None and ctx.resume.tokens:
            _whole_usage(ctx, ctx.resume)

    async def _tries(self, ctx: RequestContext, pool: Pool, writer: ResponseWriter, exclude: frozenset[str]) -> None:
        tried: set[str] = set(exclude)
        last: UpstreamError | None = None
        for number in range(1, self.s.max_attempts + 1):
            if number > 1 and not self.budget.try_spend():
                break
            try:
                d = await self.router.admit(pool, ctx, frozenset(tried))
            except GatewayError as e:
                if last is None:
                    raise
                if last.status in (429, 503) and e.retry_after:
                    last.retry_after = max(last.retry_after or 0.0, e.retry_after)
                break  # nowhere left to retry: report the upstream failure
            tried.add(d.upstream.name)
            # A continuation's stream is already open: its failures go in-band like any streamed attempt's.
            attempt = Attempt(number, d, Outcome(), streamed=ctx.stream and writer.started)
            self.hooks.emit("decision", ctx, attempt)
            try:
                await self._attempt(ctx, attempt, writer, pool)
                return
            except UpstreamError as f:
                if not f.retryable:
                    raise
                last = f
                if f.status == 429:  # busy, not broken: it may serve the retry once its cooldown is over
                    tried.discard(d.upstream.name)
                log.info("attempt %d on %s failed: %s", number, d.upstream.name, f.message)
        assert last is not None
        raise last

    # ---- one attempt ----------------------------------------------------------------------------------------------
    async def _attempt(self, ctx: RequestContext, a: Attempt, writer: ResponseWriter, pool: Pool) -> None:
        u = a.upstream
        cfg = u.cfg
        prov = provider_of(cfg, ctx.dialect if ctx.native is not None else None)
        a.upstream_model = cfg.model or ctx.model
        byok = client_key(ctx.headers, self.s.require_api_key) if cfg.byok else None
        a.headers = {**prov.headers(cfg, byok), **forwarded(ctx.headers, self.s.forward_headers)}
        cls = pool.cfg.classes[ctx.service_class]
        lends = preempt.preemptible(ctx, cls, u)
        if lends and ctx.resume is None:
            ctx.resume = Resume(ctx.body, ctx.est)
        # A preemptible answer is streamed from the upstream even for a non-streamed client: what was written
        # must survive a preemption (resume.py assembles the body).
        collect = not ctx.stream and ctx.resume is not None
        try:
            data = _encode(ctx, prov, a.upstream_model, pool.cfg.drop_unsupported_params, stream=collect)
            self.hooks.emit("attempt_start", ctx, a)
            a.contacted = True
            deadline = a.t0 + (cfg.timeout or (self.s.stream_total_timeout if ctx.stream else self.s.total_timeout))
            first = min(self.s.ttft_timeout, deadline - a.t0) if ctx.stream else deadline - a.t0
            resp = await self.client.send(u.name, prov.url(cfg, ctx.operation), data, a.headers, first)
            a.status = resp.status
            _relay_headers(ctx, resp)
            clean = False
            if lends:
                a.preempt = preempt.Running(ctx, a.outcome, lambda: resp.close(False), ctx.resume.preemptions)
                self.router.preemptions.add(u.name, a.preempt)
            try:
                if ctx.stream:
                    await self._relay_stream(ctx, a, prov, resp, writer, Timeouts(first, self.s.idle_timeout, deadline))
                elif collect:
                    await self._relay_collected(ctx, a, prov, resp, writer, Timeouts(first, first, deadline))
                else:
                    await self._relay_body(ctx, a, prov, resp, writer, deadline)
                clean = a.error is None
            finally:
                if a.preempt is not None:
                    self.router.preemptions.discard(u.name, a.preempt)
                resp.close(clean)
        except GatewayError as e:
            a.error = e
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            a.error = ClientDisconnected()
            raise
        finally:
            self.router.release(u, ctx)
            self.hooks.emit("attempt_end", ctx, a)

    async def _relay_body(
        self, ctx: RequestContext, a: Attempt, prov: Provider, resp: Reply, writer: ResponseWriter, deadline: float
    ) -> None:
        raw, data = await resp.body(deadline)
        out = a.outcome
        out.first_at = out.last_at = time.monotonic()
        try:
            if prov.dialect != "openai":
                data = prov.decode_response(data, a.upstream_model)
            observe_body(out, data)
        except Exception:  # not the object this dialect promises
            raise UpstreamProtocolError(f"upstream {a.upstream.name} returned an invalid response body", code="upstream_bad_response") from None
        body = raw if prov.dialect == ctx.dialect else DIALECTS[ctx.dialect].body(ctx, data)
        ctx.upstream = a.upstream.name
        await writer.send(200, body, {**_JSON, **ctx.response_headers, **perf_headers(ctx, out, out.last_at)})

    async def _relay_collected(
        self, ctx: RequestContext, a: Attempt, prov: Provider, resp: Reply, writer: ResponseWriter, t: Timeouts
    ) -> None:
        """A non-streamed answer asked of the upstream as a stream (a preemptible one), sent as one body."""
        decoder = prov.stream_decoder(a.upstream_model, True)
        out = a.outcome
        try:
            async for f in resp.frames(decoder, t):
                _observe(a, f.chunks)
            if not resp.terminated and not out.finish_reasons:
                raise UpstreamProtocolError(f"upstream {a.upstream.name} closed the stream early", code="upstream_disconnected")
            _observe(a, decoder.finish())
        except UpstreamError:
            _if_preempted(ctx, a)
            raise
        r = ctx.resume
        data = whole_body(out, r if r is not None and r.preemptions else None)
        ctx.upstream = a.upstream.name
        now = out.last_at or time.monotonic()
        await writer.send(200, DIALECTS[ctx.dialect].body(ctx, data), {**_JSON, **ctx.response_headers, **perf_headers(ctx, out, now)})

    async def _relay_stream(
        self, ctx: RequestContext, a: Attempt, prov: Provider, resp: Reply, writer: ResponseWriter, t: Timeouts
    ) -> None:
        r = ctx.resume
        enc = _client_stream(ctx)
        cont = r is not None and bool(r.ident)  # the client has the first response's start: the chunks join it
        native = prov.dialect == ctx.dialect and not cont  # relay the upstream's frames untouched
        decoder = prov.stream_decoder(a.upstream_model, ctx.include_usage)
        out = a.outcome
        next_progress = 0.0
        try:
            async for f in resp.frames(decoder, t):
                had_first = out.first_at is not None
                _observe(a, f.chunks)
                if out.first_at is not None:
                    if not had_first:
                        self.hooks.emit("first_token", ctx, a)
                        next_progress = out.first_at + PROGRESS_SAMPLE_EVERY
                    elif out.last_at is not None and out.last_at >= next_progress:
                        self.hooks.emit("progress", ctx, a)
                        next_progress = out.last_at + PROGRESS_SAMPLE_EVERY
                if native:
                    buf = f.event.raw if enc.keeps(f.chunks) else b""
                else:
                    buf = b"".join(enc.chunk(c) for c in _joined(f.chunks, r if cont else None))
                if buf:
                    await self._write(ctx, a, writer, buf, t.deadline)
            if not resp.terminated and not out.finish_reasons:
                raise UpstreamProtocolError(f"upstream {a.upstream.name} closed the stream early", code="upstream_disconnected")
            tail = decoder.finish()
            _observe(a, tail)
            await self._write(ctx, a, writer, self._stream_end(ctx, out, _joined(tail, r if cont else None), enc, native), t.deadline)
            await writer.end()
        except UpstreamError as e:
            _if_preempted(ctx, a)
            if not a.streamed:
                raise
            a.error = e  # after the first byte: no retry; the client learns in-band
            await _fail_stream(writer, enc, e)
        except asyncio.CancelledError:
            if self.stopping and a.streamed:  # shutdown grace is over: end the stream properly
                await _fail_stream(writer, enc, GatewayError(503, "the gateway is shutting down", code="shutting_down"))
            raise

    def _stream_end(self, ctx: RequestContext, out: Outcome, tail: list[dict], enc: ClientStream, native: bool) -> bytes:
        """Chunks the decoder held back, and the dialect's end of stream (native Anthropic streams carry their own)."""
        parts = []
        for c in tail:
            if not native:
                parts.append(enc.chunk(c))
        parts.append(perf_comment(ctx, out, time.monotonic()))
        if not native or ctx.dialect == "openai":
            parts.append(enc.done())
        return b"".join(parts)

    async def _write(self, ctx: RequestContext, a: Attempt, writer: ResponseWriter, data: bytes, deadline: float) -> None:
        """Write to the client; one that stops reading gets the idle budget, then is cut off (freeing the slot)."""
        if not data and writer.started:
            return
        try:
            async with deadlines.timeout(max(0.05, min(self.s.idle_timeout, deadline - time.monotonic()))):
                if not writer.started:
                    ctx.upstream = a.upstream.name
                    await writer.open_stream(
                        {**ctx.response_headers, "x-gateway-upstream": ctx.upstream, "x-gateway-class": ctx.service_class}
                    )
                a.streamed = True
                if data:
                    await writer.write(data)
        except TimeoutError:
            writer.abort()
            raise ClientGone("the client stopped reading the stream") from None


def _client_stream(ctx: RequestContext) -> ClientStream:
    """The encoder of the client's stream: one per request, kept across a preempted request's attempts."""
    r = ctx.resume
    if r is None:
        return DIALECTS[ctx.dialect].stream(ctx)
    if r.enc is None:
        r.enc = DIALECTS[ctx.dialect].stream(ctx)
    return r.enc


def _joined(chunks: list[dict], r: Resume | None) -> list[dict]:
    """A continuation's chunks as part of the first response (resume.stitch); others unchanged."""
    if r is None:
        return chunks
    return [s for c in chunks if (s := stitch(c, r)) is not None]


def _if_preempted(ctx: RequestContext, a: Attempt) -> None:
    """The attempt failed because the gateway preempted it: keep what it wrote and say so (Preempted)."""
    if a.preempt is not None and a.preempt.preempted:
        ctx.resume.absorb(a.outcome)
        raise Preempted(a.upstream.name) from None


def _whole_usage(ctx: RequestContext, r: Resume) -> None:
    """The request's usage counts every attempt's output, and the original prompt (not the continuations')."""
    u = ctx.usage
    u.output_tokens += r.tokens
    if u.input_tokens is not None:
        u.input_tokens = max(0, u.input_tokens - r.tokens)


def _relay_headers(ctx: RequestContext, resp: Reply) -> None:
    """The upstream's rate-limit/processing headers go to the client (only the serving attempt's)."""
    old = ctx.extras.pop("relayed", ())
    for k in old:
        ctx.response_headers.pop(k, None)
    got = relayed(resp.headers)
    if got:
        ctx.response_headers.update(got)
        ctx.extras["relayed"] = tuple(got)


def _observe(a: Attempt, chunks: list[dict]) -> None:
    try:
        for c in chunks:
            observe_chunk(a.outcome, c)
    except Exception:  # decodable, but not the chunks this dialect promises
        raise UpstreamProtocolError(f"upstream {a.upstream.name} sent an invalid event", code="upstream_bad_response") from None


def _encode(ctx: RequestContext, prov: Provider, upstream_model: str, drop: bool, stream: bool = False) -> bytes:
    """The upstream request body; `stream`: asked as a stream whatever the client asked (_relay_collected)."""
    body = fit(ctx, prov, drop)  # a parameter the upstream cannot honour: 400, or dropped and listed (policy.py)
    if stream:
        body = {**body, "stream": True}
    try:
        if ctx.native is not None and prov.dialect == ctx.dialect:
            return prov.encode_native(ctx.native, upstream_model)
        return prov.encode_request(ctx.operation, body, upstream_model)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # The client's fields do not fit this upstream's wire format: the request's fault, not the upstream's.
        raise GatewayError(
            400, f"the request cannot be sent to {prov.kind} upstreams: {type(e).__name__}: {scrub(str(e))[:200]}",
            code="invalid_request",
        ) from None


async def _fail_stream(writer: ResponseWriter, enc: ClientStream, err: GatewayError) -> None:
    """After the first byte there is no retry: tell the client in-band and end the stream cleanly."""
    try:
        async with asyncio.timeout(2.0):  # a client that stopped reading cannot hold the slot
            await writer.write(enc.error(err))
            await writer.end()
    except (ConnectionResetError, RuntimeError, TimeoutError):
        pass
