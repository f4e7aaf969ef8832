"""Where a response goes: the writer interface the proxy talks to, and its in-process implementation.

The proxy never sees an HTTP server. It hands the response to a `ResponseWriter`: a whole body (`send`), or a stream
(`open_stream`, `write`..., `end`). The inbound HTTP layer implements it over an aiohttp response
(gateway/http/writer.py); `InProcessWriter` collects the response in memory, so a batch runner, a health probe or a
unit test takes exactly the same path (routing, retries, measurement, traces) as a client over HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Protocol


class ClientGone(ConnectionResetError):
    """The client went away or stopped reading: nobody to write to."""


class ResponseWriter(Protocol):
    #: Stream headers went out: from now on errors go in-band and nothing can be retried.
    started: bool

    async def send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        """A whole (non-streamed) response."""

    async def open_stream(self, headers: Mapping[str, str]) -> None:
        """Start an event stream (status 200)."""

    async def write(self, data: bytes) -> None:
        """Part of the stream; raises ClientGone when the client left."""

    async def end(self) -> None:
        """The stream is complete."""

    def abort(self) -> None:
        """Cut the client off (it stopped reading): frees the upstream slot it would otherwise hold."""


class InProcessWriter:
    """Collects the response: `status`, `headers`, `body` (the whole body, or the concatenated stream)."""

    __slots__ = ("_parts", "body", "complete", "headers", "started", "status")

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False
        self._parts: list[bytes] = []

    async def send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.status, self.body, self.headers, self.complete = status, body, dict(headers), True

    async def open_stream(self, headers: Mapping[str, str]) -> None:
        self.started, self.status, self.headers = True, 200, dict(headers)

    async def write(self, data: bytes) -> None:
        self._parts.append(data)

    async def end(self) -> None:
        self.body = b"".join(self._parts)
        self.complete = True

    def abort(self) -> None:
        self.body = b"".join(self._parts)

    def json(self) -> dict:
        """The non-streamed body as JSON."""
        data = json.loads(self.body)
        if not isinstance(data, dict):
            raise ValueError("the response body is not a JSON object")
        return data
