"""In-process calls through the full request path (routing, retries, measurement, traces), without HTTP.

For work that has no connected client: the batch runner, health probes, tests. The body is validated exactly as
the HTTP endpoints validate it; errors come back as GatewayError, a response as an InProcessWriter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.http.validation import build_context, messages_context, validate
from gateway.proxy import Proxy
from gateway.upstream.base import OPERATION_PATHS
from gateway.writers import InProcessWriter


async def call(
    proxy: Proxy,
    operation: str,
    body: dict,
    *,
    service_class: str = "batch",
    principal: Any = None,
    headers: Mapping[str, str] | None = None,
) -> InProcessWriter:
    """Run one request to completion: `operation` chat | text_completion | embeddings (OpenAI dialect), or
    messages (Anthropic dialect, answered in Anthropic's shape)."""
    if operation == "messages":
        ctx = messages_context(body, headers=headers)
    else:
        validate(operation, body)
        ctx = build_context(operation, body, headers=headers, path="/v1" + OPERATION_PATHS[operation])
    ctx.service_class = service_class
    ctx.principal = principal
    writer = InProcessWriter()
    await proxy.handle(ctx, writer)
    return writer
