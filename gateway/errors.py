"""One exception tree for everything that can go wrong on the request path (the pattern of httpx's exceptions).

GatewayError            what the client sees: status, message, OpenAI `code`/`param`, Retry-After
├── UpstreamError       one attempt on one upstream failed; `retryable` says whether another upstream may serve it
│   ├── UpstreamConnectError   connect refused/reset, DNS (502)
│   ├── UpstreamTimeout        no answer / no first token / idle stream / total deadline (504)
│   ├── UpstreamRateLimited    429 (or 503/529 with Retry-After): busy, not broken (429)
│   ├── UpstreamStatusError    a 5xx or other retryable status (502/504)
│   ├── UpstreamProtocolError  a body or event that is not what the dialect promises, or too large (502)
│   └── UpstreamRejected       the upstream refused the request itself (400, 413, 422...): the client's fault,
│                              the upstream is healthy, never retried
├── ClientDisconnected (499)   the client left; recorded on spans and metrics, never answered
├── Preempted (503)            the gateway ended a batch attempt for an interactive request; resumed, never answered
└── (plain GatewayError)       refused by the gateway: validation, auth, limits, queue

Whether to retry is a property of the exception (`retryable`), and whether the upstream is to blame (`blames_upstream`)
feeds outlier detection; nothing on the path compares error strings. The HTTP layer turns any of these into an
OpenAI- or Anthropic-shaped JSON body (gateway/http/errors.py); this module does not know about HTTP servers.
"""

from __future__ import annotations

import json
import math

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class GatewayError(Exception):
    """A failure with the status and body the client gets."""

    #: Another upstream may serve the same request.
    retryable = False
    #: The upstream misbehaved (outlier detection counts it); False for the client's own faults.
    blames_upstream = False

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        #: Extra response headers (e.g. x-ratelimit-* on a gateway key's 429).
        self.extra_headers = headers
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    @property
    def error_type(self) -> str:
        """The `error.type` of spans and metrics: the code when there is one, else the status."""
        return self.code or str(self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """The same error in Anthropic's shape, for clients of /v1/messages."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def body_for(self, dialect: str) -> dict:
        return self.anthropic_body() if dialect == "anthropic" else self.body()

    def headers(self) -> dict[str, str]:
        out = dict(self.extra_headers) if self.extra_headers else {}
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


class UpstreamError(GatewayError):
    """One attempt failed because of the upstream (before or after the first byte reached the client)."""

    retryable = True
    blames_upstream = True
    status_default = 502

    def __init__(self, message: str, *, code: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(status or self.status_default, message, code=code, retry_after=retry_after)


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    status_default = 504


class UpstreamRateLimited(UpstreamError):
    """Busy, not broken: it may serve the retry once its cooldown is over; not an outlier."""

    status_default = 429
    blames_upstream = False


class UpstreamStatusError(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    pass


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself: the client sees the upstream's status, nobody retries."""

    retryable = False
    blames_upstream = False

    @property
    def error_type(self) -> str:
        return str(self.status)


class ClientDisconnected(GatewayError):
    """The client went away (or stopped reading and was cut off) before its response was complete."""

    def __init__(self) -> None:
        super().__init__(499, "the client disconnected", code="client_disconnected")


def sse_error_event(err: GatewayError) -> bytes:
    """The SSE frame sent when a stream fails after the first byte reached the client."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"


class Preempted(GatewayError):
    """The gateway ended this attempt to give its slot to a request of a class with targets
    (gateway/routing/preempt.py); the proxy resumes the request as a continuation, the client never sees this."""

    def __init__(self, upstream: str) -> None:
        super().__init__(503, f"preempted on upstream {upstream}", code="preempted")
