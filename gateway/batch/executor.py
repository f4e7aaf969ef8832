"""The executor: each batch line goes through the gateway's own request path in-process (gateway/inprocess.py),
in the `batch` service class, so it is routed, retried, measured and traced like any request, and only takes the
capacity interactive traffic leaves free (gateway/routing/classes.py). No HTTP, no socket, no auth bypass."""

from __future__ import annotations

from opentelemetry.propagate import inject

from gateway import inprocess
from gateway.batch.models import ExecRequest, ExecResult, new_id
from gateway.errors import GatewayError
from gateway.proxy import Proxy

#: Batch endpoint path -> the request path's operation.
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/embeddings": "embeddings",
              "/v1/messages": "messages"}


class InProcessExecutor:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def __call__(self, req: ExecRequest) -> ExecResult:
        headers: dict[str, str] = {}
        inject(headers)  # the current batch-line span becomes the parent of the request path's span
        body = {**req.body, "stream": False}  # a batch line is answered whole
        try:
            w = await inprocess.call(self.proxy, OPERATIONS[req.endpoint], body, service_class="batch", headers=headers)
        except GatewayError as e:
            return ExecResult(e.status, e.body_for("anthropic" if req.endpoint == "/v1/messages" else "openai"), new_id("req"))
        try:
            data = w.json()
        except ValueError:
            data = {"error": {"message": "the upstream answer is not a JSON object", "type": "server_error"}}
        return ExecResult(w.status, data, w.headers.get("x-request-id") or new_id("req"))
