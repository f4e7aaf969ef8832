"""The provider adapter interface. The gateway's canonical wire format is OpenAI's."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

from gateway.dialects.sse import Event

if TYPE_CHECKING:  # config derives its provider kinds from this package: no import cycle at run time
    from gateway.config import UpstreamConfig

OPERATION_PATHS = {"chat": "/chat/completions", "text_completion": "/completions", "embeddings": "/embeddings"}

#: Made once: json.dumps with any keyword argument builds a new JSONEncoder for every call (one per attempt).
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def compact_json(obj: object) -> bytes:
    """``json.dumps(obj, separators=(",", ":")).encode()``: the request bodies sent upstream."""
    return _COMPACT.encode(obj).encode()


class StreamDecoder(Protocol):
    def feed(self, ev: Event) -> list[dict]:
        """Canonical chat.completion.chunk dicts for one upstream SSE event (may be empty)."""

    def finish(self) -> list[dict]: ...


class Provider:
    """One upstream wire format. Everything the rest of the gateway knows about a provider kind comes from here:
    the config's ``provider:`` values, the ``gen_ai.provider.name`` telemetry value and the health-probe path."""

    kind: str = "openai"
    #: The wire format spoken: when the client speaks it too, bytes are relayed untouched both ways.
    dialect: str = "openai"
    #: ``gen_ai.provider.name`` (GenAI semconv v1.41.0 well-known value) when the upstream sets no ``engine``.
    telemetry_name: str = "openai"
    #: Other spellings accepted as this provider's telemetry name (e.g. "azure_openai").
    aliases: tuple[str, ...] = ()

    def health_url(self, up: UpstreamConfig) -> str:
        """What the active health check GETs when the upstream has no ``metrics_url``: a cheap, auth-checked list."""
        return up.base_url + "/models"

    def supports(self, operation: str) -> bool:
        return operation in OPERATION_PATHS

    def url(self, up: UpstreamConfig, operation: str) -> str:
        return up.base_url + OPERATION_PATHS[operation]

    def headers(self, up: UpstreamConfig, key: str | None = None) -> dict[str, str]:
        """Request headers with the upstream's key (`key`: one the client brought, for `byok` upstreams)."""
        h = {"Content-Type": "application/json"}
        key = key or up.api_key()
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def unsupported(self, body: dict) -> list[str]:
        """Canonical request fields this upstream cannot honour (see gateway/upstream/policy.py); OpenAI-compatible
        upstreams take the canonical body as it is."""
        return []

    def encode_request(self, operation: str, body: dict, upstream_model: str) -> bytes:
        out = dict(body)
        out["model"] = upstream_model
        if out.get("stream") and operation != "embeddings":
            # Ask for usage so output tokens are exact; the relay drops the usage chunk if the client did not ask.
            opts = dict(out.get("stream_options") or {})
            opts["include_usage"] = True
            out["stream_options"] = opts
        return compact_json(out)

    def encode_native(self, body: dict, upstream_model: str) -> bytes:
        """The client's own body (same dialect as this provider), with only the model swapped."""
        out = dict(body)
        out["model"] = upstream_model
        return compact_json(out)

    def decode_response(self, data: dict, model: str) -> dict:
        """The canonical response. `model`: the name the upstream was asked for, used only when the upstream's
        answer names no model (the response `model` field is the serving model's own name: README)."""
        return data

    def stream_decoder(self, model: str, include_usage: bool) -> StreamDecoder:
        return OpenAIStreamDecoder()


class OpenAIStreamDecoder:
    __slots__ = ()

    def feed(self, ev: Event) -> list[dict]:
        if not ev.data or ev.data == b"[DONE]":
            return []
        return [json.loads(ev.data)]

    def finish(self) -> list[dict]:
        return []
