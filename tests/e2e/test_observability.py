"""The observability stack against a live gateway: every metric the Grafana dashboard queries exists in /metrics
after traffic, and a real Prometheus (Debian's package, started here on a free port) scrapes the gateway;
`promtool check metrics` finds nothing to complain about."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.e2e.test_deploy import _dashboard_panels, _metric_names

#: The headline signals the dashboard must chart (issue 12, item 8).
HEADLINE = {
    "gateway_upstream_capacity_tokens_per_second",  # learned capacity
    "gateway_upstream_weight",
    "gateway_upstream_inflight", "gateway_upstream_max_concurrency",  # saturation vs max_concurrency
    "gateway_upstream_rate_limit_used", "gateway_upstream_rate_limit",  # RPM/TPM used vs limit
    "gateway_upstream_rate_limited_per_minute",  # 429s
    "gateway_redis_up",
    "gateway_requests_total",  # request status by code
}


async def _traffic(url: str) -> None:
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    async def one(i: int) -> None:
        s = await c.chat.completions.create(
            model="fleet-model", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4, stream=True
        )
        async for _ in s:
            pass

    await asyncio.gather(*(one(i) for i in range(6)))
    with pytest.raises(openai.NotFoundError):
        await c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    await asyncio.sleep(0.4)  # one fleet-sync cycle folds the counts into the windows


async def _batch_traffic(url: str, n: int = 2) -> None:
    """Batch-class requests (X-Gateway-Class), so the class cost series exist for both classes."""
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for i in range(n):
        r = await c.chat.completions.create(model="fleet-model", messages=[{"role": "user", "content": f"b{i}"}],
                                            max_tokens=8, extra_headers={"X-Gateway-Class": "batch"})
        assert r.usage is not None and r.usage.completion_tokens == 8


async def _class_cost_scraped(prom: str, gateway) -> None:
    """Cost per service class as Prometheus stored it equals the gateway's own book (the reference fleet's prices:
    hourly GPUs charged at their live rate, the hosted API per token), and the counters' quotient is the $/1M."""
    book = gateway.runtime.fleet.class_cost.view()["fleet-model"]
    assert book["interactive"]["requests"] == 6 and book["batch"]["requests"] == 2
    for cls in ("interactive", "batch"):
        sel = f'{{model="fleet-model",service_class="{cls}"}}'
        spend = await _query(prom, "gateway_class_spend_usd_total" + sel)
        tokens = await _query(prom, "gateway_class_charged_output_tokens_total" + sel)
        live = await _query(prom, "gateway_class_cost_usd_per_1m_output_tokens" + sel)
        assert spend and tokens and live, cls
        usd, out = float(spend[0]["value"][1]), float(tokens[0]["value"][1])
        assert usd > 0 and out == book[cls]["output_tokens"] == (6 * 4 if cls == "interactive" else 2 * 8)
        assert usd == pytest.approx(book[cls]["spend_usd"])
        assert float(live[0]["value"][1]) == pytest.approx(usd / out * 1e6, rel=1e-4)


async def _metrics(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


async def test_every_dashboard_metric_exists_in_a_live_gateway(gateway):
    await _traffic(gateway.url)
    _, text = await _metrics(gateway.url)
    live = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    used: set[str] = set()
    for p in _dashboard_panels():
        for t in p["targets"]:
            names = _metric_names(t["expr"])
            assert names, f"panel {p['title']!r}: no gateway metric in {t['expr']!r}"
            missing = names - live
            assert not missing, f"panel {p['title']!r} queries {missing}, absent from a live /metrics"
            used |= names
    assert HEADLINE <= used, f"dashboard does not chart {HEADLINE - used}"
    codes = {p["title"]: [t["expr"] for t in p["targets"]] for p in _dashboard_panels()}
    assert any("sum by (code)" in e and "gateway_requests_total" in e for es in codes.values() for e in es)


def test_promtool_check_metrics_is_clean(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make prometheus` installs Debian's prometheus package"
    # every family the gateway renders, from a fresh Telemetry (the live-gateway test below checks real traffic)
    from gateway.observability.telemetry import Telemetry

    tel = Telemetry()
    tel.record_operation(operation="chat", request_model="m", response_model="m", provider="vllm", upstream="u",
                         server_address="h", server_port=8000, duration_s=0.5, ttft_s=0.1, input_tokens=3,
                         output_tokens=5, error_type=None)
    tel.record_request(route="/v1/chat/completions", model="m", code=200)
    tel.record_ejection("u")
    snap = {"replica": "r", "redis": "ok", "queue_depth": {"m": 0}, "upstreams": [
        {"name": "u", "state": "healthy", "inflight": 1, "max_concurrency": 8, "tok_s": 10.0, "weight": 1.0,
         "ejections": 0, "capacity": {"saturation_tok_s": 100.0}, "limits": {"rpm": 60, "tpm": None, "rpm_used": 1}}]}
    r = subprocess.run([promtool, "check", "metrics"], input=tel.prometheus_text(snap), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


async def _wait_up(prom: str, proc: asyncio.subprocess.Process, timeout: float = 45.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    async with aiohttp.ClientSession() as s:
        while loop.time() < deadline:
            assert proc.returncode is None, "prometheus exited"
            try:
                async with s.get(prom + "/api/v1/targets") as r:
                    last = await r.json()
                active = last["data"]["activeTargets"]  # type: ignore[index]
                if active and active[0]["health"] == "up":
                    return active[0]
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)
    raise AssertionError(f"the gateway target never came up: {last}")


async def _query(prom: str, q: str) -> list[dict]:
    async with aiohttp.ClientSession() as s, s.get(prom + "/api/v1/query", params={"query": q}) as r:
        body = await r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def test_real_prometheus_scrapes_the_gateway(gateway, tmp_path: Path):
    binary, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert binary and promtool, "prometheus missing: `make prometheus` installs Debian's prometheus package"
    await _traffic(gateway.url)
    await _batch_traffic(gateway.url)
    ctype, text = await _metrics(gateway.url)
    assert ctype == CONTENT_TYPE_LATEST
    r = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr

    target = gateway.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: gateway\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    prom = f"http://127.0.0.1:{port}"
    try:
        up = await _wait_up(prom, proc)
        assert up["lastError"] == ""
        ok = await _query(prom, 'gateway_requests_total{code="200",model="fleet-model"}')
        assert ok and float(ok[0]["value"][1]) == 6 + 2  # interactive + batch
        assert await _query(prom, 'gateway_requests_total{code="404"}')
        assert await _query(prom, "gateway_upstream_capacity_tokens_per_second")
        assert await _query(prom, "gen_ai_client_operation_duration_seconds_bucket")
        await _class_cost_scraped(prom, gateway)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
