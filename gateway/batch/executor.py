"""The default executor: POST each line to this gateway's own public endpoint over 127.0.0.1.

It goes through the whole request path (auth is bypassed with a per-process token, see http/app.py), and marks
the request `X-Gateway-Class: batch` for the service-class work. The lead's proxy redesign replaces this with an
in-process call; the worker only knows the `Execute` signature.
"""

from __future__ import annotations

import json

import aiohttp
from opentelemetry.propagate import inject

from gateway.batch.models import ExecRequest, ExecResult, new_id

#: Header carrying the per-process token that lets the loopback executor past the API-key check.
INTERNAL_HEADER = "X-Gateway-Batch-Token"
OWNER_HEADER = "X-Gateway-Batch-Owner"


class LoopbackExecutor:
    def __init__(self, base_url: str, token: str, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def __call__(self, req: ExecRequest) -> ExecResult:
        headers = {"X-Gateway-Class": "batch", INTERNAL_HEADER: self.token, "Content-Type": "application/json"}
        if req.owner:
            headers[OWNER_HEADER] = req.owner
        inject(headers)  # the current batch-line span becomes the parent of the request path's span
        url = self.base_url + req.endpoint
        async with self._client().post(url, data=json.dumps(req.body), headers=headers) as r:
            raw = await r.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": {"message": raw[:500].decode("utf-8", "replace"), "type": "server_error"}}
            if not isinstance(body, dict):
                body = {"data": body}
            rid = r.headers.get("x-request-id") or str(body.get("id") or "") or new_id("req")
            return ExecResult(r.status, body, rid)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def loopback_executor(base_url: str, token: str, timeout: float = 600.0) -> LoopbackExecutor:
    return LoopbackExecutor(base_url, token, timeout)
