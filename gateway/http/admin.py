"""Admin API (admin key required) and the read-only live view of the fleet."""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from aiohttp import web

from gateway.errors import GatewayError
from gateway.http.api import KEYS, PROXY_KEY, RUNTIME, SYNC, read_json
from gateway.routing import candidates
from gateway.sync.fleet_sync import StoreUnavailable


def fleet_snapshot(app: web.Application) -> dict:
    rt = app[RUNTIME]
    return {
        "replica": rt.settings.replica_id,
        "redis": rt.sync.status,
        "time": time.time(),
        "queue_depth": rt.router.queue_depth(),
        "upstreams": rt.fleet.snapshot(rt.health),
        "slo": rt.slo.snapshot(),
        "interactive_demand": {m: round(d, 2) for m, d in rt.router.classes.demand.items()},
    }


def _check_admin(request: web.Request) -> None:
    key = request.app[PROXY_KEY].s.admin_key
    if key is None:
        raise GatewayError(403, "the admin API is disabled: set GATEWAY_ADMIN_KEY", code="admin_disabled")
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-admin-key", "")
    # Compare fixed-length digests in constant time: neither the content nor the length of the key leaks.
    a = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(key.get_secret_value().encode("utf-8", "surrogatepass")).digest()
    if not hmac.compare_digest(a, b):
        raise GatewayError(401, "invalid admin key", code="invalid_admin_key")


async def upstreams_view(request: web.Request) -> web.Response:
    return web.json_response(fleet_snapshot(request.app))


async def gateway_info(request: web.Request) -> web.Response:
    """GET /v1/gateway/info: what this replica costs: memory (bounded per upstream), fleet sync cost per round,
    how picks are made. Read-only, no secrets (same exposure as /v1/gateway/upstreams)."""
    proxy = request.app[PROXY_KEY]
    router = proxy.router
    return web.json_response({
        "replica": proxy.s.replica_id,
        "time": time.time(),
        "memory": proxy.fleet.memory(),
        "sync": request.app[SYNC].info(),
        "routing": {
            "sample_above": router.sample_above,
            "pools": {m: {"upstreams": len(p.upstreams), "strategy": p.strategy,
                          "sampled": candidates.sampled(p, router.sample_above)}
                      for m, p in proxy.fleet.pools.items()},
        },
    })


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
    try:
        await request.app[SYNC].set_weight(name, float(w))
    except StoreUnavailable as e:
        raise GatewayError(
            503, f"{e}; the weight was not changed on any replica, retry when it is back", code="store_unavailable",
            retry_after=1,
        ) from None
    proxy.router.wake()
    return web.json_response({"upstream": name, "weight": float(w)})


def _limit(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > 2**40:
        raise GatewayError(400, f"'{name}' must be a positive integer or null", param=name)
    return v


async def create_key(request: web.Request) -> web.Response:
    """POST /admin/keys {name, rpm?, tpm?}: the plaintext key is in this response and nowhere else, ever."""
    _check_admin(request)
    body = await read_json(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise GatewayError(400, "'name' is required (a string of 1-200 characters)", param="name")
    rpm, tpm = _limit(body, "rpm"), _limit(body, "tpm")
    key, rec = await request.app[KEYS].create(name.strip(), rpm, tpm)
    return web.json_response({**rec.public(), "key": key}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    _check_admin(request)
    return web.json_response({"object": "list", "data": request.app[KEYS].list()})


async def delete_key(request: web.Request) -> web.Response:
    _check_admin(request)
    key_id = request.match_info["id"]
    if not await request.app[KEYS].delete(key_id):
        raise GatewayError(404, "no such API key", code="key_not_found")
    return web.json_response({"id": key_id, "deleted": True})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/gateway/upstreams", upstreams_view)
    app.router.add_get("/v1/gateway/info", gateway_info)
    app.router.add_get("/admin/upstreams", admin_stats)
    app.router.add_put("/admin/upstreams/{name}/weight", admin_set_weight)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_delete("/admin/keys/{id}", delete_key)
