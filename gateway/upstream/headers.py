"""Which headers cross the gateway, in both directions.

Upstream -> client: rate-limit and processing headers (OpenAI `x-ratelimit-*`, `openai-processing-ms`, Anthropic
`request-id`, `anthropic-ratelimit-*`, ...) so an app that paces itself on them keeps working; the upstream's own
`x-request-id` comes back as `x-upstream-request-id` (the client's `x-request-id` is the gateway's, see validation).

Client -> upstream: only the names in `GATEWAY_FORWARD_HEADERS` (an allow-list; defaults below), never the client's
credentials or a hop-by-hop header, whatever the list says (the settings refuse such names). With `byok: true` on an
upstream, a key the client brings replaces the upstream's configured key (see `client_key`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.auth import presented_key

DEFAULT_FORWARD = ("anthropic-beta", "anthropic-version", "openai-organization", "openai-project", "traceparent")
#: Never forwarded: credentials, cookies, hop-by-hop (RFC 9110 7.6.1) and framing headers the gateway sets itself.
NEVER_FORWARD = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "x-upstream-api-key",
    "connection", "keep-alive", "proxy-authenticate", "proxy-connection", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "content-type", "content-encoding", "accept-encoding",
})
_RELAY_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
_RELAY = frozenset({"openai-processing-ms", "openai-version", "request-id", "x-envoy-upstream-service-time"})
#: The header a client uses to bring its own upstream key when the gateway's own Authorization is taken.
BYOK_HEADER = "x-upstream-api-key"


def check_forward_list(names: Iterable[str]) -> list[str]:
    """Lower-cased names; ValueError naming any that must never be forwarded."""
    out = [n.strip().lower() for n in names if n.strip()]
    bad = sorted(set(out) & NEVER_FORWARD)
    if bad:
        raise ValueError(f"these headers are never forwarded upstream: {', '.join(bad)}")
    return out


def relayed(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream response headers the client gets too."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in _RELAY or low.startswith(_RELAY_PREFIXES):
            out[low] = value
        elif low == "x-request-id":
            out["x-upstream-request-id"] = value
    return out


def forwarded(client: Mapping[str, str], allow: Iterable[str]) -> dict[str, str]:
    """The client's allow-listed request headers, to send upstream."""
    out: dict[str, str] = {}
    for name in allow:
        v = client.get(name)
        if v is not None:
            out[name] = v
    return out


def client_key(client: Mapping[str, str], gateway_keys_required: bool) -> str | None:
    """The upstream key a client brings: `x-upstream-api-key`, or (when the gateway does not take its own API keys,
    so the client's Authorization is free) its bearer / x-api-key. Only used for upstreams with `byok: true`."""
    given = client.get(BYOK_HEADER)
    if given:
        return given.strip() or None
    if gateway_keys_required:
        return None
    return presented_key(client)
