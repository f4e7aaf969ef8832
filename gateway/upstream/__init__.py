"""Upstream provider adapters: where a provider's wire format and auth are handled."""

from __future__ import annotations

from gateway.upstream.anthropic import AnthropicProvider
from gateway.upstream.azure import AzureProvider
from gateway.upstream.base import Provider
from gateway.upstream.openai import OpenAIProvider

_PROVIDERS: dict[str, Provider] = {
    "openai": OpenAIProvider(),
    "azure": AzureProvider(),
    "anthropic": AnthropicProvider(),
}


def provider_for(kind: str) -> Provider:
    return _PROVIDERS[kind]


__all__ = ["Provider", "provider_for"]
