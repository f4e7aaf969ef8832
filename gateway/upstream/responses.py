"""Upstreams that serve OpenAI's Responses API themselves (`responses_api: true` on an OpenAI upstream).

A Responses request routed to such an upstream is passed through natively: the client's body (model swapped) goes
to `<base_url>/responses` and the upstream's response or event stream comes back untouched, so its ids,
`previous_response_id` state and any feature the gateway does not translate keep working. The gateway still decodes
what it needs into canonical chunks (text, tool calls, usage, finish) to measure and trace the attempt like any
other. Requests that go to other upstreams are translated (gateway/dialects/responses.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from gateway.dialects.anthropic_wire import UpstreamStreamError
from gateway.dialects.sse import Event
from gateway.upstream.openai import OpenAIProvider

if TYPE_CHECKING:  # the config imports the provider registry: no import of it at run time
    from gateway.config import UpstreamConfig

_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}


def _usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if not u:
        return None
    cached = (u.get("input_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "prompt_tokens": u.get("input_tokens") or 0, "completion_tokens": u.get("output_tokens") or 0,
        "total_tokens": u.get("total_tokens") or 0, "prompt_tokens_details": {"cached_tokens": cached},
    }


def _finish(resp: dict[str, Any]) -> str:
    if resp.get("status") == "incomplete":
        return _FINISH.get((resp.get("incomplete_details") or {}).get("reason") or "", "length")
    return "tool_calls" if any(o.get("type") == "function_call" for o in resp.get("output") or ()) else "stop"


def response_to_chat(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """A Response object as a canonical chat.completion (what measurement and tracing read)."""
    text = "".join(
        c.get("text") or "" for o in resp.get("output") or () if o.get("type") == "message" for c in o.get("content") or ()
    )
    return {
        "id": resp.get("id"), "object": "chat.completion", "model": resp.get("model") or model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(resp)}],
        "usage": _usage(resp.get("usage")),
    }


class ResponsesStreamDecoder:
    """Responses API events -> canonical chunks (for measurement; the client gets the upstream's own events)."""

    __slots__ = ("_calls", "model")

    def __init__(self, model: str) -> None:
        self.model = model
        self._calls: dict[int, int] = {}  # output_index -> tool call ordinal

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"object": "chat.completion.chunk", "model": self.model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            c["usage"] = usage
        return c

    def feed(self, ev: Event) -> list[dict]:
        if not ev.data:
            return []
        data = json.loads(ev.data)
        kind = data.get("type") or ev.event
        if kind == "response.output_text.delta" and data.get("delta"):
            return [self._chunk({"content": data["delta"]})]
        if kind == "response.output_item.added" and (data.get("item") or {}).get("type") == "function_call":
            item, n = data["item"], len(self._calls)
            self._calls[data.get("output_index", n)] = n
            call = {"index": n, "id": item.get("call_id"), "type": "function", "function": {"name": item.get("name"), "arguments": ""}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "response.function_call_arguments.delta" and data.get("delta"):
            n = self._calls.get(data.get("output_index", -1), 0)
            return [self._chunk({"tool_calls": [{"index": n, "function": {"arguments": data["delta"]}}]})]
        if kind in ("response.completed", "response.incomplete"):
            resp = data.get("response") or {}
            self.model = resp.get("model") or self.model
            return [self._chunk({}, _finish(resp), _usage(resp.get("usage")))]
        if kind in ("response.failed", "error"):
            err = (data.get("response") or {}).get("error") or data
            raise UpstreamStreamError(str(err.get("message") or "upstream response failed"), err.get("code"))
        return []

    def finish(self) -> list[dict]:
        return []


class ResponsesProvider(OpenAIProvider):
    dialect = "responses"

    def supports(self, operation: str) -> bool:
        return operation == "chat"

    def url(self, up: UpstreamConfig, operation: str) -> str:
        return up.base_url + "/responses"

    def decode_response(self, data: dict, model: str) -> dict:
        return response_to_chat(data, model)

    def stream_decoder(self, model: str, include_usage: bool) -> ResponsesStreamDecoder:
        return ResponsesStreamDecoder(model)
