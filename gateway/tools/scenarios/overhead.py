"""`overhead` scenario: what the gateway costs per request, against nginx and against no proxy, in one run.

One near-instant GPU simulator (0.5 ms per step, 1,024 slots) is the upstream of three paths, each loaded in turn by
the same closed loop (C workers, one aiohttp session) for the same window:

- direct: the load generator talks to the simulator;
- nginx: a plain reverse proxy (`worker_processes 1`, keep-alive to the upstream, `access_log off`,
  `proxy_buffering off`) started by the bench on a free port with a generated config;
- gateway: `gateway serve` (one process, no Redis).

Non-streamed requests (max_tokens 1) run through all three, first one at a time (latency), then C at a time (RPS and
CPU). CPU per request is the utime+stime of the proxy's process group over the window (/proc), divided by the
requests completed in it: the gateway's ms/request against nginx's ms/request is the ratio reported.

Streams (max_tokens 20: 20 content chunks, plus role, finish and usage chunks) run the same three ways. "Direct
cost" of a stream is the CPU the load generator (Python, aiohttp, reading SSE lines) spends consuming it straight
from the simulator: the cheapest a Python process can handle that stream. A proxy consumes it AND re-sends it, so
twice that is the floor for a Python proxy; the gateway's CPU per stream over that is the stream ratio reported,
with nginx's CPU per stream beside it.

Scaling: the gateway with Redis, `--workers 1` then `--workers 2`, non-streamed at C. On a 2-core machine the load
generator and the simulator share the cores, so the RPS gain with 2 workers is bounded by what they leave.

nginx must be installed (`make bench` installs it); when it is not, the scenario still runs the other paths and
reports the missing nginx as an error, so the bench's exit report and the tests show it.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.sim import SimConfig
from gateway.tools import bench as B
from gateway.tools.scenarios import scenario

STREAM_CHUNKS = 20

_NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream sim {{
        server 127.0.0.1:{upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def nginx_config(dir: Path, port: int, upstream: int) -> str:
    return _NGINX_CONF.format(dir=dir, port=port, upstream=upstream)


def _prepare_nginx(logdir: Path, upstream: int, tag: str) -> tuple[str, Path, int]:
    """The nginx binary, its prefix directory with a generated config, and its port."""
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if exe is None:
        raise FileNotFoundError("nginx is not installed (`apt-get install nginx`; `make bench` installs it)")
    d = (logdir / f"nginx-{tag}").resolve()
    d.mkdir(parents=True, exist_ok=True)
    port = B._free_port()
    (d / "nginx.conf").write_text(nginx_config(d, port, upstream))
    return exe, d, port


async def start_nginx(procs: B.Procs, upstream: int, tag: str) -> tuple[Any, str]:
    """nginx as a reverse proxy to 127.0.0.1:`upstream`; returns (process, base URL)."""
    exe, d, port = _prepare_nginx(procs.logdir, upstream, tag)
    proc = await procs.start([exe, "-p", str(d), "-c", str(d / "nginx.conf")], f"nginx-{tag}.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}; see {d}/error.log")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nginx did not listen within 10 s; see {d}/error.log")


def _tiny_fleet(sim_url: str) -> dict:
    return {
        "upstreams": {"tiny": {"provider": "openai", "kind": "gpu", "base_url": sim_url + "/v1", "model": "sim-tiny",
                               "max_concurrency": 1024, "capacity": {"a": 0.0005, "b": 0.0, "ttft": 0.001}}},
        "models": {"tiny-model": {"upstreams": ["tiny"], "strategy": "throughput"}},
    }


def _row(thr: dict, lat: dict | None) -> dict:
    """One path's figures: latency (serial), RPS and CPU ms per request of each measured process at C."""
    rps = thr["rps"]
    return {
        "serial_p50_ms": lat["latency_p50_ms"] if lat else None, "serial_p99_ms": lat["latency_p99_ms"] if lat else None,
        "rps": rps, "p50_ms": thr["latency_p50_ms"], "p99_ms": thr["latency_p99_ms"], "requests": thr["requests"],
        "errors": thr["error_count"] + (lat["error_count"] if lat else 0), "cpu_cores": thr["cpu_cores"],
        "cpu_ms": {k: round(1000 * v / rps, 3) for k, v in thr["cpu_cores"].items()} if rps else {},
    }


