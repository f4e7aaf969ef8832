"""Anthropic Messages upstream: translates canonical chat requests and responses (see anthropic_wire)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from gateway.dialects.anthropic_wire import MessagesStreamToChat, chat_request_to_messages, messages_response_to_chat
from gateway.dialects.sse import Event
from gateway.upstream.base import Provider, compact_json

if TYPE_CHECKING:
    from gateway.config import UpstreamConfig

ANTHROPIC_VERSION = "2023-06-01"
#: Canonical chat fields chat_request_to_messages translates (or the gateway itself consumes: service_tier is the
#: service class, prompt_cache_key the stickiness key). Any other field set to a non-default value is unsupported.
TRANSLATED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls", "user", "service_tier", "prompt_cache_key",
})
#: Values that ask for nothing beyond what Anthropic does anyway.
_DEFAULTS: dict[str, tuple] = {
    "n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,),
    "response_format": ({"type": "text"},), "store": (False,), "metadata": ({},), "logit_bias": ({},),
}


class AnthropicProvider(Provider):
    kind = "anthropic"
    dialect = "anthropic"
    telemetry_name = "anthropic"

    def health_url(self, up: UpstreamConfig) -> str:
        return up.base_url + ("/models" if up.base_url.endswith("/v1") else "/v1/models")

    def supports(self, operation: str) -> bool:
        return operation == "chat"

    def url(self, up: UpstreamConfig, operation: str) -> str:
        return up.base_url + ("/messages" if up.base_url.endswith("/v1") else "/v1/messages")

    def headers(self, up: UpstreamConfig, key: str | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        key = key or up.api_key()
        if key:
            h["x-api-key"] = key
        return h

    def unsupported(self, body: dict) -> list[str]:
        return [k for k, v in body.items() if k not in TRANSLATED and v is not None and v not in _DEFAULTS.get(k, ())]

    def encode_request(self, operation: str, body: dict, upstream_model: str) -> bytes:
        return compact_json(chat_request_to_messages(body, upstream_model))

    def decode_response(self, data: dict, model: str) -> dict:
        return messages_response_to_chat(data, model)

    def stream_decoder(self, model: str, include_usage: bool) -> _Decoder:
        return _Decoder(MessagesStreamToChat(model, include_usage=True))


class _Decoder:
    __slots__ = ("_t",)

    def __init__(self, t: MessagesStreamToChat) -> None:
        self._t = t

    def feed(self, ev: Event) -> list[dict]:
        if not ev.data:
            return []
        data = json.loads(ev.data)
        return self._t.feed(ev.event or data.get("type", ""), data)

    def finish(self) -> list[dict]:
        return self._t.finish()
