"""HTTP endpoints of the inbound API: parse and validate once, then hand an Exchange to the proxy."""

from __future__ import annotations

import asyncio
import json
import math
import time

from aiohttp import web

from gateway.auth import API_KEY, KEYS
from gateway.cost import Tokens, estimate_micros
from gateway.dialects.anthropic_wire import messages_request_to_chat
from gateway.errors import GatewayError
from gateway.proxy import Exchange, Proxy
from gateway.routing.router import DEFAULT_OUTPUT_TOKENS, Estimate
from gateway.spend import LEDGER, SpendLedger, charge_request
from gateway.state.fleet import Pool
from gateway.tokens import max_output_tokens, prompt_tokens

PROXY_KEY = web.AppKey("proxy", Proxy)

_MAX_INT = 2**31 - 1
#: Above this body size the prompt is estimated as bytes/4 instead of tokenized: tiktoken costs ~0.4 us per
#: character on the event loop, so a 4 MB prompt would stall every other request for ~2 s.
_TOKENIZE_MAX_BYTES = 64 * 1024
BODY_BYTES = web.RequestKey("gw_body_bytes", int)
_MAX_MODEL_NAME = 256


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> dict:
    s = request.app[PROXY_KEY].s
    declared = request.content_length
    if declared is not None and declared > s.max_body_bytes:  # refuse before waiting for the bytes
        raise GatewayError(413, f"request body too large (limit {s.max_body_bytes} bytes)", code="body_too_large")
    try:
        async with asyncio.timeout(s.body_read_timeout):
            raw = await request.read()
    except TimeoutError:
        raise GatewayError(408, "the request body did not arrive in time", code="body_timeout") from None
    request[BODY_BYTES] = len(raw)
    if not raw:
        raise GatewayError(400, "We could not parse the JSON body of your request: the body is empty.")
    try:
        body = json.loads(raw, parse_constant=_no_constants)  # NaN / Infinity are not JSON
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GatewayError(400, "We could not parse the JSON body of your request. It must be valid JSON.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The JSON body must be an object.")
    return body


def _require(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise GatewayError(400, message, param=param, code="invalid_value")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_common(body: dict) -> None:
    m = body.get("model")
    _require(isinstance(m, str) and m != "", "'model' is required and must be a string", "model")
    _require(len(m) <= _MAX_MODEL_NAME, f"'model' is longer than {_MAX_MODEL_NAME} characters", "model")
    stream = body.get("stream", False)
    _require(isinstance(stream, bool) or stream is None, "'stream' must be a boolean", "stream")
    for k in ("max_tokens", "max_completion_tokens"):
        v = body.get(k)
        _require(v is None or (_is_int(v) and 1 <= v <= _MAX_INT), f"'{k}' must be an integer between 1 and {_MAX_INT}", k)
    for k in ("temperature", "top_p"):
        v = body.get(k)
        _require(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)), f"'{k}' must be a number", k
        )
    so = body.get("stream_options")
    _require(so is None or isinstance(so, dict), "'stream_options' must be an object", "stream_options")
    stop = body.get("stop")
    _require(
        stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(x, str) for x in stop)),
        "'stop' must be a string or an array of strings", "stop",
    )
    tools = body.get("tools")
    if tools is not None:
        _require(isinstance(tools, list), "'tools' must be an array", "tools")
        for i, t in enumerate(tools):
            _require(
                isinstance(t, dict) and isinstance(t.get("type", "function"), str) and isinstance(t.get("function", {}), dict),
                f"tools[{i}] must be an object with a 'type' and a 'function' object",
                f"tools[{i}]",
            )


