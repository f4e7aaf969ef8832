"""Pure parts of the protocol-error seam: the per-peer log limiter and the fixed error body."""

from __future__ import annotations

import json

from aiohttp.http_exceptions import BadHttpMethod

from gateway.http.protocol import PeerLogLimiter, error_body


def test_one_line_per_peer_per_interval():
    lim = PeerLogLimiter(interval=60.0, max_peers=100)
    assert lim.allow("1.2.3.4", now=0.0)
    assert not any(lim.allow("1.2.3.4", now=t) for t in (1.0, 30.0, 59.9))
    assert lim.allow("5.6.7.8", now=1.0)  # other peers are not silenced
    assert lim.allow("1.2.3.4", now=60.0)
    assert lim.suppressed == 3


def test_limiter_memory_is_bounded():
    lim = PeerLogLimiter(interval=60.0, max_peers=10)
    for i in range(1000):
        lim.allow(f"10.0.{i // 256}.{i % 256}", now=0.0)
    assert len(lim._last) <= 10


def test_error_body_never_quotes_the_request():
    exc = BadHttpMethod("GARB\x00AGE-SECRET-sk-abc")
    body = json.loads(error_body(400, exc))
    assert body["error"]["code"] == "bad_http_request"
    assert "SECRET" not in json.dumps(body) and "GARB" not in json.dumps(body)
