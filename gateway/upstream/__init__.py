"""Upstream provider adapters: where a provider's wire format and auth are handled.

``PROVIDERS`` is the one registry of provider kinds: config validation (``provider:`` in the fleet YAML),
telemetry (``gen_ai.provider.name``) and the health checker all read it. Adding a provider = a class in this
package plus a line here (and its test).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.upstream.anthropic import AnthropicProvider
from gateway.upstream.azure import AzureProvider
from gateway.upstream.base import Provider
from gateway.upstream.openai import OpenAIProvider
from gateway.upstream.responses import ResponsesProvider

if TYPE_CHECKING:
    from gateway.config import UpstreamConfig

PROVIDERS: dict[str, Provider] = {p.kind: p for p in (OpenAIProvider(), AzureProvider(), AnthropicProvider())}
#: Not a configurable kind: the adapter for Responses requests passed through to `responses_api` upstreams.
_RESPONSES = ResponsesProvider()


def provider_for(kind: str) -> Provider:
    return PROVIDERS[kind]


def provider_kinds() -> tuple[str, ...]:
    return tuple(PROVIDERS)


def telemetry_provider_name(up: UpstreamConfig) -> str:
    """``gen_ai.provider.name`` of one upstream: its configured ``engine`` (vllm, sglang, tgi, llama.cpp, ollama ...)
    when set, else its provider class's semconv name (openai, azure.ai.openai, anthropic)."""
    return up.engine or PROVIDERS[up.provider].telemetry_name


def provider_of(cfg: UpstreamConfig, native: str | None) -> Provider:
    """The adapter for one attempt. `native`: the dialect of the client's own body when the gateway kept it for
    pass-through; Responses requests then go untouched to upstreams that serve that API."""
    if native == "responses" and cfg.responses_api:
        return _RESPONSES
    return PROVIDERS[cfg.provider]


__all__ = ["PROVIDERS", "Provider", "provider_for", "provider_kinds", "provider_of", "telemetry_provider_name"]