def _validate_messages(msgs) -> None:
    _require(isinstance(msgs, list) and len(msgs) > 0, "'messages' must be a non-empty array", "messages")
    for i, m in enumerate(msgs):
        _require(isinstance(m, dict) and isinstance(m.get("role"), str), f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        c = m.get("content")
        _require(
            c is None or isinstance(c, (str, list)),
            f"messages[{i}].content must be a string or an array of content parts",
            f"messages[{i}].content",
        )
        if isinstance(c, list):
            for j, part in enumerate(c):
                _require(
                    isinstance(part, dict)
                    and isinstance(part.get("type"), str)
                    and (part["type"] != "text" or isinstance(part.get("text"), str)),
                    f"messages[{i}].content[{j}] must be a content part object with a 'type' (text parts need a string 'text')",
                    f"messages[{i}].content[{j}]",
                )


def _validate_tokens_input(v, param: str) -> None:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids (non-empty)."""
    ok = isinstance(v, str) or (
        isinstance(v, list)
        and len(v) > 0
        and (
            all(isinstance(x, str) for x in v)
            or all(_is_int(x) and 0 <= x <= _MAX_INT for x in v)
            or all(isinstance(x, list) and x and all(_is_int(t) and 0 <= t <= _MAX_INT for t in x) for x in v)
        )
    )
    _require(ok, f"'{param}' must be a string, an array of strings or an array of token arrays", param)
    _require(not (isinstance(v, str) and v == "" and param == "input"), f"'{param}' must not be empty", param)


def _exchange(request: web.Request, operation: str, body: dict, dialect: str = "openai") -> Exchange:
    stream = bool(body.get("stream")) and operation != "embeddings"
    so = body.get("stream_options") or {}
    size = request.get(BODY_BYTES, 0)
    # Count only the field this operation reads (validated above): junk in other fields cannot break or skew it.
    field = {"chat": "messages", "text_completion": "prompt", "embeddings": "input"}[operation]
    pt = prompt_tokens({field: body[field]}) if size <= _TOKENIZE_MAX_BYTES else size // 4
    est = Estimate(pt, max_output_tokens(body) or DEFAULT_OUTPUT_TOKENS, operation)
    if operation == "embeddings":
        est.output_tokens = 1
    return Exchange(
        operation=operation,
        model=body["model"],
        body=body,
        stream=stream,
        include_usage=bool(so.get("include_usage")),
        dialect=dialect,
        est=est,
        headers=request.headers,
    )


async def _run(request: web.Request, ex: Exchange) -> web.StreamResponse:
    """Check the caller's API key (expiry, model allow-list, RPM/TPM and budget: 401/403/429), proxy, then settle
    the real token usage and charge the request's cost once (gateway/spend.py)."""
    proxy = request.app[PROXY_KEY]
    ledger = request.app[LEDGER]
    rec = request.get(API_KEY)
    if rec is None:
        try:
            return await proxy.handle(request, ex)
        finally:
            _charge(proxy, ledger, None, 0, ex)
    pool = proxy.fleet.pool(ex.model)
    rec.check_access(ex.model, pool.model if pool else None, time.time())
    charged = ex.est.admitted_tokens
    booked = request.app[KEYS].admit(rec, charged)
    budgets = rec.budgets_micros()
    reserved = 0
    try:
        if budgets != (None, None) and pool is not None:
            reserved = ledger.admit(rec.id, rec.name, budgets, _estimate(pool, ex))
        ex.principal = rec
        return await proxy.handle(request, ex)
    finally:
        rec.settle(ex.used_tokens - charged, booked)
        _charge(proxy, ledger, rec.id, reserved, ex)


def _estimate(pool: Pool, ex: Exchange) -> int:
    """Budget reservation: the request on the dearest upstream of its pool (micro-dollars)."""
    rows = ((u.cfg.price, u.billing_usd_per_1m()) for u in pool.upstreams)
    return estimate_micros(rows, ex.est.prompt_tokens, ex.est.output_tokens)


def _charge(proxy: Proxy, ledger: SpendLedger, key_id: str | None, reserved: int, ex: Exchange) -> None:
    """Book the request's cost: the attempt that produced the response (Exchange fields set by Proxy._finish)."""
    charge_request(proxy.fleet, ledger, key_id, reserved, ex.model, ex.upstream,
                   Tokens(ex.input_tokens, ex.cached_tokens, ex.output_tokens), batch=ex.body.get("service_tier") == "flex")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    _validate_common(body)
    _validate_messages(body.get("messages"))
    return await _run(request, _exchange(request, "chat", body))


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    _validate_common(body)
    p = body.get("prompt")
    _require(isinstance(p, (str, list)) and len(p) > 0, "'prompt' is required (string or array)", "prompt")
    _validate_tokens_input(p, "prompt")
    return await _run(request, _exchange(request, "text_completion", body))


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    _validate_common(body)
    inp = body.get("input")
    _require(isinstance(inp, (str, list)) and len(inp) > 0, "'input' is required (string or array)", "input")
    _validate_tokens_input(inp, "input")
    return await _run(request, _exchange(request, "embeddings", body))


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic Messages API inbound: translated to the canonical chat format and back."""
    body = await read_json(request)
    try:
        chat = messages_request_to_chat(body)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise GatewayError(400, str(e) or "invalid Messages request") from None
    except Exception:  # any other shape the translator cannot read is still the request's fault
        raise GatewayError(400, "invalid Messages request") from None
    _validate_common(chat)
    _validate_messages(chat.get("messages"))
    ex = _exchange(request, "chat", chat, dialect="anthropic")
    ex.native = body  # sent as is to Anthropic upstreams
    return await _run(request, ex)


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
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
