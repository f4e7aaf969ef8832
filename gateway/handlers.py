"""HTTP endpoints of the inbound API: parse and validate once, then hand an Exchange to the proxy."""

from __future__ import annotations

import json
import time

from aiohttp import web

from .errors import GatewayError
from .providers.anthropic_wire import messages_request_to_chat
from .proxy import Exchange, Proxy
from .router import DEFAULT_OUTPUT_TOKENS, Estimate
from .tokens import max_output_tokens, prompt_tokens

PROXY_KEY = web.AppKey("proxy", Proxy)


async def read_json(request: web.Request) -> dict:
    raw = await request.read()
    if not raw:
        raise GatewayError(400, "We could not parse the JSON body of your request: the body is empty.")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(400, "We could not parse the JSON body of your request. It must be valid JSON.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The JSON body must be an object.")
    return body


def _require(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise GatewayError(400, message, param=param, code="invalid_value")


def _validate_common(body: dict) -> None:
    _require(isinstance(body.get("model"), str) and body["model"] != "", "'model' is required and must be a string", "model")
    stream = body.get("stream", False)
    _require(isinstance(stream, bool) or stream is None, "'stream' must be a boolean", "stream")
    for k in ("max_tokens", "max_completion_tokens"):
        v = body.get(k)
        _require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), f"'{k}' must be an integer >= 1", k)
    for k in ("temperature", "top_p"):
        v = body.get(k)
        _require(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), f"'{k}' must be a number", k)
    so = body.get("stream_options")
    _require(so is None or isinstance(so, dict), "'stream_options' must be an object", "stream_options")


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


def _exchange(request: web.Request, operation: str, body: dict, dialect: str = "openai") -> Exchange:
    stream = bool(body.get("stream")) and operation != "embeddings"
    so = body.get("stream_options") or {}
    est = Estimate(prompt_tokens(body), max_output_tokens(body) or DEFAULT_OUTPUT_TOKENS, operation)
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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    _validate_common(body)
    _validate_messages(body.get("messages"))
    return await request.app[PROXY_KEY].handle(request, _exchange(request, "chat", body))


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    _validate_common(body)
    p = body.get("prompt")
    _require(isinstance(p, (str, list)) and len(p) > 0, "'prompt' is required (string or array)", "prompt")
    return await request.app[PROXY_KEY].handle(request, _exchange(request, "text_completion", body))


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    _validate_common(body)
    inp = body.get("input")
    _require(isinstance(inp, (str, list)) and len(inp) > 0, "'input' is required (string or array)", "input")
    return await request.app[PROXY_KEY].handle(request, _exchange(request, "embeddings", body))


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic Messages API inbound: translated to the canonical chat format and back."""
    body = await read_json(request)
    try:
        chat = messages_request_to_chat(body)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise GatewayError(400, str(e) or "invalid Messages request") from None
    _validate_common(chat)
    return await request.app[PROXY_KEY].handle(request, _exchange(request, "chat", chat, dialect="anthropic"))


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
