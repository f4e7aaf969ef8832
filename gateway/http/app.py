"""Assembles the aiohttp application: middleware, routes, background tasks, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.auth import presented_key
from gateway.config import FleetConfig, load_fleet
from gateway.errors import GatewayError
from gateway.http import admin, batch_api, count_tokens
from gateway.http import api as handlers
from gateway.http.api import API_KEY, KEYS, LEDGER, PROXY_KEY, REQUEST_ID, REQUEST_MODEL, RUNTIME, SYNC, TELEMETRY
from gateway.http.errors import Handler, dialect_of, error_response, lookup
from gateway.http.protocol import GatewayRunner, install_expect_handler
from gateway.http.validation import request_id
from gateway.http.writer import STREAMING
from gateway.observability.telemetry import Telemetry
from gateway.runtime import Runtime
from gateway.settings import Settings

log = logging.getLogger("gateway")
DRAINING = web.AppKey("draining", list)


def _gateway_error(request: web.Request, e: BaseException, dialect: str) -> web.StreamResponse:
    assert isinstance(e, GatewayError)
    return error_response(e, dialect)


def _too_large(request: web.Request, e: BaseException, dialect: str) -> web.StreamResponse:
    limit = request.app[PROXY_KEY].s.max_body_bytes
    return error_response(handlers.body_too_large(limit), dialect)


def _http_exception(request: web.Request, e: BaseException, dialect: str) -> web.StreamResponse:
    assert isinstance(e, web.HTTPException)
    if e.status < 400:
        raise e
    msg = {404: f"no route for {request.method} {request.path}", 405: f"method {request.method} not allowed"}
    return error_response(GatewayError(e.status, msg.get(e.status, e.reason), code=e.reason.lower().replace(" ", "_")), dialect)


def _client_gone(request: web.Request, e: BaseException, dialect: str) -> web.StreamResponse:
    # The client went away (or stopped reading and was cut off): nobody to answer, nothing to log as an error.
    log.debug("client gone on %s %s", request.method, request.path)
    return web.Response(status=499)


def _too_deep(request: web.Request, e: BaseException, dialect: str) -> web.StreamResponse:
    return error_response(GatewayError(400, "the request is nested too deeply", code="invalid_json"), dialect)


def _unexpected(request: web.Request, e: BaseException, dialect: str) -> web.StreamResponse:
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=e)
    if request.get(STREAMING):
        raise e  # headers are out: aiohttp drops the connection rather than write a second response
    return error_response(GatewayError(500, "internal gateway error", code="internal_error"), dialect)


#: Exception type -> response, looked up along the exception's MRO (the most specific handler wins).
ERROR_HANDLERS: dict[type[BaseException], Handler] = {
    GatewayError: _gateway_error,
    web.HTTPRequestEntityTooLarge: _too_large,
    web.HTTPException: _http_exception,
    ConnectionResetError: _client_gone,
    RecursionError: _too_deep,
    Exception: _unexpected,
}


@web.middleware
async def api_middleware(request: web.Request, handler):
    """The one middleware, in three steps (one coroutine layer per request, not three):

    1. gate (API paths only, before the body is read): refuse new work while draining; check the API key;
    2. errors: any exception becomes an error response in the client's dialect, with its x-request-id;
    3. count (API paths only): one ``gateway_requests_total`` per request with the status the client got, also
       for requests refused before routing (400, 401, 404, 413, 429 ...), or 499 when the client went away.
    """
    api = request.path.startswith("/v1/")
    code = 500
    try:
        try:
            if api:
                _gate(request)
            resp = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            h = lookup(ERROR_HANDLERS, e)
            assert h is not None  # Exception is registered
            resp = h(request, e, dialect_of(request.path))
        if not resp.prepared and "x-request-id" not in resp.headers:  # streams carry it from their first byte
            resp.headers["x-request-id"] = request.get(REQUEST_ID) or request_id(request.headers)
        code = resp.status
        return resp
    except asyncio.CancelledError:  # every other exception became a response above
        code = 499  # the client went away before the answer
        raise
    finally:
        if api:
            _count_request(request, code)


def _count_request(request: web.Request, code: int) -> None:
    rt = request.app[RUNTIME]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    asked = request.get(REQUEST_MODEL)
    resolved = rt.fleet.config.resolve(asked) if asked else None  # never a raw client string: bounded labels
    rt.telemetry.record_request(route=route, model=resolved[0] if resolved else "", code=code)


def _gate(request: web.Request) -> None:
    """Before the body is read: refuse new API work while draining; check the gateway API key."""
    if request.path.startswith("/v1/gateway/"):
        return
    if request.app[DRAINING] and request.method == "POST":
        raise GatewayError(503, "the gateway is shutting down; retry the request", code="shutting_down", retry_after=1)
    if request.app[PROXY_KEY].s.require_api_key:
        given = presented_key(request.headers)
        rec = request.app[KEYS].lookup(given)
        if rec is None:
            msg = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer <key>'."
            raise GatewayError(401, msg, code="invalid_api_key")
        request[API_KEY] = rec


async def healthz(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    sync = request.app[SYNC]
    status = "degraded" if sync.status in ("degraded", "version_mismatch") else "ok"
    body: dict[str, object] = {"status": status, "redis": sync.status, "replica": proxy.s.replica_id}
    if sync.detail:
        body["detail"] = sync.detail  # e.g. a replica speaking another Redis layout version is live
    if request.app[RUNTIME].warnings:
        body["warnings"] = request.app[RUNTIME].warnings
    return web.json_response(body)


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAINING]:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    snap = admin.fleet_snapshot(request.app)
    tel, ledger = request.app[TELEMETRY], request.app[LEDGER]
    spend = [(k["id"], k["name"], *ledger.spent(k["id"])) for k in request.app[KEYS].list()]
    text = tel.prometheus_text(snap) + tel.cost_text(snap, spend)
    headers = {"Content-Type": CONTENT_TYPE_LATEST, "X-Content-Type-Options": "nosniff"}
    return web.Response(body=text.encode(), headers=headers)


_DASHBOARD = Path(__file__).with_name("static") / "dashboard.html"


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_DASHBOARD.read_bytes(), content_type="text/html", charset="utf-8")


async def _rate_limit_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """x-ratelimit-* on every keyed response, streamed or not, errors included (headers are still unsent here)."""
    if not isinstance(request, web.Request):
        return
    rec = request.get(API_KEY)
    if rec is not None and (rec.rpm is not None or rec.tpm is not None):
        response.headers.update(rec.rate_headers(request.app[SYNC].replicas))


def create_app(settings: Settings, fleet_config: FleetConfig | None = None, telemetry: Telemetry | None = None) -> web.Application:
    rt = Runtime(settings, fleet_config or load_fleet(settings.config), telemetry)
    app = web.Application(
        middlewares=[api_middleware],
        client_max_size=settings.max_body_bytes,
        # Request line and each header line are capped; aiohttp answers 400/431 itself when they are exceeded.
        handler_args={"max_line_size": settings.max_header_bytes, "max_field_size": settings.max_header_bytes},
    )
    app[RUNTIME] = rt
    app[PROXY_KEY] = rt.proxy
    app[SYNC] = rt.sync
    app[TELEMETRY] = rt.telemetry
    app[KEYS] = rt.keys
    app[LEDGER] = rt.ledger
    if settings.require_api_key:  # only keyed requests get rate headers: no per-response signal without keys
        app.on_response_prepare.append(_rate_limit_headers)
    app[DRAINING] = []
    app[batch_api.BATCH] = rt.batch
    handlers.add_routes(app)
    count_tokens.add_routes(app)
    batch_api.add_routes(app)
    admin.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/dashboard", dashboard)
    install_expect_handler(app)

    async def on_startup(app: web.Application) -> None:
        await rt.start()

    async def on_shutdown(app: web.Application) -> None:
        try:  # lines still running finish; the rest stay queued for other replicas
            await asyncio.wait_for(rt.batch.stop(min(settings.shutdown_grace, 10.0)), 20.0)
        except TimeoutError:
            log.error("shutdown: batch workers did not stop within 20 s; going on without them")
        await _drain(app, settings.shutdown_grace)

    async def on_cleanup(app: web.Application) -> None:
        await rt.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def _drain(app: web.Application, grace: float) -> None:
    """/readyz says 503, new API requests get 503, in-flight ones run until `grace`; then the rest are
    cancelled (streams end with an in-band error event, others get a 503)."""
    if not app[DRAINING]:
        app[DRAINING].append(True)
    app[batch_api.BATCH].stop_claiming()
    proxy = app[PROXY_KEY]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    logged = False
    while pending := [t for t in proxy.active if not t.done()]:
        left = deadline - loop.time()
        if left <= 0:
            log.warning("shutdown grace over: ending %d requests still in flight", len(pending))
            proxy.stopping = True
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=5.0)
            break
        if not logged:
            log.info("draining %d in-flight requests (up to %.1fs)", len(pending), left)
            logged = True
        await asyncio.wait(pending, timeout=left)


def serve(app: web.Application, settings: Settings, *, reuse_port: bool = False) -> None:
    """Run until SIGTERM/SIGINT, then drain while still listening (so /readyz answers 503), then stop.

    On uvloop when it is installed (a libuv event loop: less CPU per socket read/write and callback than
    asyncio's pure-Python selector loop), else on asyncio's own.
    """
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(app, settings, reuse_port))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


#: The young generation is collected every GC_THRESHOLDS[0] net container allocations; one request makes a few
#: hundred, so the default 700 meant a collection (scanning the in-flight requests' live objects) every request or
#: two. Ten times fewer collections scan about the same live set each: ~10x less collector work for a few MB more.
GC_THRESHOLDS = (10_000, 10, 10)


def _freeze_startup_objects() -> None:
    """Move what start-up built (config, tokenizer, OpenTelemetry, routes: tens of thousands of objects that live
    as long as the process) out of the garbage collector's generations. Every full collection would otherwise scan
    them again, and request garbage triggers one every few thousand requests. Serving processes only: tests
    build many runtimes in one process, which must stay collectable."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _serve(app: web.Application, settings: Settings, reuse_port: bool) -> None:
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port)
        await site.start()
        _freeze_startup_objects()
        print(f"gateway listening on http://{settings.host}:{settings.port} (replica {settings.replica_id})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: draining in-flight requests while still answering /readyz with 503")
        await _drain(app, settings.shutdown_grace)
    finally:
        await runner.cleanup()  # on_shutdown finds nothing left to wait for unless the grace ran out

