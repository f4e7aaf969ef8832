"""Assembles the aiohttp application: middleware, routes, background tasks, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from gateway.auth import API_KEY, KEYS, KeyStore, presented_key
from gateway.config import FleetConfig, load_fleet
from gateway.errors import GatewayError
from gateway.http import admin
from gateway.http import api as handlers
from gateway.http.api import PROXY_KEY
from gateway.observability import redact
from gateway.observability.telemetry import Telemetry
from gateway.periodic import Periodic
from gateway.proxy import STREAMING, Proxy
from gateway.reliability.outlier import HealthChecker, OutlierDetector
from gateway.routing.router import Router
from gateway.settings import Settings
from gateway.spend import LEDGER, SpendLedger
from gateway.state.fleet import Fleet
from gateway.sync.engine_metrics import EngineMetricsScraper
from gateway.sync.fleet_sync import FleetSync
from gateway.tokens import encoding

log = logging.getLogger("gateway")
DRAINING = web.AppKey("draining", list)
CHECKER = web.AppKey("checker", HealthChecker)


@web.middleware
async def error_middleware(request: web.Request, handler):
    dialect = "anthropic" if request.path == "/v1/messages" else "openai"
    try:
        return await handler(request)
    except GatewayError as e:
        return e.response(dialect)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[PROXY_KEY].s.max_body_bytes
        return GatewayError(413, f"request body too large (limit {limit} bytes)", code="body_too_large").response(dialect)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {404: f"no route for {request.method} {request.path}", 405: f"method {request.method} not allowed"}
        return GatewayError(e.status, msg.get(e.status, e.reason), code=e.reason.lower().replace(" ", "_")).response(dialect)
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:
        # The client went away (or stopped reading and was cut off): nobody to answer, nothing to log as an error.
        log.debug("client gone on %s %s", request.method, request.path)
        return web.Response(status=499)
    except RecursionError:
        return GatewayError(400, "the request is nested too deeply", code="invalid_json").response(dialect)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        if request.get(STREAMING):
            raise  # headers are out: aiohttp drops the connection rather than write a second response
        return GatewayError(500, "internal gateway error", code="internal_error").response(dialect)


@web.middleware
async def gate_middleware(request: web.Request, handler):
    """Before the body is read: refuse new API work while draining; check the gateway API key."""
    path = request.path
    if path.startswith("/v1/") and not path.startswith("/v1/gateway/"):
        if request.app[DRAINING] and request.method == "POST":
            raise GatewayError(503, "the gateway is shutting down; retry the request", code="shutting_down", retry_after=1)
        if request.app[PROXY_KEY].s.require_api_key:
            given = presented_key(request.headers)
            rec = request.app[KEYS].lookup(given)
            if rec is None:
                msg = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer <key>'."
                raise GatewayError(401, msg, code="invalid_api_key")
            request[API_KEY] = rec
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    status = "degraded" if proxy.sync.status == "degraded" else "ok"
    return web.json_response({"status": status, "redis": proxy.sync.status, "replica": proxy.s.replica_id})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAINING]:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    snap = admin.fleet_snapshot(request.app)
    text = proxy.tel.prometheus_text(snap)
    ledger = request.app[LEDGER]
    spend = [(k["id"], k["name"], *ledger.spent(k["id"])) for k in request.app[KEYS].list()]
    text += proxy.tel.cost_text(snap, spend)
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


_DASHBOARD = Path(__file__).with_name("static") / "dashboard.html"


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=_DASHBOARD.read_bytes(), content_type="text/html", charset="utf-8")


def _fleet_rank(fleet: Fleet) -> tuple[int, int]:
    """(live replicas, this replica's rank) as the fleet sync last saw them."""
    u = next(iter(fleet.upstreams.values()), None)
    return (u.replicas, u.rank) if u is not None else (1, 0)


async def _rate_limit_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """x-ratelimit-* on every keyed response, streamed or not, errors included (headers are still unsent here)."""
    if not isinstance(request, web.Request):
        return
    rec = request.get(API_KEY)
    if rec is not None and (rec.rpm is not None or rec.tpm is not None):
        fleet = request.app[PROXY_KEY].fleet
        response.headers.update(rec.rate_headers(_fleet_rank(fleet)[0]))


def create_app(settings: Settings, fleet_config: FleetConfig | None = None, telemetry: Telemetry | None = None) -> web.Application:
    cfg = fleet_config or load_fleet(settings.config)
    redact.install()
    if settings.admin_key is not None:
        redact.add_secret(settings.admin_key.get_secret_value())
    for up in cfg.upstreams.values():
        redact.add_secret(up.api_key())
    if settings.require_api_key and settings.admin_key is None:
        log.warning("GATEWAY_REQUIRE_API_KEY is set but GATEWAY_ADMIN_KEY is not: no API key can be created")
    fleet = Fleet(cfg, settings.default_strategy)
    tel = telemetry or Telemetry(capture_content=settings.capture_content)
    health = OutlierDetector(
        settings.eject_after_failures, settings.eject_base_seconds, settings.eject_max_seconds, tel.record_ejection
    )
    router = Router(fleet, health, settings.queue_max, settings.queue_timeout)
    sync = FleetSync(fleet, settings.replica_id, settings.redis_url, settings.redis_prefix, settings.flush_interval)
    proxy = Proxy(settings, fleet, router, health, sync, tel)
    scraper = EngineMetricsScraper(fleet)
    keys = KeyStore(
        sync.redis, settings.redis_prefix, settings.api_key_refresh_interval,
        lambda: max((u.replicas for u in fleet.upstreams.values()), default=1),
    )
    ledger = SpendLedger(
        sync.redis, settings.redis_prefix, settings.replica_id, settings.spend_sync_interval,
        lambda: _fleet_rank(fleet), key_ids=lambda: [r.id for r in keys.keys.values()],
    )
    checker = (
        HealthChecker(fleet.upstreams, health, settings.health_check_interval, settings.health_check_timeout)
        if settings.health_check_interval > 0
        else None
    )

    app = web.Application(
        middlewares=[error_middleware, gate_middleware],
        client_max_size=settings.max_body_bytes,
        # Request line and each header line are capped; aiohttp answers 400/431 itself when they are exceeded.
        handler_args={"max_line_size": settings.max_header_bytes, "max_field_size": settings.max_header_bytes},
    )
    app[PROXY_KEY] = proxy
    app[KEYS] = keys
    app[LEDGER] = ledger
    app.on_response_prepare.append(_rate_limit_headers)
    app[DRAINING] = []
    handlers.add_routes(app)
    admin.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/dashboard", dashboard)

    # The sync loop refreshes limits; wake queued requests each cycle so new headroom is used at once.
    async def wake() -> None:
        router.wake()

    waker = Periodic("router-wake", settings.flush_interval, wake)

    async def on_startup(app: web.Application) -> None:
        encoding()  # load the tokenizer before the first request
        await proxy.start()
        await sync.start()
        await scraper.start()
        await keys.start()
        await ledger.start()
        if checker is not None:
            app[CHECKER] = checker
            await checker.start()
        waker.start()

    async def on_shutdown(app: web.Application) -> None:
        await _drain(app, settings.shutdown_grace)

    async def on_cleanup(app: web.Application) -> None:
        await waker.stop()
        if checker is not None:
            await checker.stop()
        await ledger.stop()
        await keys.stop()
        await scraper.stop()
        await sync.stop()
        await proxy.stop()
        await tel.shutdown()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def _drain(app: web.Application, grace: float) -> None:
    """/readyz says 503, new API requests get 503, in-flight ones run until `grace`; then the rest are
    cancelled (streams end with an in-band error event, others get a 503)."""
    if not app[DRAINING]:
        app[DRAINING].append(True)
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
    """Run until SIGTERM/SIGINT, then drain while still listening (so /readyz answers 503), then stop."""
    asyncio.run(_serve(app, settings, reuse_port))


async def _serve(app: web.Application, settings: Settings, reuse_port: bool) -> None:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=reuse_port)
        await site.start()
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

