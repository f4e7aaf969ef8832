"""Upstream provider adapters: where a provider's wire format and auth are handled."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.upstream.anthropic import AnthropicProvider
from gateway.upstream.azure import AzureProvider
from gateway.upstream.base import Provider
from gateway.upstream.openai import OpenAIProvider
from gateway.upstream.responses import ResponsesProvider

if TYPE_CHECKING:
    from gateway.config import UpstreamConfig

_PROVIDERS: dict[str, Provider] = {
    "openai": OpenAIProvider(),
    "azure": AzureProvider(),
    "anthropic": AnthropicProvider(),
}


_RESPONSES = ResponsesProvider()


def provider_for(kind: str) -> Provider:
    return _PROVIDERS[kind]


def provider_of(cfg: UpstreamConfig, native: str | None) -> Provider:
    """The adapter for one attempt. `native`: the dialect of the client's own body when the gateway kept it for
    pass-through; Responses requests then go untouched to upstreams that serve that API."""
    if native == "responses" and cfg.responses_api:
        return _RESPONSES
    return _PROVIDERS[cfg.provider]


__all__ = ["Provider", "provider_for", "provider_of"]
