"""The upstream client: one attempt = POST + timeouts + status classification + decoding into canonical chunks.

This is the transport seam (the role of an httpx transport): the proxy asks for a response and iterates canonical
(OpenAI chat.completion.chunk) dicts; everything about sockets, time limits, HTTP statuses, compression, SSE framing
and a provider's stream format stays here, behind `UpstreamError` subclasses (gateway/errors.py). It knows nothing
of the inbound server, so any caller (HTTP handler, batch runner, test) can use it.

Limits, so no upstream can hurt the gateway: a non-streamed body larger than `max_body` and a single SSE event
larger than `max_event` end the attempt with a 502 (`upstream_response_too_large`; not retried, and not counted
against the upstream's health: a client asking for a huge answer is not the upstream's fault). Compressed responses
(gzip/deflate, which a proxy in front of an upstream may add) are decompressed; the limits apply to decoded bytes.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from gateway.dialects.anthropic_wire import UpstreamStreamError
from gateway.dialects.sse import Event, SSEDecoder
from gateway.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamStatusError,
    UpstreamTimeout,
)
from gateway.observability.redact import scrub
from gateway.reliability import deadlines
from gateway.upstream.base import StreamDecoder
from gateway.upstream.h1 import H1Pool, H1Response

_RETRYABLE_STATUS = frozenset({401, 403, 404, 408, 409, 429, 500, 502, 503, 504, 529})
_MAX_ERROR_BODY = 64 * 1024
#: Named SSE events that end a stream (Anthropic Messages, OpenAI Responses); OpenAI chat ends with [DONE].
_END_EVENTS = frozenset({"message_stop", "response.completed", "response.incomplete"})
MAX_RETRY_AFTER = 300.0  # an upstream cannot park itself (or be parked) for longer than this per 429


class UpstreamTooLarge(UpstreamError):
    """The response outgrew the gateway's limit: a clean 502, not retried, not the upstream's health."""

    retryable = False
    blames_upstream = False


@dataclass(slots=True)
class Timeouts:
    first: float  # seconds from the attempt's start to response headers and, for streams, the first chunk
    idle: float  # seconds between two reads of a stream
    deadline: float  # monotonic time by which the whole attempt must be over


@dataclass(slots=True)
class Frame:
    """One upstream SSE event and the canonical chunks it decoded to."""

    event: Event
    chunks: list[dict]


class Reply(Protocol):
    """A 2xx upstream response being read (the transport seam's response side)."""

    terminated: bool

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def body(self, deadline: float) -> tuple[bytes, dict]: ...

    def frames(self, decoder: StreamDecoder, t: Timeouts) -> AsyncIterator[Frame]: ...

    def close(self, clean: bool) -> None: ...


class Transport(Protocol):
    """What the proxy needs from an upstream client: one POST that yields a Reply or raises an UpstreamError."""

    async def send(self, name: str, url: str, data: bytes, headers: Mapping[str, str], limit: float) -> Reply: ...


class _Request(aiohttp.ClientRequest):
    """aiohttp's request without its User-Agent ("Python/3.x aiohttp/3.y": an upstream need not learn the gateway's
    stack). `skip_auto_headers=("User-Agent",)` does the same, but copies every request's headers to do it."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        for name, value in self.DEFAULT_HEADERS.items():
            if name not in self.headers:
                self.headers[name] = value


class UpstreamClient:
    """The Transport. Plain-http upstreams go through the lean keep-alive pool (gateway/upstream/h1.py), https
    ones through the pooled aiohttp ClientSession; one of each per process, reused by every attempt."""

    def __init__(self, connect_timeout: float, max_body: int, max_event: int) -> None:
        self.connect_timeout = connect_timeout
        self.max_body = max_body
        self.max_event = max_event
        self.session: aiohttp.ClientSession | None = None
        self.h1 = H1Pool(connect_timeout)

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(
            connector=conn,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout),
            auto_decompress=True,
            request_class=_Request,  # no User-Agent
            # One session serves every client: a cookie an upstream set must not ride along on other clients'
            # requests (cookies are never forwarded, headers.py); and no jar to filter on every attempt.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def stop(self) -> None:
        self.h1.close()
        if self.session:
            await self.session.close()

    async def send(self, name: str, url: str, data: bytes, headers: Mapping[str, str], limit: float) -> UpstreamResponse:
        """POST and wait (at most `limit` s) for a 2xx; any other status raises the matching UpstreamError."""
        assert self.session is not None, "UpstreamClient.start() was not awaited"
        try:
            async with deadlines.timeout(limit):
                resp: aiohttp.ClientResponse | H1Response
                if url.startswith("http://"):
                    resp = await self.h1.post(url, data, headers)
                else:
                    resp = await self.session.post(url, data=data, headers=headers, allow_redirects=False)
        except TimeoutError:  # first: TimeoutError is an OSError (and aiohttp's timeouts are both)
            raise UpstreamTimeout(f"upstream {name} did not answer in time", code="upstream_timeout") from None
        except (aiohttp.ClientError, HttpProcessingError, OSError) as e:
            raise UpstreamConnectError(f"upstream {name} unreachable ({type(e).__name__})", code="upstream_connect_error") from None
        if not 200 <= resp.status < 300:
            try:
                raise await _status_error(name, resp)
            finally:
                resp.close()
        return UpstreamResponse(name, resp, self)


class UpstreamResponse:
    """A 2xx response being read: `body()` once, or `frames()` once; then `close(clean)`."""

    __slots__ = ("_client", "_resp", "name", "terminated")

    def __init__(self, name: str, resp: aiohttp.ClientResponse | H1Response, client: UpstreamClient) -> None:
        self.name = name
        self._resp = resp
        self._client = client
        #: The stream ended with its dialect's end marker ([DONE] or message_stop), not just a closed connection.
        self.terminated = False

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._resp.headers

    def close(self, clean: bool) -> None:
        """Return a fully read connection to the pool; close a half-read one (the upstream sees the disconnect)."""
        if clean:
            self._resp.release()
        else:
            self._resp.close()

    async def body(self, deadline: float) -> tuple[bytes, dict]:
        """The whole body (bounded in size and time) and its JSON object."""
        content = self._resp.content
        raw: bytes | None
        try:
            if content.is_eof():  # a small body arrives with the headers: all buffered, one read, no timer to arm
                raw = content.read_nowait()
                raw = raw if len(raw) <= self._client.max_body else None
            else:
                async with deadlines.timeout(max(0.0, deadline - time.monotonic())):
                    raw = await _read_bounded(content, self._client.max_body)
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {self.name} timed out", code="upstream_timeout") from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamConnectError(f"upstream {self.name} failed mid-response ({type(e).__name__})", code="upstream_disconnected") from None
        if raw is None:
            raise UpstreamTooLarge(f"upstream {self.name} sent a body larger than {self._client.max_body} bytes", code="upstream_response_too_large")
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            raise UpstreamProtocolError(f"upstream {self.name} returned an invalid response body", code="upstream_bad_response") from None
        return raw, data

    async def frames(self, decoder: StreamDecoder, t: Timeouts) -> AsyncIterator[Frame]:
        """Decoded SSE events until the stream ends ([DONE], message_stop or a clean close after a finish)."""
        sse = SSEDecoder()
        content = self._resp.content
        first_by = time.monotonic() + t.first
        got_chunk = False
        while True:
            piece = await self._read(content, min(t.deadline, first_by) if not got_chunk else t.deadline, t.idle)
            events = sse.feed(piece) if piece else sse.tail()
            if sse.pending > self._client.max_event:
                raise UpstreamTooLarge(f"upstream {self.name} sent an event larger than {self._client.max_event} bytes", code="upstream_response_too_large")
            for ev in events:
                if ev.data == b"[DONE]":
                    self.terminated = True
                    return
                frame = Frame(ev, _decode(self.name, decoder, ev))
                got_chunk = got_chunk or bool(frame.chunks)
                yield frame
                if ev.event in _END_EVENTS:
                    self.terminated = True
                    return
            if not piece:
                return

    async def _read(self, content: aiohttp.StreamReader, limit: float, idle: float) -> bytes:
        now = time.monotonic()
        if now >= limit:
            raise UpstreamTimeout(f"upstream {self.name} timed out", code="upstream_timeout")
        try:
            async with deadlines.timeout(min(limit - now, idle)):
                return await content.readany()
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {self.name} timed out", code="upstream_timeout") from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamConnectError(f"upstream {self.name} stream broke ({type(e).__name__})", code="upstream_disconnected") from None


def _decode(name: str, decoder: StreamDecoder, ev: Event) -> list[dict]:
    try:
        chunks = decoder.feed(ev)
    except UpstreamStreamError as e:
        raise UpstreamStatusError(f"upstream {name}: {scrub(str(e.message))[:500]}", code="upstream_stream_error") from None
    except Exception:  # valid SSE, but not the chunks this dialect promises
        raise UpstreamProtocolError(f"upstream {name} sent an invalid event", code="upstream_bad_response") from None
    for c in chunks:
        if "error" in c and "choices" not in c:
            msg = error_message(json.dumps(c).encode())
            raise UpstreamStatusError(f"upstream {name}: {msg}", code="upstream_stream_error")
    return chunks


async def _read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The rest of the body, or None as soon as it passes `limit` bytes (nothing more is buffered)."""
    parts: list[bytes] = []
    size = 0
    while piece := await content.readany():
        size += len(piece)
        if size > limit:
            return None
        parts.append(piece)
    return b"".join(parts)


async def _status_error(name: str, resp: aiohttp.ClientResponse | H1Response) -> UpstreamError:
    """Turn an upstream HTTP error into the matching exception (the body's message scrubbed of secrets)."""
    try:
        async with asyncio.timeout(10.0):
            body = await resp.content.read(_MAX_ERROR_BODY)
    except (aiohttp.ClientError, OSError, TimeoutError):
        body = b""
    message = error_message(body)
    st = resp.status
    if st == 429:
        ra = retry_after(resp.headers)
        return UpstreamRateLimited(f"upstream {name} rate limited: {message}", code="rate_limited", retry_after=ra or 1.0)
    if st < 200 or 300 <= st < 400:
        return UpstreamStatusError(f"upstream {name} answered {st} (redirects are not followed)", code="upstream_bad_response")
    if st in _RETRYABLE_STATUS or st >= 500:
        ra = retry_after(resp.headers) if st in (503, 529) else None
        status = 504 if st in (408, 504) else 502
        return UpstreamStatusError(f"upstream {name} returned {st}: {message}", code=f"upstream_{st}", status=status, retry_after=ra)
    # The request itself is bad (400, 413, 422 ...): the client should see it; no retry.
    return UpstreamRejected(message, code="upstream_rejected", status=st)


def error_message(body: bytes) -> str:
    """The upstream's error text, shortened and scrubbed of secrets (it reaches clients, logs and spans)."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        msg = err.get("message") if isinstance(err, dict) else str(err)
        return scrub(str(msg))[:500] if msg else "no message"  # scrub first: a cut secret would not match
    except (ValueError, AttributeError, RecursionError):
        return scrub(body.decode(errors="replace"))[:200] or "empty body"


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from retry-after-ms / Retry-After (seconds or HTTP-date); capped, None when absent or unreadable."""
    secs: float | None = None
    v = headers.get("retry-after-ms")
    if v:
        try:
            secs = float(v) / 1000
        except ValueError:
            pass
    v = headers.get("Retry-After")
    if secs is None and v:
        try:
            secs = float(v)
        except ValueError:
            try:  # HTTP-date form
                secs = parsedate_to_datetime(v).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                secs = None
    if secs is None or not math.isfinite(secs):
        return None
    return min(max(0.0, secs), MAX_RETRY_AFTER)
