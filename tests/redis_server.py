"""A private redis-server process on a free port, for tests that kill and restart Redis."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int | None = None, *, appendonly_dir: str | None = None) -> None:
        """`appendonly_dir`: persist with an fsync'ed append-only file there, so a restart keeps the data."""
        self.port = port or _free_port()
        self.appendonly_dir = appendonly_dir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed: run `make redis` (tests never skip a real component)"
        persist = (
            ["--appendonly", "yes", "--appendfsync", "always", "--dir", self.appendonly_dir]
            if self.appendonly_dir else ["--appendonly", "no"]
        )
        self.proc = await asyncio.create_subprocess_exec(
            exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persist,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write(b"PING\r\n")
                if (await r.readline()).startswith(b"+PONG"):
                    w.close()
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    async def kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
