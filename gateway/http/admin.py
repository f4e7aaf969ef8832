"""Admin API (admin key required) and the read-only live view of the fleet."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from datetime import UTC, datetime

from aiohttp import web

from gateway.auth import SETTABLE_FIELDS
from gateway.errors import GatewayError
from gateway.http.api import KEYS, LEDGER, PROXY_KEY, RUNTIME, SYNC, read_json
from gateway.routing import candidates
from gateway.spend import GROUPS
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
        "cost": rt.fleet.cost_view(),
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
    """The live view plus what only an admin may see: spend per gateway key (today, this month; UTC)."""
    _check_admin(request)
    ledger = request.app[LEDGER]
    keys = []
    for k in request.app[KEYS].list():
        today, month = ledger.spent(k["id"])
        keys.append({"id": k["id"], "name": k["name"], "spend_usd_today": today, "spend_usd_month": month,
                     "budget_usd_day": k["budget_usd_day"], "budget_usd_month": k["budget_usd_month"]})
    return web.json_response({**fleet_snapshot(request.app), "keys": keys})


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


def _budget(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v > 1e9:
        raise GatewayError(400, f"'{name}' must be a number of USD >= 0 (0 blocks the key) or null", param=name)
    return float(v)


def _models(body: dict) -> list[str] | None:
    v = body.get("models")
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > 256 or not all(isinstance(m, str) and 0 < len(m) <= 256 for m in v):
        raise GatewayError(400, "'models' must be an array of model names (the allow-list) or null", param="models")
    return list(dict.fromkeys(v))


def _expires(body: dict) -> float | None:
    v = body.get("expires_at")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise GatewayError(400, "'expires_at' must be a Unix time in seconds or null", param="expires_at")
    return float(v)


def _metadata(body: dict) -> dict[str, str]:
    v = body.get("metadata")
    if v is None:
        return {}
    ok = isinstance(v, dict) and len(v) <= 32 and all(
        isinstance(k, str) and 0 < len(k) <= 64 and isinstance(x, str) and len(x) <= 512 for k, x in v.items()
    )
    if not ok:
        raise GatewayError(400, "'metadata' must be an object of up to 32 string values (e.g. team, owner)", param="metadata")
    return dict(v)


def _service_class(body: dict) -> str | None:
    v = body.get("service_class")
    if v is not None and not (isinstance(v, str) and 0 < len(v) <= 64 and v.isidentifier()):
        raise GatewayError(400, "'service_class' must be a class name such as interactive or batch", param="service_class")
    return v.lower() if isinstance(v, str) else None


async def create_key(request: web.Request) -> web.Response:
    """POST /admin/keys: the plaintext key is in this response and nowhere else, ever.

    Fields: name, rpm, tpm, budget_usd_day, budget_usd_month, models (allow-list), expires_at (Unix s), metadata
    ({team, owner, ...}), service_class (the default class of the key's requests). Unknown fields are a 400: a typo like `budget_usd` must not create an unlimited key."""
    _check_admin(request)
    body = await read_json(request)
    unknown = sorted(set(body) - set(SETTABLE_FIELDS))
    if unknown:
        raise GatewayError(
            400, f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(SETTABLE_FIELDS)}",
            param=unknown[0], code="unknown_field",
        )
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise GatewayError(400, "'name' is required (a string of 1-200 characters)", param="name")
    extra = {
        "budget_usd_day": _budget(body, "budget_usd_day"), "budget_usd_month": _budget(body, "budget_usd_month"),
        "models": _models(body), "expires_at": _expires(body), "metadata": _metadata(body),
        "service_class": _service_class(body),
    }
    key, rec = await request.app[KEYS].create(name.strip(), _limit(body, "rpm"), _limit(body, "tpm"), **extra)
    return web.json_response({**rec.public(), "key": key}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    _check_admin(request)
    ledger = request.app[LEDGER]
    data = request.app[KEYS].list()
    for k in data:
        k["spend_usd_today"], k["spend_usd_month"] = ledger.spent(k["id"])
    return web.json_response({"object": "list", "data": data})


_DAY = 86400.0


async def spend_report(request: web.Request) -> web.Response:
    """GET /admin/spend?group_by=key|model|upstream&from=YYYY-MM-DD&to=YYYY-MM-DD: per-day USD, requests, tokens."""
    _check_admin(request)
    q = request.query
    group_by = q.get("group_by", "key")
    if group_by not in GROUPS:
        raise GatewayError(400, f"'group_by' must be one of {', '.join(GROUPS)}", param="group_by")
    now = time.time()
    start = _date(q.get("from"), "from", now - 6 * _DAY)
    end = _date(q.get("to"), "to", now)
    if end < start or end - start > 366 * _DAY:
        raise GatewayError(400, "'from' must not be after 'to', and the range is at most 366 days", param="from")
    report = await request.app[LEDGER].report(group_by, start, end)
    if group_by == "key":
        names = {k["id"]: k["name"] for k in request.app[KEYS].list()}
        for row in report["totals"].items():
            row[1]["name"] = names.get(row[0])
    return web.json_response({"from": _iso(start), "to": _iso(end), **report})


def _date(v: str | None, param: str, default: float) -> float:
    if v is None:
        return default
    try:
        return datetime.strptime(v, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise GatewayError(400, f"'{param}' must be a date YYYY-MM-DD (UTC)", param=param) from None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


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
    app.router.add_get("/admin/spend", spend_report)