class _Run:
    def __init__(self, bench: Any, sims: B.SimFleetProc) -> None:
        self.b, self.o, self.sims = bench, bench.o, sims

    async def path(self, url: str, model: str, groups: dict[str, int], *, stream: bool, serial: bool,
                   gateway: B.GatewayProc | None = None) -> dict:
        o = self.o
        body = B.chat_body(model, 8, STREAM_CHUNKS if stream else 1, stream=stream)
        tgt = B.Target(url + "/v1/chat/completions", body, 1)
        w, d = min(1.0, o.warmup), o.overhead_duration
        kw: dict[str, Any] = {"streamed": stream, "sims": self.sims, "gateway": gateway, "groups": groups}
        lat = await B.run_phase([tgt], w, d, **kw) if serial else None
        thr = await B.run_phase([replace(tgt, workers=o.overhead_concurrency)], w, d, **kw)
        return _row(thr, lat)

    async def gateway_paths(self, out: dict) -> None:
        gw = await B.start_gateway(self.b.procs, _tiny_fleet(self.sims.url("tiny")), "overhead")
        try:
            out["plain"]["gateway"] = await self.path(gw.url, "tiny-model", {}, stream=False, serial=True, gateway=gw)
            out["stream"]["gateway"] = await self.path(gw.url, "tiny-model", {}, stream=True, serial=False, gateway=gw)
        finally:
            await self.b._teardown(gw)

    async def nginx_paths(self, out: dict) -> None:
        try:
            proc, url = await start_nginx(self.b.procs, self.sims.ports["tiny"], "overhead")
        except FileNotFoundError as e:
            print(f"overhead: {e}", flush=True)
            out["nginx_missing"] = str(e)
            return
        try:
            g = {"nginx": proc.pid}
            out["plain"]["nginx"] = await self.path(url, "sim-tiny", g, stream=False, serial=True)
            out["stream"]["nginx"] = await self.path(url, "sim-tiny", g, stream=True, serial=False)
        finally:
            await self.b.procs.stop(proc)

    async def workers(self, out: dict) -> None:
        for n in (1, 2):
            gw = await B.start_gateway(self.b.procs, _tiny_fleet(self.sims.url("tiny")), f"overhead-w{n}", workers=n,
                                       redis_url=self.o.redis_url)
            try:
                out["workers"][str(n)] = await self.path(gw.url, "tiny-model", {}, stream=False, serial=False, gateway=gw)
            finally:
                await self.b._teardown(gw)
                await B._redis_cleanup(self.o.redis_url, gw.redis_prefix)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _summary(out: dict) -> dict:
    p, s = out["plain"], out["stream"]
    gw_ms = p["gateway"]["cpu_ms"].get("gateway")
    ng_ms = p.get("nginx", {}).get("cpu_ms", {}).get("nginx")
    gw_stream = s["gateway"]["cpu_ms"].get("gateway")
    client_stream = s["direct"]["cpu_ms"].get("loadgen")
    d, g = p["direct"], p["gateway"]
    w1, w2 = out["workers"].get("1", {}), out["workers"].get("2", {})
    return {
        "gateway_cpu_ms_per_req": gw_ms, "nginx_cpu_ms_per_req": ng_ms, "cpu_ratio_gateway_nginx": _ratio(gw_ms, ng_ms),
        "gateway_rps_per_core": round(1000 / gw_ms) if gw_ms else None,
        "stream_gateway_cpu_ms": gw_stream, "stream_client_direct_cpu_ms": client_stream,
        "stream_nginx_cpu_ms": s.get("nginx", {}).get("cpu_ms", {}).get("nginx"),
        "stream_ratio_gateway_direct": _ratio(gw_stream, client_stream),
        "stream_ratio_gateway_nginx": _ratio(gw_stream, s.get("nginx", {}).get("cpu_ms", {}).get("nginx")),
        "added_p50_ms": round(g["serial_p50_ms"] - d["serial_p50_ms"], 3) if g["serial_p50_ms"] and d["serial_p50_ms"] else None,
        "rps_ratio": _ratio(g["rps"], d["rps"]),
        "workers_rps_ratio": _ratio(w2.get("rps"), w1.get("rps")),
        "error_count": sum(r["errors"] for grp in (p, s, out["workers"]) for r in grp.values()) + ("nginx_missing" in out),
    }


