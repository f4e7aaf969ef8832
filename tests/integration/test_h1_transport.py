"""The lean plain-http upstream transport (gateway/upstream/h1.py) on real sockets: connection reuse, what goes on
the wire, framing and decoding, the cases where a connection must not be reused, and the mapping of failures to
the gateway's exceptions through UpstreamClient."""

from __future__ import annotations

import asyncio
import gzip
import json

import pytest
from aiohttp import ClientConnectionError, web

from gateway.errors import UpstreamConnectError, UpstreamTimeout
from gateway.sim import SimConfig
from gateway.upstream.base import OpenAIStreamDecoder
from gateway.upstream.client import Timeouts, UpstreamClient
from gateway.upstream.h1 import H1Pool, request_head, target
from tests.conftest import free_port

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
JSON = {"Content-Type": "application/json"}


def test_target_parses_host_port_host_header_and_path():
    assert target("http://127.0.0.1:8000/v1/chat/completions") == ("127.0.0.1", 8000, "127.0.0.1:8000", "/v1/chat/completions")
    assert target("http://example.com/v1/x?api-version=2") == ("example.com", 80, "example.com", "/v1/x?api-version=2")
    assert target("http://[::1]:9000/a") == ("::1", 9000, "[::1]:9000", "/a")
    with pytest.raises(ValueError):
        target("https://example.com/v1")


def test_request_head_frames_the_body_and_refuses_header_injection():
    head = request_head("h:1", "/p", {"Content-Type": "application/json", "accept": "x/y", "Content-Length": "9"}, 5)
    lines = head.decode().split("\r\n")
    assert lines[:2] == ["POST /p HTTP/1.1", "Host: h:1"]
    assert "accept: x/y" in lines and "Accept: */*" not in lines  # the caller's value wins, case-insensitively
    assert "Accept-Encoding: gzip, deflate" in lines
    assert [ln for ln in lines if ln.lower().startswith("content-length")] == ["Content-Length: 5"]
    assert not any(ln.lower().startswith("user-agent") for ln in lines)
    assert head.endswith(b"\r\n\r\n")
    for bad in ({"X-A": "v\r\nX-Evil: 1"}, {"X-A\n": "v"}, {"X-A:b": "v"}):
        with pytest.raises(ValueError):
            request_head("h", "/", bad, 0)


async def test_keep_alive_reuses_one_connection_and_sends_what_the_caller_set(start_upstream):
    peers, seen = [], []

    async def chat(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))
        seen.append((dict(request.headers), await request.read()))
        return web.json_response({"ok": len(peers)})

    url = await start_upstream(chat) + "/chat/completions"
    pool = H1Pool(connect_timeout=5)
    try:
        for i in range(3):
            r = await pool.post(url, BODY, {**JSON, "Authorization": "Bearer k"})
            assert r.status == 200 and json.loads(await r.content.read()) == {"ok": i + 1}
            r.release()
        assert len(set(peers)) == 1, "one connection served every request"
        h, body = seen[-1]
        assert body == BODY and h["Authorization"] == "Bearer k" and h["Content-Type"] == "application/json"
        assert "User-Agent" not in h and h["Host"] == url.split("/")[2]
    finally:
        pool.close()


async def _chunked_gzip(request: web.Request, raw: bytes) -> web.StreamResponse:
    """`raw` gzipped and sent in 100-byte chunks: framing and decoding the pool must undo."""
    resp = web.StreamResponse(headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    z = gzip.compress(raw)
    for i in range(0, len(z), 100):
        await resp.write(z[i:i + 100])
    await resp.write_eof()
    return resp


async def test_chunked_gzip_body_is_decoded(start_upstream):
    raw = json.dumps({"a": "b" * 5000}).encode()

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _chunked_gzip(request, raw)

    pool = H1Pool(connect_timeout=5)
    try:
        r = await pool.post(await start_upstream(chat) + "/chat/completions", BODY, JSON)
        assert await r.content.read() == raw
        r.release()
    finally:
        pool.close()


async def test_one_parser_reads_differently_framed_responses_on_one_connection(start_upstream):
    """The pool makes a connection's response parser once: chunked+gzip, content-length and empty answers must
    follow one another on the same kept-alive connection, each decoded whole."""
    raw = json.dumps({"a": "b" * 5000}).encode()
    peers = []

    async def chat(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))
        kind = len(peers) % 3
        if kind == 1:
            return await _chunked_gzip(request, raw)
        return web.json_response({"n": len(peers)}) if kind == 2 else web.Response(status=204)

    url = await start_upstream(chat) + "/chat/completions"
    pool = H1Pool(connect_timeout=5)
    try:
        for i in range(1, 7):
            r = await pool.post(url, BODY, JSON)
            body = await r.content.read()
            expected = {1: raw, 2: json.dumps({"n": i}).encode(), 0: b""}[i % 3]
            assert (r.status, body) == ((204, b"") if i % 3 == 0 else (200, expected))
            r.release()
        assert len(set(peers)) == 1, "one connection (and one parser) served every response"
    finally:
        pool.close()


