"""Admin API (admin key required) and the read-only live view of the fleet."""

from __future__ import annotations

import hmac
import math
import time

from aiohttp import web

from .errors import GatewayError
from .handlers import PROXY_KEY, read_json


def fleet_snapshot(app: web.Application) -> dict:
    proxy = app[PROXY_KEY]
    return {
        "replica": proxy.s.replica_id,
        "redis": proxy.sync.status,
        "time": time.time(),
        "queue_depth": proxy.router.queue_depth(),
        "upstreams": proxy.fleet.snapshot(),
    }


def _check_admin(request: web.Request) -> None:
    key = request.app[PROXY_KEY].s.admin_key
    if key is None:
        raise GatewayError(403, "the admin API is disabled: set GATEWAY_ADMIN_KEY", code="admin_disabled")
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-admin-key", "")
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise GatewayError(401, "invalid admin key", code="invalid_admin_key")


async def upstreams_view(request: web.Request) -> web.Response:
    return web.json_response(fleet_snapshot(request.app))


async def admin_stats(request: web.Request) -> web.Response:
    _check_admin(request)
    return web.json_response(fleet_snapshot(request.app))


async def admin_set_weight(request: web.Request) -> web.Response:
    _check_admin(request)
    name = request.match_info["name"]
    proxy = request.app[PROXY_KEY]
    if name not in proxy.fleet.upstreams:
        raise GatewayError(404, f"unknown upstream {name!r}", code="upstream_not_found")
    body = await read_json(request)
    w = body.get("weight")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise GatewayError(400, "'weight' must be a number >= 0 (0 drains the upstream)", param="weight")
    await proxy.sync.set_weight(name, float(w))
    proxy.router.wake()
    return web.json_response({"upstream": name, "weight": float(w)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/gateway/upstreams", upstreams_view)
    app.router.add_get("/admin/upstreams", admin_stats)
    app.router.add_put("/admin/upstreams/{name}/weight", admin_set_weight)
