"""The HTTP implementation of the proxy's ResponseWriter: an aiohttp response (whole, or an SSE stream)."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from gateway.writers import ClientGone

#: Set on the request once stream headers went out: from then on errors must go in-band (the middleware
#: must not try to write a second response).
STREAMING = web.RequestKey("gw_streaming", bool)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class HttpWriter:
    __slots__ = ("_request", "response", "started")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.started = False
        self.response: web.StreamResponse | None = None

    async def send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.response = web.Response(status=status, body=body, headers=headers)

    async def open_stream(self, headers: Mapping[str, str]) -> None:
        resp = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        self._request[STREAMING] = True
        self.started = True
        self.response = resp
        await resp.prepare(self._request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        try:
            await self.response.write(data)
        except ConnectionResetError as e:
            raise ClientGone(str(e)) from None

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self._request.transport is not None:
            self._request.transport.abort()
