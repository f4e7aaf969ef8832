"""Client wire formats ("dialects"): how a canonical (OpenAI-shaped) response is written back to the client.

The gateway's canonical format is OpenAI's chat/completions/embeddings. A dialect turns canonical chunks into the
client's stream events (`stream`) and a canonical response into the client's body (`body`). Registered by name in
DIALECTS; `RequestContext.dialect` names the client's. Upstream-side formats live in gateway/upstream/.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

from gateway.dialects.anthropic_wire import chat_response_to_messages
from gateway.dialects.client_stream import AnthropicClientStream, ClientStream, OpenAIClientStream, ResponsesClientStream
from gateway.dialects.responses import ResponseMeta, chat_to_response

if TYPE_CHECKING:
    from gateway.context import RequestContext

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Dialect(Protocol):
    name: str

    def stream(self, ctx: RequestContext) -> ClientStream: ...

    def body(self, ctx: RequestContext, data: dict) -> bytes: ...


class OpenAIDialect:
    name = "openai"

    def stream(self, ctx: RequestContext) -> ClientStream:
        return OpenAIClientStream(ctx.include_usage)

    def body(self, ctx: RequestContext, data: dict) -> bytes:
        return _dumps(data).encode()


class AnthropicDialect:
    name = "anthropic"

    def stream(self, ctx: RequestContext) -> ClientStream:
        return AnthropicClientStream(ctx.model, ctx.est.prompt_tokens)

    def body(self, ctx: RequestContext, data: dict) -> bytes:
        return _dumps(chat_response_to_messages(data, ctx.model)).encode()


class ResponsesDialect:
    """OpenAI's Responses API (/v1/responses): the handler puts the request's ResponseMeta in ctx.extras."""

    name = "responses"

    def stream(self, ctx: RequestContext) -> ClientStream:
        return ResponsesClientStream(responses_meta(ctx))

    def body(self, ctx: RequestContext, data: dict) -> bytes:
        return _dumps(chat_to_response(data, responses_meta(ctx))).encode()


def responses_meta(ctx: RequestContext) -> ResponseMeta:
    meta = ctx.extras.get("responses")
    if not isinstance(meta, ResponseMeta):
        raise TypeError("a responses-dialect request needs its ResponseMeta in ctx.extras['responses']")
    return meta


DIALECTS: dict[str, Dialect] = {d.name: d for d in (OpenAIDialect(), AnthropicDialect(), ResponsesDialect())}
