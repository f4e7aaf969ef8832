"""Upstream provider adapters: where a provider's wire format and auth are handled."""

from __future__ import annotations

from .base import Provider
from .openai import OpenAIProvider
from .azure import AzureProvider
from .anthropic import AnthropicProvider

_PROVIDERS: dict[str, Provider] = {
    "openai": OpenAIProvider(),
    "azure": AzureProvider(),
    "anthropic": AnthropicProvider(),
}


def provider_for(kind: str) -> Provider:
    return _PROVIDERS[kind]


__all__ = ["Provider", "provider_for"]
