"""Assembles the aiohttp application: middleware, routes, background tasks, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources

from aiohttp import web

from . import admin, handlers
from .config import FleetConfig, load_fleet
from .errors import GatewayError
from .fleet import Fleet
from .engine_metrics import EngineMetricsScraper
from .fleet_sync import FleetSync
from .health import OutlierDetector
from .handlers import PROXY_KEY
from .proxy import Proxy
from .router import Router
from .settings import Settings
from .telemetry import Telemetry
from .tokens import encoding

log = logging.getLogger("gateway")
DRAINING = web.AppKey("draining", list)
WAKER = web.AppKey("waker", asyncio.Task)


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
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return GatewayError(500, "internal gateway error", code="internal_error").response(dialect)


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
    text = proxy.tel.prometheus_text(admin.fleet_snapshot(request.app))
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


async def dashboard(request: web.Request) -> web.Response:
    html = resources.files("gateway").joinpath("static/dashboard.html").read_text()
    return web.Response(text=html, content_type="text/html")


def create_app(settings: Settings, fleet_config: FleetConfig | None = None, telemetry: Telemetry | None = None) -> web.Application:
    cfg = fleet_config or load_fleet(settings.config)
    fleet = Fleet(cfg, settings.default_strategy)
    tel = telemetry or Telemetry(capture_content=settings.capture_content)
    health = OutlierDetector(
        settings.eject_after_failures, settings.eject_base_seconds, settings.eject_max_seconds, tel.record_ejection
    )
    router = Router(fleet, health, settings.queue_max, settings.queue_timeout)
    sync = FleetSync(fleet, settings.replica_id, settings.redis_url, settings.redis_prefix, settings.flush_interval)
    proxy = Proxy(settings, fleet, router, health, sync, tel)
    scraper = EngineMetricsScraper(fleet)

    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[PROXY_KEY] = proxy
    app[DRAINING] = []
    handlers.add_routes(app)
    admin.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/dashboard", dashboard)

    async def on_startup(app: web.Application) -> None:
        encoding()  # load the tokenizer before the first request
        await proxy.start()
        await sync.start()
        await scraper.start()
        # The sync loop refreshes limits; wake queued requests each cycle so rate-limit headroom is used.
        app[WAKER] = asyncio.create_task(_wake_loop(router, settings.flush_interval))

    async def on_shutdown(app: web.Application) -> None:
        app[DRAINING].append(True)
        pending = [t for t in proxy.active if not t.done()]
        if pending:
            log.info("draining %d in-flight requests (up to %.0fs)", len(pending), settings.shutdown_grace)
            await asyncio.wait(pending, timeout=settings.shutdown_grace)

    async def on_cleanup(app: web.Application) -> None:
        app[WAKER].cancel()
        await scraper.stop()
        await sync.stop()
        await proxy.stop()
        await tel.shutdown()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def _wake_loop(router: Router, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        router.wake()