@scenario("overhead", render=lambda r: render(r))
async def run(bench: Any) -> dict:
    tiny = {"tiny": SimConfig(name="sim-tiny", mode="gpu", base_step=0.0005, per_seq=0.0, prefill_per_token=0.0,
                              slots=1024)}
    sims = await B.start_sims(bench.procs, tiny, "overhead")
    out: dict[str, Any] = {"concurrency": bench.o.overhead_concurrency, "plain": {}, "stream": {}, "workers": {}}
    r = _Run(bench, sims)
    try:
        direct = sims.url("tiny")
        out["plain"]["direct"] = await r.path(direct, "sim-tiny", {}, stream=False, serial=True)
        out["stream"]["direct"] = await r.path(direct, "sim-tiny", {}, stream=True, serial=False)
        await r.nginx_paths(out)
        await r.gateway_paths(out)
        await r.workers(out)
    finally:
        await bench._teardown(sims)
    out.update(_summary(out))
    return out


def _line(label: str, r: dict | None, proc: str) -> str:
    if not r:
        return f"| {label} | not run | | | | | | |"
    f = B._f
    return (f"| {label} | {f(r['serial_p50_ms'], 2, ' ms')} | {f(r['serial_p99_ms'], 2, ' ms')} | {f(r['rps'])} | "
            f"{f(r['p50_ms'], 2, ' ms')} | {f(r['p99_ms'], 2, ' ms')} | {f(r['cpu_ms'].get(proc), 3, ' ms')} | "
            f"{f(r['cpu_ms'].get('loadgen'), 3, ' ms')} |")


def render(r: dict) -> list[str]:
    f = B._f
    p, s, w = r["plain"], r["stream"], r["workers"]
    lines = [
        f"| path (closed loop C={r['concurrency']}) | serial p50 | serial p99 | RPS | p50 | p99 | proxy CPU/req | client CPU/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        _line("non-streamed, direct to sim", p.get("direct"), "-"),
        _line("non-streamed, via nginx", p.get("nginx"), "nginx"),
        _line("non-streamed, via gateway", p.get("gateway"), "gateway"),
        _line(f"{STREAM_CHUNKS}-chunk stream, direct to sim", s.get("direct"), "-"),
        _line(f"{STREAM_CHUNKS}-chunk stream, via nginx", s.get("nginx"), "nginx"),
        _line(f"{STREAM_CHUNKS}-chunk stream, via gateway", s.get("gateway"), "gateway"),
        _line("non-streamed, gateway --workers 1 + Redis", w.get("1"), "gateway"),
        _line("non-streamed, gateway --workers 2 + Redis", w.get("2"), "gateway"),
        "",
        f"Gateway CPU {f(r['gateway_cpu_ms_per_req'], 3, ' ms')}/request vs nginx {f(r['nginx_cpu_ms_per_req'], 3, ' ms')}: "
        f"**{f(r['cpu_ratio_gateway_nginx'], 1, 'x')}**; {STREAM_CHUNKS}-chunk stream: gateway {f(r['stream_gateway_cpu_ms'], 3, ' ms')} "
        f"vs the client consuming it direct {f(r['stream_client_direct_cpu_ms'], 3, ' ms')}: "
        f"**{f(r['stream_ratio_gateway_direct'], 1, 'x')}** (nginx {f(r['stream_nginx_cpu_ms'], 3, ' ms')}, gateway/nginx "
        f"{f(r['stream_ratio_gateway_nginx'], 1, 'x')}). Added p50 {f(r['added_p50_ms'], 2, ' ms')}; RPS gateway/direct "
        f"{f(r['rps_ratio'], 2)}; RPS 2 workers / 1 worker {f(r['workers_rps_ratio'], 2)}; errors {r['error_count']}.",
    ]
    if "nginx_missing" in r:
        lines.append(f"**nginx missing**: {r['nginx_missing']}.")
    return lines
