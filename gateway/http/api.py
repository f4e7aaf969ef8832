"""HTTP endpoints of the inbound API: parse and validate once, then hand a request context to the proxy."""

from __future__ import annotations

import json
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway.auth import ApiKey, KeyStore
from gateway.context import RequestContext
from gateway.cost import Tokens, estimate_micros
from gateway.dialects.responses import (
    PARAM_NAMES,
    ResponseMeta,
    ResponsesRequestError,
    native_only_chat,
    responses_request_to_chat,
)
from gateway.errors import GatewayError
from gateway.http.validation import build_context, messages_context, validate
from gateway.http.writer import HttpWriter
from gateway.observability.telemetry import Telemetry
from gateway.proxy import Proxy
from gateway.reliability import deadlines
from gateway.runtime import Runtime
from gateway.spend import SpendLedger, charge_request
from gateway.state.fleet import Pool
from gateway.state.response_store import not_found
from gateway.sync.fleet_sync import FleetSync

RUNTIME = web.AppKey("runtime", Runtime)
PROXY_KEY = web.AppKey("proxy", Proxy)
SYNC = web.AppKey("sync", FleetSync)
TELEMETRY = web.AppKey("telemetry", Telemetry)
KEYS = web.AppKey("keys", KeyStore)
#: The caller's key record, set on the request by the gate (app._gate).
API_KEY = web.RequestKey("api_key", ApiKey)
BODY_BYTES = web.RequestKey("gw_body_bytes", int)
#: The request's id (the client's x-request-id, or one made up): every response carries it back.
REQUEST_ID = web.RequestKey("gw_request_id", str)
#: The model the client asked for, once the body is parsed (api_middleware labels the request count with it).
REQUEST_MODEL = web.RequestKey("gw_request_model", str)
LEDGER = web.AppKey("spend_ledger", SpendLedger)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


#: Made once: json.loads with a keyword argument builds a new decoder for every body.
_DECODER = json.JSONDecoder(parse_constant=_no_constants)  # NaN / Infinity are not JSON


def _loads(raw: bytes) -> object:
    """json.loads(raw, parse_constant=_no_constants) with the shared decoder (same encodings accepted)."""
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def body_too_large(limit: int) -> GatewayError:
    """The 413 of a body over the limit (also when aiohttp itself refuses one: app._too_large)."""
    return GatewayError(413, f"request body too large (limit {limit} bytes)", code="body_too_large")


async def read_json(request: web.Request) -> dict:
    s = request.app[PROXY_KEY].s
    declared = request.content_length
    if declared is not None and declared > s.max_body_bytes:  # refuse before waiting for the bytes
        raise body_too_large(s.max_body_bytes)
    try:
        if request.content.is_eof():  # a small body arrives with the headers: all buffered, one read, no timer to arm
            raw = request.content.read_nowait()
            if len(raw) > s.max_body_bytes:  # no declared length (chunked): the limit aiohttp's read() applies
                raise body_too_large(s.max_body_bytes)
        else:
            async with deadlines.timeout(s.body_read_timeout):
                raw = await request.read()
    except TimeoutError:
        raise GatewayError(408, "the request body did not arrive in time", code="body_timeout") from None
    except (RequestPayloadError, HttpProcessingError):  # e.g. Content-Encoding: gzip over bytes that are not gzip
        raise GatewayError(
            400, "the request body could not be read: it does not match its Content-Encoding or Transfer-Encoding",
            code="invalid_body_encoding",
        ) from None
    request[BODY_BYTES] = len(raw)
    if not raw:
        raise GatewayError(400, "We could not parse the JSON body of your request: the body is empty.")
    try:
        body = _loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GatewayError(400, "We could not parse the JSON body of your request. It must be valid JSON.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The JSON body must be an object.")
    if isinstance(body.get("model"), str):
        request[REQUEST_MODEL] = body["model"]
    return body


async def _run(request: web.Request, ctx: RequestContext) -> web.StreamResponse:
    """Check the caller's API key (expiry, model allow-list, RPM/TPM and budget: 401/403/429), proxy, then settle
    the real token usage and charge the request's cost once (gateway/spend.py)."""
    proxy, ledger = request.app[PROXY_KEY], request.app[LEDGER]
    rec = request.get(API_KEY)
    writer = HttpWriter(request)
    if rec is None:
        try:
            await proxy.handle(ctx, writer)
        finally:
            _charge(proxy, ledger, None, 0, ctx)
        return _response(writer)
    pool = proxy.fleet.pool(ctx.model)
    rec.check_access(ctx.model, pool.model if pool else None, time.time())
    charged = ctx.est.admitted_tokens
    booked = request.app[KEYS].admit(rec, charged)
    budgets = rec.budgets_micros()
    reserved = 0
    try:
        if budgets != (None, None) and pool is not None:
            reserved = ledger.admit(rec.id, rec.name, budgets, _estimate(pool, ctx))
        ctx.principal = rec
        await proxy.handle(ctx, writer)
    finally:
        rec.settle(ctx.used_tokens - charged, booked)
        _charge(proxy, ledger, rec.id, reserved, ctx)
    return _response(writer)


