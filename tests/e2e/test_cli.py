"""The command line: check-config's messages, and `gateway demo` (what `make run` starts) serving for real."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import openai
import pytest

from gateway.cli import main
from tests.conftest import free_port


def test_check_config_ok_and_clear_errors(tmp_path, capsys):
    assert main(["check-config", "config/compose.yaml"]) == 0
    assert "ok" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
upstreams:
  a: {base_url: "ftp://x", weight: -1}
  z: {provider: azure, base_url: "https://x"}
models:
  m: {upstreams: [a, ghost], strategy: fastest}
"""
    )
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "upstreams.a.base_url" in err and "http://" in err
    assert "upstreams.a.weight" in err
    assert "deployment" in err and "api_version" in err
    assert "unknown strategy 'fastest'" in err
    (tmp_path / "links.yaml").write_text("upstreams:\n  a: {base_url: 'http://x'}\nmodels:\n  m: {upstreams: [ghost]}\n")
    assert main(["check-config", str(tmp_path / "links.yaml")]) == 1
    assert "unknown upstream 'ghost'" in capsys.readouterr().err
    (tmp_path / "junk.yaml").write_text("upstreams: [\n")
    assert main(["check-config", str(tmp_path / "junk.yaml")]) == 1
    assert "invalid YAML" in capsys.readouterr().err


def _free_run(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    import socket

    for _ in range(50):
        base = free_port()
        try:
            socks = []
            for i in range(n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no run of free ports")


async def test_demo_serves_and_stops_gracefully():
    port, sim_port = free_port(), _free_run(3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--port", str(port), "--sim-port", str(sim_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_SHUTDOWN_GRACE": "5"},
    )
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "demo did not become ready"
                await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/dashboard") as r:
                assert r.status == 200 and "<canvas" in await r.text()
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = await c.chat.completions.create(model="fleet-model", messages=[{"role": "user", "content": "STOP_AFTER_3"}])
        assert r.usage.completion_tokens == 3
        # SIGTERM with a stream in flight: still listening, /readyz and new work get 503, the stream completes.
        stream = await c.chat.completions.create(
            model="fleet-model", messages=[{"role": "user", "content": "x"}], max_tokens=150, stream=True
        )
        first = await stream.__anext__()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "fleet-model", "messages": [{"role": "user", "content": "x"}]}) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "shutting_down"
        rest = [ch async for ch in stream]
        tokens = sum(1 for ch in [first, *rest] if ch.choices and ch.choices[0].delta.content)
        assert tokens == 150
        rc = await asyncio.wait_for(proc.wait(), 15)
        assert rc == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bad_settings_exit_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setenv("GATEWAY_DEFAULT_STRATEGY", "fastest")
    with pytest.raises(SystemExit) as e:
        main(["check-config"])
    assert e.value.code == 2
    assert "GATEWAY_DEFAULT_STRATEGY: unknown strategy 'fastest'" in capsys.readouterr().err


def test_workers_die_with_their_supervisor(redis_prefix):
    """`serve --workers 2`: SIGKILL of the supervising process must not leave workers serving on their own."""
    import subprocess

    port = free_port()
    env = {**os.environ, "GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0", "GATEWAY_REDIS_PREFIX": redis_prefix}
    sup = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
                            "--workers", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(sup.pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    deadline = time.monotonic() + 20
    while len(workers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    kids = workers()
    assert len(kids) == 2
    sup.kill()
    sup.wait()
    deadline = time.monotonic() + 10
    alive = kids
    while alive and time.monotonic() < deadline:
        alive = [k for k in kids if os.path.exists(f"/proc/{k}") and "Z" not in open(f"/proc/{k}/stat").read().split()[2]]
        time.sleep(0.1)
    assert not alive, f"workers {alive} outlived their supervisor"
