"""Writing a response stream to the client in the client's dialect (OpenAI or Anthropic SSE)."""

from __future__ import annotations

import json
from typing import Protocol

from gateway.dialects.anthropic_wire import ChatStreamToMessages, sse_event
from gateway.dialects.responses import ChatStreamToResponses, ResponseMeta
from gateway.dialects.sse import DONE, encode_data
from gateway.errors import GatewayError, sse_error_event

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class ClientStream(Protocol):
    def keeps(self, chunks: list[dict]) -> bool:
        """Whether an upstream frame of the same dialect carrying these chunks is relayed as is."""
        ...

    def chunk(self, c: dict) -> bytes: ...

    def done(self) -> bytes: ...

    def error(self, err: GatewayError) -> bytes: ...


class OpenAIClientStream:
    """Canonical chunks to OpenAI SSE. Raw upstream frames pass through untouched."""

    __slots__ = ("include_usage",)

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage

    def keeps(self, chunks: list[dict]) -> bool:
        """False for the usage-only chunk the gateway asked upstreams for when this client did not ask for it."""
        return self.include_usage or not chunks or not all(not c.get("choices") and "usage" in c for c in chunks)

    def chunk(self, c: dict) -> bytes:
        return encode_data(_dumps(c).encode()) if self.keeps([c]) else b""

    def done(self) -> bytes:
        return DONE

    def error(self, err: GatewayError) -> bytes:
        return sse_error_event(err)


class AnthropicClientStream:
    """Canonical chunks to Anthropic Messages SSE events."""

    __slots__ = ("_t",)

    def __init__(self, model: str, input_tokens: int) -> None:
        self._t = ChatStreamToMessages(model, input_tokens)

    def keeps(self, chunks: list[dict]) -> bool:
        return True

    def chunk(self, c: dict) -> bytes:
        return b"".join(sse_event(e, d) for e, d in self._t.feed(c))

    def done(self) -> bytes:
        return b"".join(sse_event(e, d) for e, d in self._t.finish())

    def error(self, err: GatewayError) -> bytes:
        return sse_event("error", err.anthropic_body())


class ResponsesClientStream:
    """Canonical chunks to the Responses API event stream (response.created ... response.completed)."""

    __slots__ = ("_t",)

    def __init__(self, meta: ResponseMeta) -> None:
        self._t = ChatStreamToResponses(meta)

    def keeps(self, chunks: list[dict]) -> bool:
        return True

    def chunk(self, c: dict) -> bytes:
        return self._t.feed(c)

    def done(self) -> bytes:
        return self._t.done()

    def error(self, err: GatewayError) -> bytes:
        # Response.error.code is a closed set in the API: the gateway's own code goes in the message.
        code = "rate_limit_exceeded" if err.status == 429 else "server_error"
        return self._t.failed(code, f"{err.message} ({err.code})" if err.code else err.message)
