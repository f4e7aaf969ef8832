"""`gateway top` and the live dashboard page (rendered by a real headless Chromium)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from gateway.tools import top

DASHBOARD = Path(__file__).resolve().parents[2] / "gateway" / "http" / "static" / "dashboard.html"

SNAPSHOT: dict[str, Any] = {
    "replica": "host-123-ab12cd",
    "redis": "ok",
    "time": 1764000000.0,
    "queue_depth": {"fleet-model": 3},
    "upstreams": [
        {
            "name": "fast-gpu", "provider": "openai", "kind": "gpu", "models": ["fleet-model"],
            "weight": 1.0, "state": "healthy", "inflight": 12, "inflight_local": 6,
            "max_concurrency": 64, "tok_s": 812.5, "rps": 3.1, "ttft_s": 0.083,
            "decode_tok_s": 70.2, "errors_per_min": 0.0, "rate_limited_per_min": 0.0,
            "ejections": 0,
            "capacity": {"a": 0.008, "b": 0.0004, "saturation_tok_s": 2500.0, "samples": 240},
            "limits": {"rpm": None, "tpm": None, "rpm_used": 0, "tpm_used": 0},
            "usd_per_1m_output": 0.8547, "spend_usd": 1.25,
        },
        {
            "name": "slow-cpu", "provider": "azure", "kind": "cpu", "models": ["fleet-model"],
            "weight": 0.25, "state": "ejected", "inflight": 0, "inflight_local": 0,
            "max_concurrency": 8, "tok_s": 41.3, "rps": 0.2, "ttft_s": None,
            "decode_tok_s": None, "errors_per_min": 6.5, "rate_limited_per_min": 2.0,
            "ejections": 3,
            "capacity": {"a": None, "b": None, "saturation_tok_s": None, "samples": 0},
            "limits": {"rpm": 600, "tpm": None, "rpm_used": 12, "tpm_used": 0},
        },
    ],
    "slo": {"window_s": 10.0, "classes": {"fleet-model": {
        "interactive": {"requests": 31, "attainment": 0.9677, "tok_s": 120.5, "goodput_tok_s": 110.25}}}},
    "cost": {"fleet_usd_per_1m_output": 1.2345, "pools_usd_per_1m_output": {"fleet-model": 1.2345},
             "classes_window_s": 60,
             "classes": {"fleet-model": {
                 "interactive": {"usd_per_1m_output": 2.5, "spend_usd": 0.0125, "output_tokens": 5000},
                 "batch": {"usd_per_1m_output": 0.3, "spend_usd": 0.0006, "output_tokens": 2000}}}},
}


class GatewayStub:
    """Tiny aiohttp server: the snapshot endpoint and /dashboard."""

    def __init__(self) -> None:
        self.url = ""
        self.admin_key: str | None = None
        self.snapshot_requests: list[dict[str, str]] = []
        self.batches: dict[str, Any] | None = None  # GET /v1/gateway/batches answers 404 while None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/gateway/upstreams", self._snapshot)
        app.router.add_get("/dashboard", self._dashboard)
        app.router.add_get("/v1/gateway/batches", self._batches)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _snapshot(self, request: web.Request) -> web.Response:
        self.snapshot_requests.append(dict(request.headers))
        if self.admin_key and request.headers.get("Authorization") != f"Bearer {self.admin_key}":
            return web.json_response({"error": {"message": "admin key required"}}, status=401)
        return web.json_response(SNAPSHOT)

    async def _batches(self, request: web.Request) -> web.Response:
        if self.batches is None:
            raise web.HTTPNotFound()
        return web.json_response(self.batches)

    async def _dashboard(self, request: web.Request) -> web.Response:
        return web.Response(body=DASHBOARD.read_bytes(), content_type="text/html", charset="utf-8")


@pytest_asyncio.fixture
async def gateway_stub() -> AsyncIterator[GatewayStub]:
    stub = GatewayStub()
    await stub.start()
    try:
        yield stub
    finally:
        await stub.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# gateway top
# ---------------------------------------------------------------------------------------
async def test_top_once_prints_table(gateway_stub: GatewayStub, capsys: pytest.CaptureFixture[str]) -> None:
    rc = await asyncio.to_thread(top.main, ["--url", gateway_stub.url, "--once"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "\x1b" not in out  # not a tty: no escape codes
    lines = out.splitlines()
    assert "host-123-ab12cd" in lines[0] and "redis ok" in lines[0]
    assert "853.8 tok/s" in lines[1] and "$1.23/1M out" in lines[1] and "12 in flight" in lines[1] and "fleet-model=3" in lines[1]
    header = next(ln for ln in lines if ln.startswith("NAME"))
    for col in ("PROVIDER", "STATE", "WEIGHT", "INFLIGHT", "TOK/S", "TTFT", "CAPACITY", "ERR/M"):
        assert col in header
    fast = next(ln for ln in lines if ln.startswith("fast-gpu")).split()
    assert fast == ["fast-gpu", "openai", "gpu", "healthy", "1.00", "12/64", "812.5", "83ms",
                    "70.2", "2500", "32%", "0.855", "0.00", "0.00", "0", "-"]
    slow = next(ln for ln in lines if ln.startswith("slow-cpu")).split()
    assert slow == ["slow-cpu", "azure", "cpu", "ejected", "0.25", "0/8", "41.3", "-",
                    "-", "learning", "-", "-", "6.50", "2.00", "3", "-"]
    assert top._hit({"hit_rate": 0.625}) == "62%" and top._hit(None) == "-"
    # cost per service class: live $/1M out, spent, output tokens (a class with no SLO rows in the window too)
    assert "  fleet-model/batch  $0.300  $0.0006  2000" in lines
    assert "  fleet-model/interactive  $2.50  $0.0125  5000" in lines
    assert any(ln.startswith("class cost (this replica; $/1M over the last 60 s)") for ln in lines)
    # columns line up: every row as wide as the header's columns
    assert lines.index(header) < [i for i, ln in enumerate(lines) if ln.startswith("fast-gpu")][0]


async def test_top_once_json(gateway_stub: GatewayStub, capsys: pytest.CaptureFixture[str]) -> None:
    rc = await asyncio.to_thread(top.main, ["--url", gateway_stub.url + "/", "--once", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert json.loads(out) == SNAPSHOT


async def test_top_admin_key(gateway_stub: GatewayStub, capsys: pytest.CaptureFixture[str]) -> None:
    gateway_stub.admin_key = "s3cret"
    rc = await asyncio.to_thread(top.main, ["--url", gateway_stub.url, "--once"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "401" in err and "--admin-key" in err
    rc = await asyncio.to_thread(top.main, ["--url", gateway_stub.url, "--once", "--admin-key", "s3cret"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "fast-gpu" in out
    assert gateway_stub.snapshot_requests[-1]["Authorization"] == "Bearer s3cret"


def test_top_unreachable_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    rc = top.main(["--url", url, "--once", "--interval", "0.2"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert "cannot reach gateway" in err and url in err


def test_top_live_mode_exits_2_when_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    rc = top.main(["--url", f"http://127.0.0.1:{_free_port()}", "--interval", "0.2"])
    assert rc == 2
    assert "cannot reach gateway" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# dashboard in headless Chromium
# ---------------------------------------------------------------------------------------
def test_dashboard_is_self_contained() -> None:
    html = DASHBOARD.read_text(encoding="utf-8")
    assert "<canvas" in html and "/v1/gateway/upstreams" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I), "external resource"
    assert not re.search(r"@import|<link\b|<script[^>]+src=", html, re.I), "external resource"


def _chromium() -> str:
    for var in ("CHROMIUM_BIN", "CHROME_BIN"):
        path = os.environ.get(var)
        if path and os.access(path, os.X_OK):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "Chromium is required for the dashboard test and was not found on PATH "
        "(install it: `apt-get update && apt-get install -y chromium`, or set CHROMIUM_BIN)",
        pytrace=False,
    )


async def _run_chromium(tmp_path: Path, url: str, *extra: str, budget_ms: int = 5000) -> str:
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--virtual-time-budget={budget_ms}", *extra, url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    except asyncio.TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        pytest.fail(f"chromium timed out: {' '.join(cmd)}")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {stderr.decode(errors='replace')[-3000:]}"
    return stdout.decode("utf-8", errors="replace")


class _Rows(HTMLParser):
    """Collects the text of each cell of <tr data-upstream=...> rows, plus element ids."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.class_rows: dict[str, list[str]] = {}
        self.by_id: dict[str, str] = {}
        self.canvases: dict[str, dict[str, str | None]] = {}
        self._row: str | None = None
        self._cell: list[str] | None = None
        self._id_stack: list[tuple[str, str, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-upstream"):
            self._row = a["data-upstream"]
            self.rows[self._row] = []
        elif tag == "tr" and a.get("data-class"):
            self._row = "class:" + str(a["data-class"])
            self.class_rows[self._row[6:]] = self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        if tag == "canvas" and a.get("id"):
            self.canvases[a["id"]] = a
        if a.get("id") and tag in ("span", "b", "div"):
            self._id_stack.append((tag, a["id"], []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self.rows[self._row].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr":
            self._row = None
        if self._id_stack and self._id_stack[-1][0] == tag:
            _, ident, buf = self._id_stack.pop()
            self.by_id[ident] = " ".join("".join(buf).split())

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, _, buf in self._id_stack:
            buf.append(data)


async def test_dashboard_renders_in_headless_chromium(gateway_stub: GatewayStub, tmp_path: Path) -> None:
    gateway_stub.admin_key = "dash-key"
    dom = await _run_chromium(tmp_path, f"{gateway_stub.url}/dashboard?key=dash-key", "--dump-dom")
    # the page's JS fetched the snapshot with the admin key
    assert gateway_stub.snapshot_requests, "the dashboard never polled the snapshot endpoint"
    assert gateway_stub.snapshot_requests[0].get("Authorization") == "Bearer dash-key"
    assert len(gateway_stub.snapshot_requests) >= 2, "expected polling every second"

    p = _Rows()
    p.feed(dom)
    assert {k for k in p.rows if not k.startswith("class:")} == {"fast-gpu", "slow-cpu"}, dom[-3000:]
    # service classes: SLO figures joined with the class cost book; a class known only to the cost book shows too
    assert p.class_rows["fleet-model/interactive"] == ["fleet-model", "interactive", "31", "96.8%", "120.5", "110.3",
                                                       "$2.50", "$0.0125"]
    assert p.class_rows["fleet-model/batch"] == ["fleet-model", "batch", "–", "–", "–", "–", "$0.300", "$0.0006"]
    # name, provider, kind, state, weight, inflight, tok/s, ttft, capacity, $/1M out, errors
    assert p.rows["fast-gpu"] == ["fast-gpu", "openai", "gpu", "healthy", "1.00", "12 / 64",
                                  "812.5", "83 ms", "2500", "$0.855", "0.00"]
    assert p.rows["slow-cpu"] == ["slow-cpu", "azure", "cpu", "ejected", "0.25", "0 / 8",
                                  "41.3", "–", "learning…", "–", "6.50 (2.00 429, 3 ej)"]
    assert 'class="badge b-ejected"' in dom
    assert p.by_id["redis"] == "ok"
    assert p.by_id["conn"] == "live"
    assert p.by_id["replica"] == "host-123-ab12cd"
    assert p.by_id["fleet-toks"] == "853.8"
    assert p.by_id["fleet-usd"] == "$1.234" or p.by_id["fleet-usd"] == "$1.235"
    assert p.by_id["fleet-inflight"] == "12"
    assert p.by_id["fleet-queued"] == "3"
    assert "fleet-model: 3" in p.by_id["queues"]
    # the charts were drawn with both series
    for cid in ("chart-toks", "chart-inflight", "chart-ttft"):
        c = p.canvases[cid]
        assert c.get("data-series") == "fast-gpu,slow-cpu", c
        assert int(c.get("data-points") or 0) >= 2, c
    assert "fast-gpu 813" in p.by_id["legend-toks"] and "fast-gpu 83 ms" in p.by_id["legend-ttft"]


async def test_dashboard_shows_batches_in_progress(gateway_stub: GatewayStub, tmp_path: Path) -> None:
    dom = await _run_chromium(tmp_path, f"{gateway_stub.url}/dashboard", "--dump-dom", budget_ms=2500)
    assert 'id="batches-card" style="display: none;"' in dom or 'id="batches-card" style="display:none"' in dom
    gateway_stub.batches = {"object": "batch_summary", "lines_running": 4, "batches": [
        {"id": "batch_abc", "status": "in_progress", "created_at": 1, "total": 40, "completed": 7, "failed": 1,
         "pending": 32, "output_tokens": 900, "tokens_per_second": 123.4, "eta_seconds": 61.2}]}
    dom = await _run_chromium(tmp_path, f"{gateway_stub.url}/dashboard", "--dump-dom", budget_ms=2500)
    row = dom[dom.index('data-batch="batch_abc"'):]
    row = row[: row.index("</tr>")]
    cells = [" ".join(c.split("</td>")[0].split()) for c in row.split("<td>")[1:]]
    assert cells == ["batch_abc", "in_progress", "7 / 40", "1", "32", "123.4", "61 s"]
    assert 'id="batches-card" style=""' in dom or 'id="batches-card">' in dom


async def test_dashboard_shows_error_when_unauthorized(gateway_stub: GatewayStub, tmp_path: Path) -> None:
    gateway_stub.admin_key = "dash-key"
    dom = await _run_chromium(tmp_path, f"{gateway_stub.url}/dashboard", "--dump-dom", budget_ms=2500)
    p = _Rows()
    p.feed(dom)
    assert p.rows == {}
    assert p.by_id["conn"] == "disconnected"
    assert "unauthorized" in p.by_id["banner"] and "?key=" in p.by_id["banner"]


async def test_dashboard_screenshot(gateway_stub: GatewayStub, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    await _run_chromium(
        tmp_path, f"{gateway_stub.url}/dashboard", f"--screenshot={shot}", "--window-size=1400,1000",
        budget_ms=20000,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a blank page compresses to a few KB
