"""A lean HTTP/1.1 keep-alive client for plain-http upstreams: the send path without `ClientSession._request`.

Why: for a non-streamed request the gateway's own Python work per request is small, and aiohttp's client request
machinery (ClientRequest, payload registry, connector, tracing hooks, writer task, ClientResponse) was its biggest
single item in a profile. Here a request is one preformatted head plus the body written to a pooled connection,
and the response is read by aiohttp's own protocol (`ResponseHandler`, with aiohttp's C HTTP parser): status,
headers, chunked/length framing, gzip/deflate decoding, keep-alive and `should_close` rules are aiohttp's, and the
body is an aiohttp `StreamReader`, so everything that reads a response is the same for both paths.

Scope: `http://` URLs only. TLS upstreams keep the full aiohttp client (the gateway never uses proxies: its
session does not trust the environment). No User-Agent is sent (an upstream need not learn the gateway's stack),
no cookies are kept (one pool serves every client).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from functools import lru_cache

from aiohttp import ClientConnectionError
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.reliability import deadlines

#: Request headers added unless the caller set them (case-insensitively). No User-Agent, on purpose.
_DEFAULTS = (("accept", "Accept", "*/*"), ("accept-encoding", "Accept-Encoding", "gzip, deflate"))


@lru_cache(maxsize=1024)
def target(url: str) -> tuple[str, int, str, str]:
    """(host, port, Host header, request target) of an http:// URL; parsed once per distinct URL (upstream URLs
    come from the config, so there are few)."""
    u = URL(url)
    if u.scheme != "http" or not u.raw_host:
        raise ValueError(f"not a plain-http URL: {url!r}")
    port = u.port or 80
    host_header = u.raw_host if port == 80 else f"{u.raw_host}:{port}"
    if ":" in u.raw_host:  # IPv6 literal
        host_header = f"[{u.raw_host}]" if port == 80 else f"[{u.raw_host}]:{port}"
    return u.raw_host, port, host_header, u.raw_path_qs or "/"


def request_head(host_header: str, path: str, headers: Mapping[str, str], length: int) -> bytes:
    """The request line and headers of a POST with a `length`-byte body. A CR or LF in a header is refused (it
    would let a value inject headers), as aiohttp's writer does."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host_header}"]
    seen = set()
    for k, v in headers.items():
        if "\r" in k or "\n" in k or "\r" in v or "\n" in v or ":" in k:
            raise ValueError(f"invalid character in request header {k!r}")
        low = k.lower()
        if low in ("host", "content-length", "transfer-encoding", "connection"):
            continue  # framing and routing are this client's job
        seen.add(low)
        lines.append(f"{k}: {v}")
    for low, name, value in _DEFAULTS:
        if low not in seen:
            lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "\r\n".join(lines).encode("latin-1")


class H1Response:
    """A response being read: the subset of `aiohttp.ClientResponse` the upstream client uses."""

    __slots__ = ("_key", "_pool", "_proto", "content", "headers", "status")

    def __init__(self, pool: H1Pool, key: tuple[str, int], proto: ResponseHandler, status: int,
                 headers: CIMultiDictProxy[str], content: StreamReader) -> None:
        self._pool = pool
        self._key = key
        self._proto: ResponseHandler | None = proto
        self.status = status
        self.headers = headers
        self.content = content

    def release(self) -> None:
        """Back to the pool when the body was read to its end and the connection may be reused; else closed."""
        proto, self._proto = self._proto, None
        if proto is not None:
            self._pool.put(self._key, proto)

    def close(self) -> None:
        """Close the connection (a half-read response: the upstream sees the disconnect and stops generating).

        A read still waiting on the body fails at once, as after `aiohttp.ClientResponse.close`: the protocol's
        close drops its payload before the connection is lost, so nothing else would wake that reader (a
        preempted stream's relay would sit until its idle timeout)."""
        proto, self._proto = self._proto, None
        if not self.content.is_eof() and self.content.exception() is None:
            self.content.set_exception(ClientConnectionError("Connection closed"))
        if proto is not None:
            self._pool.drop(proto)


class H1Pool:
    """Keep-alive connections per (host, port), most recently used first; idle ones expire after `keepalive` s."""

    def __init__(self, connect_timeout: float, keepalive: float = 30.0) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._idle: dict[tuple[str, int], deque[tuple[float, ResponseHandler]]] = {}
        self._live: set[ResponseHandler] = set()

    async def post(self, url: str, data: bytes, headers: Mapping[str, str]) -> H1Response:
        """Send a POST on a pooled (or new) connection and wait for the response's status and headers.

        Raises OSError / aiohttp.ClientError on connection failures, aiohttp's HttpProcessingError on a malformed
        response, TimeoutError when connecting takes longer than `connect_timeout`. On any failure or cancellation
        the connection is closed, never pooled."""
        host, port, host_header, path = target(url)
        head = request_head(host_header, path, headers, len(data))
        key = (host, port)
        proto = self._get(key)
        if proto is None:  # (not `or`: a ResponseHandler is a queue, falsy when empty)
            proto = await self._connect(host, port)
        try:
            assert proto.transport is not None
            proto.transport.writelines((head, data))
            message, payload = await proto.read()
        except BaseException:
            self.drop(proto)
            raise
        return H1Response(self, key, proto, message.code, message.headers, payload)

    def _get(self, key: tuple[str, int]) -> ResponseHandler | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        self._expire(idle)
        while idle:
            _, proto = idle.pop()
            if proto.is_connected():
                return proto
            self.drop(proto)
        return None

    async def _connect(self, host: str, port: int) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        async with deadlines.timeout(self.connect_timeout):
            _, proto = await loop.create_connection(lambda: ResponseHandler(loop), host, port)
        # One parser per connection, not per request (as aiohttp's server parses requests): the parameters never
        # change, and the C parser reads keep-alive responses one after another. A body without length or chunked
        # framing ends at EOF (as aiohttp's client reads it); such a connection is never pooled (should_close).
        proto.set_response_params(read_until_eof=True)
        self._live.add(proto)
        return proto

    def drop(self, proto: ResponseHandler) -> None:
        """Close a connection for good (every connection ends here, so `close()` knows the ones still open)."""
        self._live.discard(proto)
        proto.close()

    def put(self, key: tuple[str, int], proto: ResponseHandler) -> None:
        if proto.should_close or not proto.is_connected():
            self.drop(proto)
            return
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        self._expire(idle)
        idle.append((time.monotonic() + self.keepalive, proto))

    def _expire(self, idle: deque[tuple[float, ResponseHandler]]) -> None:
        now = time.monotonic()
        while idle and idle[0][0] <= now:
            self.drop(idle.popleft()[1])

    def close(self) -> None:
        """Close every connection, idle or in use."""
        for proto in list(self._live):
            proto.close()
        self._live.clear()
        self._idle.clear()