def _response(writer: HttpWriter) -> web.StreamResponse:
    assert writer.response is not None
    return writer.response


def _estimate(pool: Pool, ctx: RequestContext) -> int:
    """Budget reservation: the request on the dearest upstream of its pool (micro-dollars)."""
    rows = ((u.cfg.price, u.billing_usd_per_1m()) for u in pool.upstreams)
    return estimate_micros(rows, ctx.est.prompt_tokens, ctx.est.output_tokens)


def _charge(proxy: Proxy, ledger: SpendLedger, key_id: str | None, reserved: int, ctx: RequestContext) -> None:
    """Book the request's cost: the usage of the attempt that produced the response (none: a refund)."""
    u = ctx.usage
    billed_input = u.input_tokens if u.input_tokens is not None else (ctx.est.prompt_tokens if u.output_tokens else 0)
    charge_request(proxy.fleet, ledger, key_id, reserved, ctx.model, ctx.upstream,
                   Tokens(billed_input, u.cached_tokens, u.output_tokens), service_class=ctx.service_class)


def _context(request: web.Request, operation: str, body: dict, dialect: str = "openai") -> RequestContext:
    ctx = build_context(
        operation, body, dialect=dialect, headers=request.headers, size=request.get(BODY_BYTES, 0), path=request.path
    )
    request[REQUEST_ID] = ctx.request_id
    return ctx


async def _openai(request: web.Request, operation: str) -> web.StreamResponse:
    body = await read_json(request)
    validate(operation, body)
    return await _run(request, _context(request, operation, body))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "text_completion")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "embeddings")


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic Messages API inbound: translated to the canonical chat format and back."""
    body = await read_json(request)
    ctx = messages_context(body, headers=request.headers, size=request.get(BODY_BYTES, 0), path=request.path)
    request[REQUEST_ID] = ctx.request_id
    return await _run(request, ctx)


async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI Responses API inbound: translated to the canonical chat format (any upstream serves it) and back.
    `previous_response_id` costs one store GET before routing; the finished response is saved in the background."""
    body = await read_json(request)
    store = request.app[RUNTIME].responses
    prev = body.get("previous_response_id")
    history = await store.history(prev) if prev is not None else None
    native = _native_responses(request, body)
    if prev is not None and history is None and not native:
        raise not_found(prev)
    foreign = ["previous_response_id"] if prev is not None and history is None else []
    try:
        chat, meta = responses_request_to_chat(body, history)
    except ResponsesRequestError as e:
        if not (native and history is None):
            code = "unsupported_parameter" if "unsupported parameter" in str(e) else "invalid_value"
            raise GatewayError(400, str(e), code=code, param=e.param) from None
        # Native upstreams may serve what the gateway cannot translate; the others refuse it (policy.py).
        chat, meta = native_only_chat(body), ResponseMeta(body, [])
        foreign.append(e.param or "input")
    validate("chat", chat)
    ctx = _context(request, "chat", chat, dialect="responses")
    ctx.extras["responses"] = meta
    ctx.extras["param_names"] = PARAM_NAMES
    if native and history is None:
        ctx.native = body  # passed untouched to upstreams with responses_api (upstream/responses.py)
    if foreign:  # e.g. an id only native upstreams know: other upstreams cannot serve it (policy.py)
        ctx.extras["foreign"] = foreign
    resp = await _run(request, ctx)
    store.save(meta)
    return resp


def _native_responses(request: web.Request, body: dict) -> bool:
    """Whether the model's pool has upstreams serving the Responses API themselves."""
    model = body.get("model")
    pool = request.app[PROXY_KEY].fleet.pool(model) if isinstance(model, str) else None
    return pool is not None and any(u.cfg.responses_api for u in pool.upstreams)


async def list_models(request: web.Request) -> web.Response:
    fleet = request.app[PROXY_KEY].fleet
    now = int(time.time())
    data = []
    for name, cfg in fleet.config.models.items():
        for mid in (name, *cfg.aliases):
            data.append({"id": mid, "object": "model", "created": now, "owned_by": "gateway"})
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    mid = request.match_info["model"]
    if request.app[PROXY_KEY].fleet.pool(mid) is None:
        raise GatewayError(404, f"The model '{mid}' does not exist", code="model_not_found", param="model")
    return web.json_response({"id": mid, "object": "model", "created": int(time.time()), "owned_by": "gateway"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
