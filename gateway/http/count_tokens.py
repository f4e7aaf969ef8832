"""``POST /v1/messages/count_tokens``: Anthropic's token-counting endpoint, answered by the gateway itself.

The count is the gateway's own estimate (tiktoken cl100k over the same canonical request the router sizes
requests with: system, messages, tool results, tool call arguments and tool definitions); no upstream is
called, so it costs no upstream capacity or rate limit. Anthropic models tokenize differently: the figure is
an estimate, as the routing estimate is.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway.dialects.anthropic_wire import messages_request_to_chat
from gateway.errors import GatewayError
from gateway.http.api import PROXY_KEY, read_json
from gateway.tokens import count_text, prompt_tokens


def count_chat_tokens(chat: dict) -> int:
    """Input tokens of a canonical chat request: message text plus what prompt_tokens does not see
    (tool call arguments, tool definitions)."""
    n = prompt_tokens({"messages": chat["messages"]})
    for m in chat["messages"]:
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {}
            n += count_text(str(fn.get("name") or "")) + count_text(str(fn.get("arguments") or ""))
    if chat.get("tools"):
        n += count_text(json.dumps(chat["tools"], separators=(",", ":")))
    return n


async def count_tokens(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "model: Field required", param="model", code="invalid_value")
    if request.app[PROXY_KEY].fleet.config.resolve(model) is None:
        raise GatewayError(404, f"model: {model}", code="model_not_found", param="model")
    try:
        # count_tokens takes no max_tokens; the translator wants one, and it does not change the count.
        chat = messages_request_to_chat({**body, "max_tokens": 1, "stream": False})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise GatewayError(400, str(e) or "invalid count_tokens request") from None
    except Exception:  # any other shape the translator cannot read is still the request's fault
        raise GatewayError(400, "invalid count_tokens request") from None
    return web.json_response({"input_tokens": count_chat_tokens(chat)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
