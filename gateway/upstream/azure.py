"""Azure OpenAI: deployment-scoped URLs, api-version query, api-key header."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.upstream.base import OPERATION_PATHS, Provider

if TYPE_CHECKING:
    from gateway.config import UpstreamConfig


class AzureProvider(Provider):
    kind = "azure"
    telemetry_name = "azure.ai.openai"
    aliases = ("azure_openai", "azure-openai", "azure.openai")

    def health_url(self, up: UpstreamConfig) -> str:
        return f"{up.base_url}/openai/models?api-version={up.api_version}"

    def url(self, up: UpstreamConfig, operation: str) -> str:
        return f"{up.base_url}/openai/deployments/{up.deployment}{OPERATION_PATHS[operation]}?api-version={up.api_version}"

    def headers(self, up: UpstreamConfig, key: str | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        key = key or up.api_key()
        if key:
            h["api-key"] = key
        return h
