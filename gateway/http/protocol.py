"""HTTP-level errors that happen before any handler runs: the parser's answer and its log line.

aiohttp's parser answers a malformed request (bad method line, oversized request line or header, bad chunking,
invalid header bytes) itself, through `RequestHandler.handle_error`: a text/plain 400 whose body echoes the parser
message (which quotes the request's own bytes) and an ERROR log line with a traceback per request, so any
unauthenticated client could fill the log. `GatewayRequestHandler` overrides that one seam:

- the answer is an OpenAI-shaped JSON error with a fixed message (the error class, never request bytes), and the
  connection is closed (after a parse error the byte stream cannot be trusted; a pipelined request behind the
  garbage is not answered, the close tells the client);
- the log line is one WARNING per peer address per `LOG_INTERVAL` seconds, without traceback or request bytes,
  and the memory for that is bounded (`MAX_PEERS`);
- a request body that fails to decode (bad gzip/deflate) is answered by the handler (api.read_json: a JSON 400);
  aiohttp then trips over the same broken payload while discarding the rest of it and logs "Unhandled exception"
  with a traceback: that is logged here like a parse error instead.

An `Expect` header other than 100-continue is refused before any middleware runs, by the route's expect handler;
aiohttp's default answers text/plain and quotes the header: `install_expect_handler` swaps in a JSON 417.

Errors raised by handlers (status 500 after the response started) keep aiohttp's own behaviour. `GatewayRunner` is
an `AppRunner` whose server builds these handlers; use it (or `make_runner`) wherever the gateway app is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

log = logging.getLogger("gateway.http.protocol")

LOG_INTERVAL = 60.0
MAX_PEERS = 4096


class PeerLogLimiter:
    """At most one log line per peer per interval; forgets everything when it tracks too many peers."""

    def __init__(self, interval: float = LOG_INTERVAL, max_peers: int = MAX_PEERS) -> None:
        self.interval = interval
        self.max_peers = max_peers
        self._last: dict[str, float] = {}
        self.suppressed = 0

    def allow(self, peer: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(peer)
        if last is not None and now - last < self.interval:
            self.suppressed += 1
            return False
        if len(self._last) >= self.max_peers:
            self._last.clear()  # bounded memory; at worst one more line per peer
        self._last[peer] = now
        return True


LIMITER = PeerLogLimiter()


def error_body(status: int, exc: BaseException) -> bytes:
    """A fixed, OpenAI-shaped error: the parser's class name only (its message quotes the request's bytes)."""
    kind = type(exc).__name__
    return json.dumps({"error": {
        "message": f"malformed HTTP request ({kind}); the connection is closed",
        "type": "invalid_request_error", "param": None, "code": "bad_http_request",
    }}).encode()


def _log_limited(peer: str, what: str, status: int) -> None:
    if LIMITER.allow(peer):
        log.warning(
            "malformed HTTP request from %s: %s (status %d); more from this peer in the next %.0fs are not logged",
            peer, what, status, LIMITER.interval,
        )


class GatewayRequestHandler(RequestHandler):
    __slots__ = ()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, (HttpProcessingError, RequestPayloadError)):  # the client's broken bytes, not our bug
            _log_limited(_peer(self), type(exc).__name__, 400)
            return
        super().log_exception(*args, **kw)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        _log_limited(_peer(self), type(exc).__name__, status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error response")
        code = exc.code if isinstance(exc.code, int) and 400 <= exc.code < 500 else 400
        resp = web.Response(status=code, body=error_body(code, exc), content_type="application/json")
        resp.force_close()
        return resp


def _peer(handler: RequestHandler) -> str:
    tr = handler.transport
    info = tr.get_extra_info("peername") if tr is not None else None
    if isinstance(info, (tuple, list)) and info:
        return str(info[0])
    return "unknown"


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """100-continue as aiohttp does it; any other expectation: a JSON 417 that does not quote the header."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != (1, 1):
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # type: ignore[attr-defined]  # the real response has not started
        return None
    body = json.dumps({"error": {
        "message": "unsupported Expect header: only '100-continue' is supported",
        "type": "invalid_request_error", "param": None, "code": "expectation_failed",
    }}).encode()
    resp = web.Response(status=417, body=body, content_type="application/json")
    resp.force_close()  # the body was never read
    return resp


def install_expect_handler(app: web.Application) -> None:
    """Use `expect_handler` on every route of `app` (aiohttp has no app-wide setting for it)."""
    for route in app.router.routes():
        route._expect_handler = expect_handler  # type: ignore[attr-defined]


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """AppRunner whose connections use GatewayRequestHandler (same arguments as web.AppRunner)."""

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _Server(
            base.request_handler, request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation, loop=asyncio.get_running_loop(), **base._kwargs,
        )
