"""Azure OpenAI: deployment-scoped URLs, api-version query, api-key header."""

from __future__ import annotations

from gateway.config import UpstreamConfig
from gateway.upstream.base import OPERATION_PATHS, Provider


class AzureProvider(Provider):
    kind = "azure"

    def url(self, up: UpstreamConfig, operation: str) -> str:
        return f"{up.base_url}/openai/deployments/{up.deployment}{OPERATION_PATHS[operation]}?api-version={up.api_version}"

    def headers(self, up: UpstreamConfig, key: str | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        key = key or up.api_key()
        if key:
            h["api-key"] = key
        return h