async def test_half_read_or_connection_close_responses_are_not_reused(start_upstream):
    peers = []

    async def chat(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))
        if request.query.get("close"):
            return web.json_response({}, headers={"Connection": "close"})
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        await asyncio.sleep(0.2)  # the rest never matters: the client closes first
        await resp.write(b"y" * 10)
        return resp

    url = await start_upstream(chat) + "/chat/completions"
    pool = H1Pool(connect_timeout=5)
    try:
        r = await pool.post(url, BODY, JSON)
        assert await r.content.readany()
        r.release()  # not at EOF: closed, not pooled
        r = await pool.post(url + "?close=1", BODY, JSON)
        await r.content.read()
        r.release()  # the upstream said Connection: close
        r = await pool.post(url + "?close=1", BODY, JSON)
        await r.content.read()
        r.close()
        assert len(set(peers)) == 3 and not pool._live
    finally:
        pool.close()


async def test_close_wakes_a_reader_waiting_on_the_body(start_upstream):
    """Preemption ends a stream by closing its response while the relay waits on the body: the wait must end at
    once with a connection error (as after aiohttp's ClientResponse.close), not at the idle timeout."""
    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"x")
        await asyncio.sleep(5)
        return resp

    pool = H1Pool(connect_timeout=5)
    try:
        r = await pool.post(await start_upstream(chat) + "/chat/completions", BODY, JSON)
        assert await r.content.readany() == b"x"
        waiting = asyncio.create_task(r.content.readany())
        await asyncio.sleep(0.05)
        r.close()
        with pytest.raises(ClientConnectionError):
            await asyncio.wait_for(waiting, 1.0)
        assert not pool._live
    finally:
        pool.close()


async def test_idle_connections_expire():
    async def chat(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = H1Pool(connect_timeout=5, keepalive=0.0)
    try:
        for _ in range(2):
            r = await pool.post(f"http://127.0.0.1:{port}/", b"{}", JSON)
            await r.content.read()
            r.release()
        assert len(pool._live) == 1, "the expired idle connection was closed when the next one was pooled"
    finally:
        pool.close()
        await runner.cleanup()


async def _raw_server(reply: bytes | None) -> tuple[asyncio.Server, str]:
    """A socket server that answers every request with `reply` (None: never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if reply is None:
            await asyncio.sleep(30)
        else:
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"


async def test_a_body_without_length_ends_at_eof_and_its_connection_is_not_reused():
    server, url = await _raw_server(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"ok": true}')
    pool = H1Pool(connect_timeout=5)
    try:
        r = await pool.post(url, BODY, JSON)
        assert r.status == 200 and await r.content.read() == b'{"ok": true}'
        r.release()
        assert not pool._live
    finally:
        pool.close()
        server.close()


async def test_failures_map_to_the_upstream_exception_tree():
    client = UpstreamClient(connect_timeout=5, max_body=1 << 20, max_event=1 << 20)
    await client.start()
    servers = []
    try:
        with pytest.raises(UpstreamConnectError):  # nothing listens
            await client.send("u", f"http://127.0.0.1:{free_port()}/v1/chat/completions", BODY, JSON, 5)
        for reply in (b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"):
            server, url = await _raw_server(reply)
            servers.append(server)
            with pytest.raises(UpstreamConnectError):
                resp = await client.send("u", url, BODY, JSON, 5)
                try:
                    await resp.body(asyncio.get_running_loop().time() + 5)
                finally:
                    resp.close(False)
        server, url = await _raw_server(None)
        servers.append(server)
        with pytest.raises(UpstreamTimeout):
            await client.send("u", url, BODY, JSON, 0.2)
        assert not client.h1._live, "failed attempts left no connection open"
    finally:
        await client.stop()
        for s in servers:
            s.close()


async def test_cancelled_send_closes_its_connection():
    server, url = await _raw_server(None)
    pool = H1Pool(connect_timeout=5)
    try:
        task = asyncio.create_task(pool.post(url, BODY, JSON))
        await asyncio.sleep(0.1)
        assert len(pool._live) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not pool._live
    finally:
        pool.close()
        server.close()


async def test_simulator_stream_and_body_through_the_client(start_sims):
    sims = await start_sims({"s": SimConfig(name="sim-s", mode="gpu", base_step=0.0005, per_seq=0.0, slots=8)})
    url = sims.url("s") + "/v1/chat/completions"
    client = UpstreamClient(connect_timeout=5, max_body=1 << 20, max_event=1 << 20)
    await client.start()
    try:
        for _ in range(2):
            resp = await client.send("s", url, BODY, JSON, 5)
            raw, data = await resp.body(asyncio.get_running_loop().time() + 5)
            resp.close(True)
            assert data["choices"][0]["message"]["content"]
        assert len(client.h1._live) == 1, "the second body request reused the first one's connection"
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                           "stream": True}).encode()
        resp = await client.send("s", url, body, JSON, 5)
        loop = asyncio.get_running_loop()
        frames = [f async for f in resp.frames(OpenAIStreamDecoder(), Timeouts(5, 5, loop.time() + 5))]
        resp.close(resp.terminated)
        assert resp.terminated and sum(len(f.chunks) for f in frames) >= 5
        # Reused, and pooled again unless the last chunk's terminator had not arrived yet (then closed, not leaked).
        assert len(client.h1._live) <= 1
    finally:
        await client.stop()
