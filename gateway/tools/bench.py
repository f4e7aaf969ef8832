"""`gateway bench`: closed-loop streaming benchmark on the simulated heterogeneous fleet.

    gateway bench -- [--scenarios throughput,round_robin,adapt,replicas,overhead] [--duration 60]
                     [--concurrency 32] [--max-tokens 128] [--prompt-tokens 200] [--quick] [--out .bench/result.json]
    scripts/bench.sh [same arguments]

(`--` because the top-level `gateway` parser otherwise rejects option-looking arguments after `bench`.)

Process layout (2 shared cores): the three simulators run in ONE subprocess (`python -m gateway.tools.bench _sims`), the
gateway in its own (`python -m gateway serve`, `--workers 3` + Redis for `replicas`), and the load generator here
(asyncio + one aiohttp session; C workers, each sending a streamed chat request of ~P prompt tokens and max_tokens M,
then the next, until the phase ends). Every scenario gets fresh simulators (empty rate-limit windows) and a fresh
gateway, a warm-up, then a measured window. throughput and replicas are measured over 60 s by default: the gateway
paces the hosted API per 10 s (up to 1.5x the average rate) within its 60-s rpm window, so the hosted API's share
cycles with a 60-s period and shorter windows are biased by where they fall in that cycle (about +-4% at 25 s).

The optimum: (1) analytic, from the simulators' own formulas (GPU step = base + per_seq*n + prefill amortised over
M tokens; hosted request = ttft + (M-1)/tok_s, capped by rpm, tpm and max_concurrency), maximised over integer
worker allocations; (2) the oracle, measured: the load generator sends straight to the simulators with that
allocation (workers pinned), no gateway. The oracle is the fair 100% (same machine, same CPU limits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from gateway.sim import SimConfig
from gateway.tools.scenarios import registry

# ------------------------------------------------------------------------------------------- analytic model


def gpu_tok_s(c: SimConfig, n: float, m: int, p: int, slow: float = 1.0) -> float:
    """Steady-state output tok/s of the GPU sim with n closed-loop workers (M tokens, P prompt tokens each).

    A worker's sequence runs M steps, then its next request is admitted one step later, so on average
    n*M/(M+1) sequences run; each admission adds P prefill tokens, i.e. P/M per running sequence per step.
    """
    if n <= 0:
        return 0.0
    run = min(n * m / (m + 1), float(c.slots))
    step = slow * (c.base_step + c.per_seq * run + c.prefill_per_token * p * run / m)
    return run / step


def hosted_cycle(c: SimConfig, m: int, slow: float = 1.0) -> float:
    """Seconds per hosted request: first token at ttft, then one every 1/tok_s."""
    return slow * (c.ttft + (m - 1) / c.tok_s)


def hosted_max_workers(c: SimConfig, m: int, p: int, slow: float = 1.0) -> int:
    """Most closed-loop workers the hosted sim sustains without a 429 (rpm, tpm, max_concurrency)."""
    t = hosted_cycle(c, m, slow)
    caps = [float(c.max_concurrency) if c.max_concurrency else math.inf]
    if c.rpm:
        caps.append(t * c.rpm / c.window)
    if c.tpm:
        caps.append(t * c.tpm / c.window / (p + m))
    return int(math.floor(min(caps) + 1e-9))


def upstream_tok_s(c: SimConfig, n: int, m: int, p: int, slow: float = 1.0) -> float:
    if c.mode == "gpu":
        return gpu_tok_s(c, n, m, p, slow)
    n = min(n, hosted_max_workers(c, m, p, slow))
    return n * m / hosted_cycle(c, m, slow) if n > 0 else 0.0


def optimum(sims: dict[str, SimConfig], c: int, m: int, p: int, slow: dict[str, float] | None = None) -> dict:
    """Best integer allocation of c closed-loop workers over the upstreams (exact DP), with per-upstream tok/s."""
    slow = slow or {}
    names = list(sims)
    curves = {k: [upstream_tok_s(sims[k], n, m, p, slow.get(k, 1.0)) for n in range(c + 1)] for k in names}
    best = [0.0] * (c + 1)  # best[j]: max tok/s using at most j workers over the upstreams seen so far
    choice: list[list[int]] = []
    for k in names:
        nb, ch = [0.0] * (c + 1), [0] * (c + 1)
        for j in range(c + 1):
            for n in range(j + 1):
                v = curves[k][n] + best[j - n]
                if v > nb[j] + 1e-9:
                    nb[j], ch[j] = v, n
        best = nb
        choice.append(ch)
    alloc, j = {}, c
    for k, ch in zip(reversed(names), reversed(choice)):
        alloc[k] = ch[j]
        j -= ch[j]
    alloc = {k: alloc[k] for k in names}
    per = {k: round(curves[k][alloc[k]], 1) for k in names}
    return {"allocation": alloc, "tok_s": round(sum(curves[k][alloc[k]] for k in names), 1), "per_upstream": per}


def round_robin_estimate(sims: dict[str, SimConfig], c: int, m: int, p: int) -> float:
    """Rough analytic figure for round-robin (equal dispatch rates, so in-flight ~ latency; caps respected)."""
    names = list(sims)
    # Fixed point on the dispatch rate lam: n_k = min(cap_k, lam * L_k(n_k)), sum n_k = c.
    def lat(k: str, n: float) -> float:
        s = sims[k]
        if s.mode == "hosted":
            return hosted_cycle(s, m)
        run = min(n, s.slots)
        return (m + 1) * (s.base_step + s.per_seq * run + s.prefill_per_token * p * run / m)

    caps = {k: (hosted_max_workers(sims[k], m, p) if sims[k].mode == "hosted" else sims[k].slots) for k in names}
    lo, hi = 0.0, 1000.0
    n = {k: 0.0 for k in names}
    for _ in range(60):
        lam = (lo + hi) / 2
        for k in names:
            x = 1.0
            for _ in range(50):
                x = min(caps[k], lam * lat(k, x))
            n[k] = x
        if sum(n.values()) > c:
            hi = lam
        else:
            lo = lam
    return sum(upstream_tok_s(sims[k], round(n[k]), m, p) for k in names)


# ------------------------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def group_cpu_seconds(pgid: int) -> float:
    """utime+stime of every live process in a process group (Linux /proc)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2:].split()
        if int(rest[2]) == pgid:  # field 5: pgrp
            total += int(rest[11]) + int(rest[12])  # fields 14, 15: utime, stime
    return total / _CLK


class Procs:
    """Subprocesses started by the bench, each in its own session; all killed on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, args: list[str], log_name: str, env: dict[str, str] | None = None,
                    stdout_pipe: bool = False, cwd: str | None = None) -> asyncio.subprocess.Process:
        log = open(self.logdir / log_name, "ab")  # noqa: ASYNC230 (before the process starts)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE if stdout_pipe else log, stderr=log,
                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, start_new_session=True, cwd=cwd,
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    async def stop(self, proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                pass
        # Whatever is left in the group (e.g. --workers children) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 2.0)
        if proc in self.procs:
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        for p in list(self.procs):
            await self.stop(p)

    def kill_all_now(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)


@dataclass
class SimFleetProc:
    proc: asyncio.subprocess.Process
    ports: dict[str, int]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


async def start_sims(procs: Procs, sims: dict[str, SimConfig], tag: str) -> SimFleetProc:
    spec = {name: asdict(cfg) for name, cfg in sims.items()}
    proc = await procs.start([sys.executable, "-m", "gateway.tools.bench", "_sims", "--spec", json.dumps(spec)],
                             f"sims-{tag}.log", stdout_pipe=True)
    assert proc.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            if not line:
                raise RuntimeError(f"simulators exited (see {procs.logdir}/sims-{tag}.log)")
            if line.startswith(b"READY "):
                ports = json.loads(line[6:])
                break
    except asyncio.TimeoutError:
        raise RuntimeError("simulators did not start within 20 s") from None
    return SimFleetProc(proc, ports)


@dataclass
class GatewayProc:
    proc: asyncio.subprocess.Process
    url: str
    workers: int
    redis_prefix: str | None = None


async def start_gateway(procs: Procs, fleet: dict, tag: str, *, workers: int = 1, redis_url: str = "",
                        strategy: str = "throughput", env: dict[str, str] | None = None,
                        cwd: str | None = None) -> GatewayProc:
    """`gateway serve` in its own process group; `cwd` (with PYTHONPATH in `env`) picks the source tree it runs."""
    import yaml

    cfg_path = procs.logdir / f"fleet-{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    port = _free_port()
    prefix = f"gwbench-{uuid.uuid4().hex[:8]}" if redis_url else None
    env = {
        **(env or {}),
        "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_DEFAULT_STRATEGY": strategy,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": prefix or "gwbench",
        "GATEWAY_SHUTDOWN_GRACE": "1",
        "GATEWAY_REPLICA_ID": f"bench-{tag}",
        "GATEWAY_REQUIRE_API_KEY": "false",
        **(env or {}),
    }
    args = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--config", str(cfg_path), "--workers", str(workers)]
    proc = await procs.start(args, f"gateway-{tag}.log", env, cwd=cwd)
    gw = GatewayProc(proc, f"http://127.0.0.1:{port}", workers, prefix)
    await _wait_gateway(gw, procs.logdir / f"gateway-{tag}.log")
    return gw


async def _wait_gateway(gw: GatewayProc, log: Path, timeout: float = 30.0) -> None:
    """Ready when /readyz answers and, with several workers, every replica has been seen answering."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    conn = aiohttp.TCPConnector(force_close=True)  # new connection each time: SO_REUSEPORT spreads them
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=2)) as s:
        while time.monotonic() < deadline:
            if gw.proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {gw.proc.returncode}; see {log}")
            try:
                async with s.get(gw.url + "/readyz") as r:
                    ok = r.status == 200
                if ok:
                    async with s.get(gw.url + "/v1/gateway/upstreams") as r:
                        seen.add((await r.json())["replica"])
                    if len(seen) >= gw.workers:
                        return
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway not ready after {timeout:.0f}s ({len(seen)}/{gw.workers} replicas); see {log}")


def fleet_yaml(ports: dict[str, int], sims: dict[str, SimConfig], strategy: str) -> dict:
    from gateway.sim.reference import reference_fleet

    cfg = reference_fleet(ports, sims)
    for mc in cfg.models.values():
        mc.strategy = strategy
    return cfg.model_dump(mode="json", exclude={"upstreams": {"__all__": {"name"}}})


async def _sims_main(spec: dict) -> None:
    """Body of `python -m gateway.tools.bench _sims`: host every simulator of `spec` in this one process."""
    from gateway.sim import start_sim

    runners, ports = [], {}
    for name, d in spec.items():
        d = dict(d)
        port = d.pop("port", 0)
        runner, bound = await start_sim(SimConfig(**d), "127.0.0.1", port)
        runners.append(runner)
        ports[name] = bound
    print("READY " + json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in runners:
        await r.cleanup()


# ------------------------------------------------------------------------------------------- load generation


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))
    return xs[i]


@dataclass
class Recorder:
    """Everything a phase measures; times are seconds since `origin` (monotonic)."""

    origin: float
    window: tuple[float, float]  # measured [start, end) relative to origin
    tokens: dict[int, int] = field(default_factory=dict)  # per-second buckets (whole phase)
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    usage_mismatch: int = 0
    usage_tokens: int = 0
    counted_tokens: int = 0

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]

    def error(self, kind: str, t: float) -> None:
        if self.in_window(t):
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def window_tokens(self) -> int:
        a, b = int(self.window[0]), int(self.window[1])
        return sum(v for s, v in self.tokens.items() if a <= s < b)


_CONTENT = b'"content":"'
_EMPTY = b'"content":""'


async def _stream_once(session: aiohttp.ClientSession, url: str, body: bytes, rec: Recorder) -> None:
    o = rec.origin
    t0 = time.monotonic()
    first = None
    n = 0
    usage = None
    buckets = rec.tokens
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        if resp.status != 200:
            await resp.read()
            rec.error(str(resp.status), time.monotonic() - o)
            await asyncio.sleep(0.05)  # do not spin on errors
            return
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            if _CONTENT in line and _EMPTY not in line:
                now = time.monotonic()
                if first is None:
                    first = now
                n += 1
                sec = int(now - o)
                buckets[sec] = buckets.get(sec, 0) + 1
            elif b'"usage":{' in line:
                usage = json.loads(line[6:]).get("usage")
            elif line.startswith(b'data: {"error"'):
                rec.error("stream_error", time.monotonic() - o)
                return
    end = time.monotonic()
    if rec.in_window(end - o):
        rec.completed += 1
        rec.latencies.append(end - t0)
        if first is not None:
            rec.ttfts.append(first - t0)
        rec.counted_tokens += n
        if usage is not None:
            ct = usage.get("completion_tokens", -1)
            rec.usage_tokens += ct
            if ct != n:
                rec.usage_mismatch += 1


async def _plain_once(session: aiohttp.ClientSession, url: str, body: bytes, rec: Recorder) -> None:
    o = rec.origin
    t0 = time.monotonic()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        status = resp.status
    end = time.monotonic()
    if status != 200:
        rec.error(str(status), end - o)
        await asyncio.sleep(0.05)
        return
    if rec.in_window(end - o):
        rec.completed += 1
        rec.latencies.append(end - t0)


async def _worker(session: aiohttp.ClientSession, url: str, body: bytes, rec: Recorder, stop_at: float,
                  streamed: bool) -> None:
    once = _stream_once if streamed else _plain_once
    while time.monotonic() < stop_at:
        try:
            await once(session, url, body, rec)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
            rec.error(type(e).__name__, time.monotonic() - rec.origin)
            await asyncio.sleep(0.05)


def chat_body(model: str, prompt_tokens: int, max_tokens: int, stream: bool = True) -> bytes:
    # " the" is one token for tiktoken and 4 characters for the simulator's chars//4 count.
    content = ("the " * prompt_tokens).strip()
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


@dataclass
class Target:
    url: str
    body: bytes
    workers: int


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
        return await r.json()


async def run_phase(targets: list[Target], warmup: float, duration: float, *, streamed: bool = True,
                    sims: SimFleetProc | None = None, gateway: GatewayProc | None = None,
                    events: list[tuple[float, Any]] | None = None, load: Any = None,
                    groups: dict[str, int] | None = None) -> dict:
    """Closed loop: every target's workers repeat their request until warm-up + duration are over.

    `groups`: more process groups (name -> pgid) whose CPU is measured over the window, beside sims and gateway.

    `events`: (seconds after the measured window starts, coroutine factory) run during the phase (e.g. faults).
    `load`: an extra load generator (e.g. open-loop arrivals), called as load(session, recorder, stop_at) and
    run for the whole phase.
    """
    origin = time.monotonic()
    rec = Recorder(origin, (warmup, warmup + duration))
    stop_at = origin + warmup + duration
    total = sum(t.workers for t in targets)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    timeline: list[dict] = []
    sim_before: dict = {}
    sim_after: dict = {}
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    pcpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, auto_decompress=False) as session:
        mon = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))

        async def sim_stats() -> dict:
            if sims is None:
                return {}
            res = await asyncio.gather(*(_get_json(mon, sims.url(n) + "/sim/stats") for n in sims.ports),
                                       return_exceptions=True)
            return {n: r for n, r in zip(sims.ports, res) if isinstance(r, dict)}

        async def monitor() -> None:
            # 1 Hz: the simulators' true running/waiting and the gateway's view of each upstream.
            next_t = origin + 0.5
            while True:
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
                next_t += 1.0
                t = round(time.monotonic() - origin, 2)
                row: dict[str, Any] = {"t": t, "sim": {}}
                try:
                    for n, st in (await sim_stats()).items():
                        row["sim"][n] = {"running": st["running"], "waiting": st["waiting"],
                                         "tokens": st["tokens_generated"], "rejected_429": st["rejected_429"]}
                    if gateway is not None:
                        snap = await _get_json(mon, gateway.url + "/v1/gateway/upstreams")
                        row["queue"] = sum((snap.get("queue_depth") or {}).values())
                        row["gw"] = {
                            u["name"]: {
                                "inflight": u.get("inflight"), "tok_s": u.get("tok_s"), "state": u.get("state"),
                                "external_load": u.get("external_load"),
                                "a": (u.get("capacity") or {}).get("a"), "b": (u.get("capacity") or {}).get("b"),
                                "ttft": (u.get("capacity") or {}).get("ttft"),
                                "rpm_used": (u.get("limits") or {}).get("rpm_used"),
                            }
                            for u in snap.get("upstreams", [])
                        }
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, KeyError):
                    pass
                timeline.append(row)

        async def mark_window_start() -> None:
            await asyncio.sleep(max(0.0, origin + warmup - time.monotonic()))
            sim_before.update(await sim_stats())
            cpu0.update(_cpus(sims, gateway, groups))
            nonlocal pcpu0
            pcpu0 = time.process_time()

        async def run_event(at: float, fn: Any) -> None:
            await asyncio.sleep(max(0.0, origin + warmup + at - time.monotonic()))
            await fn()

        tasks = [asyncio.create_task(_worker(session, t.url, t.body, rec, stop_at, streamed))
                 for t in targets for _ in range(t.workers)]
        aux = [asyncio.create_task(monitor()), asyncio.create_task(mark_window_start())]
        if load is not None:
            tasks.append(asyncio.create_task(load(session, rec, stop_at)))
        aux += [asyncio.create_task(run_event(at, fn)) for at, fn in (events or [])]
        try:
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            sim_after.update(await sim_stats())
            cpu1.update(_cpus(sims, gateway, groups))
            pcpu1 = time.process_time()
        finally:
            for t in tasks + aux:
                t.cancel()
            await asyncio.gather(*tasks, *aux, return_exceptions=True)
            await mon.close()
    return _summarise(rec, duration, total, sim_before, sim_after, timeline,
                      {k: round((cpu1.get(k, 0) - cpu0.get(k, 0)) / duration, 2) for k in cpu1}
                      | {"loadgen": round((pcpu1 - pcpu0) / duration, 2)})


def _cpus(sims: SimFleetProc | None, gateway: GatewayProc | None, groups: dict[str, int] | None) -> dict[str, float]:
    out = {name: group_cpu_seconds(pgid) for name, pgid in (groups or {}).items()}
    if sims is not None:
        out["sims"] = group_cpu_seconds(sims.proc.pid)
    if gateway is not None:
        out["gateway"] = group_cpu_seconds(gateway.proc.pid)
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def _summarise(rec: Recorder, duration: float, workers: int, before: dict, after: dict, timeline: list[dict],
               cpu: dict[str, float]) -> dict:
    toks = rec.window_tokens()
    per_up = {}
    for name, a in after.items():
        b = before.get(name, {})
        per_up[name] = {
            "tok_s": round((a["tokens_generated"] - b.get("tokens_generated", 0)) / duration, 1),
            "completed": a["completed"] - b.get("completed", 0),
            "rejected_429": a["rejected_429"],  # since the simulator started (this scenario)
            "inflight_peak": a["inflight_peak"],
            "errors_500": a["errors_500"],
        }
    w0, w1 = rec.window
    inside = [r for r in timeline if w0 <= r["t"] < w1]
    for name in per_up:
        occ = [r["sim"][name]["running"] + r["sim"][name]["waiting"] for r in inside if name in r.get("sim", {})]
        per_up[name]["mean_inflight"] = round(statistics.fmean(occ), 1) if occ else None
        gw = [r["gw"][name]["inflight"] for r in inside if name in r.get("gw", {})]
        if gw:
            per_up[name]["gateway_mean_inflight"] = round(statistics.fmean(gw), 1)
    return {
        "tok_s": round(toks / duration, 1),
        "requests": rec.completed,
        "rps": round(rec.completed / duration, 2),
        "errors": dict(rec.errors),
        "error_count": sum(rec.errors.values()),
        "latency_mean_ms": _ms(statistics.fmean(rec.latencies) if rec.latencies else None),
        "latency_p50_ms": _ms(_pct(rec.latencies, 50)),
        "latency_p99_ms": _ms(_pct(rec.latencies, 99)),
        "ttft_p50_ms": _ms(_pct(rec.ttfts, 50)),
        "ttft_p99_ms": _ms(_pct(rec.ttfts, 99)),
        "usage_tokens": rec.usage_tokens,
        "counted_tokens": rec.counted_tokens,
        "usage_mismatch": rec.usage_mismatch,
        "workers": workers,
        "warmup_s": w0,
        "duration_s": duration,
        "per_second": [rec.tokens.get(s, 0) for s in range(int(w0), int(w1))],
        "upstreams": per_up,
        "sim_429": sum(u["rejected_429"] for u in per_up.values()),
        "cpu_cores": cpu,
        "timeline": timeline,
    }


# ------------------------------------------------------------------------------------------- scenarios


@dataclass
class Opts:
    scenarios: list[str]
    duration: float
    compare_duration: float
    oracle_duration: float
    warmup: float
    concurrency: int
    max_tokens: int
    prompt_tokens: int
    fault_at: float
    adapt_after: float
    slowdown: float
    workers: int
    redis_url: str
    overhead_duration: float
    overhead_concurrency: int
    out: Path
    quick: bool


MODEL = "fleet-model"


class Bench:
    def __init__(self, o: Opts) -> None:
        from gateway.sim.reference import REFERENCE_SIMS

        self.o = o
        self.sims = {k: replace(v) for k, v in REFERENCE_SIMS.items()}
        self.logdir = o.out.parent / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs = Procs(self.logdir)
        self.opt = optimum(self.sims, o.concurrency, o.max_tokens, o.prompt_tokens)
        self.results: dict[str, Any] = {}

    # -- helpers
    async def _fleet(self, tag: str, strategy: str, workers: int = 1, redis_url: str = "") -> tuple[SimFleetProc, GatewayProc]:
        sims = await start_sims(self.procs, self.sims, tag)
        gw = await start_gateway(self.procs, fleet_yaml(sims.ports, self.sims, strategy), tag, workers=workers,
                                 redis_url=redis_url, strategy=strategy)
        return sims, gw

    async def _teardown(self, *ps: Any) -> None:
        for p in ps:
            if p is not None:
                await self.procs.stop(p.proc)

    def _gw_targets(self, gw: GatewayProc) -> list[Target]:
        o = self.o
        return [Target(gw.url + "/v1/chat/completions", chat_body(MODEL, o.prompt_tokens, o.max_tokens), o.concurrency)]

    # -- scenarios
    async def oracle(self) -> dict:
        o = self.o
        sims = await start_sims(self.procs, self.sims, "oracle")
        try:
            targets = [
                Target(sims.url(n) + "/v1/chat/completions", chat_body(self.sims[n].name, o.prompt_tokens, o.max_tokens), k)
                for n, k in self.opt["allocation"].items() if k > 0
            ]
            r = await run_phase(targets, o.warmup, o.oracle_duration, sims=sims)
        finally:
            await self._teardown(sims)
        r["notes"] = "direct to sims, workers pinned " + "/".join(f"{n}={k}" for n, k in self.opt["allocation"].items())
        return r

    async def strategy(self, name: str, strategy: str) -> dict:
        o = self.o
        sims, gw = await self._fleet(name, strategy)
        d = o.duration if strategy == "throughput" else o.compare_duration
        try:
            r = await run_phase(self._gw_targets(gw), o.warmup, d, sims=sims, gateway=gw)
        finally:
            await self._teardown(gw, sims)
        r["notes"] = f"strategy {strategy}"
        return r

    async def adapt(self) -> dict:
        o = self.o
        sims, gw = await self._fleet("adapt", "throughput")
        url = sims.url("fast-gpu") + "/sim/faults"

        async def fault() -> None:
            async with aiohttp.ClientSession() as s, s.post(url, json={"slowdown": o.slowdown}) as r:
                r.raise_for_status()

        try:
            r = await run_phase(self._gw_targets(gw), o.warmup, o.fault_at + o.adapt_after, sims=sims, gateway=gw,
                                events=[(o.fault_at, fault)])
        finally:
            await self._teardown(gw, sims)
        new = optimum(self.sims, o.concurrency, o.max_tokens, o.prompt_tokens, {"fast-gpu": o.slowdown})
        ps = r["per_second"]
        fa = int(o.fault_at)
        before, after = ps[:fa], ps[fa:]
        oracle = self.results.get("oracle")
        calib = oracle["tok_s"] / self.opt["tok_s"] if oracle and self.opt["tok_s"] else 1.0
        target = new["tok_s"] * calib  # what the oracle would reach on the slowed fleet (same CPU efficiency)
        tail = max(1, min(len(after), int(o.adapt_after / 2)))
        r["adapt"] = {
            "slowdown": o.slowdown,
            "fault_at_s": o.fault_at,
            "new_optimum": new,
            "target_tok_s": round(target, 1),
            "calibration": round(calib, 3),
            "before_tok_s": round(statistics.fmean(before), 1) if before else None,
            "after_tok_s_last": round(statistics.fmean(after[-tail:]), 1) if after else None,
            "after_pct_of_target": round(100 * statistics.fmean(after[-tail:]) / target, 1) if after and target else None,
            "rebalanced_s": _settle(after, target, 0.10),
            "rebalanced_s_rolling3": _settle(_rolling(after, 3), target, 0.10),
            "gpu_efficiency": (eff := self._gpu_efficiency(r["timeline"], o.warmup + o.fault_at)),
            "gpu_rebalanced_s": _settle([e for t, e in eff if t >= 0], 1.0, 0.10),
            "allocation_after": _mean_alloc(r["timeline"], o.warmup + o.fault_at + tail, o.warmup + o.fault_at + o.adapt_after),
        }
        r["notes"] = f"fast-gpu slowed {o.slowdown:g}x at +{o.fault_at:g}s"
        return r

    def _gpu_efficiency(self, timeline: list[dict], fault_t: float) -> list[tuple[float, float]]:
        """Per monitor interval: GPU tok/s delivered / the best GPU tok/s for the workers the hosted API left free.

        Isolates the router's GPU (re)balancing from the hosted API's rate-limit cycle. Times are relative to the
        fault; the interval containing it is skipped.
        """
        o = self.o
        gpus = {n: c for n, c in self.sims.items() if c.mode == "gpu"}
        out = []
        for prev, row in zip(timeline, timeline[1:]):
            if not all(n in prev.get("sim", {}) and n in row.get("sim", {}) for n in self.sims):
                continue
            t0, t1 = prev["t"], row["t"]
            if t0 < fault_t <= t1 or t1 <= t0:
                continue
            got = sum(row["sim"][n]["tokens"] - prev["sim"][n]["tokens"] for n in gpus) / (t1 - t0)
            hosted = sum((row["sim"][n]["running"] + prev["sim"][n]["running"]) / 2
                         for n, c in self.sims.items() if c.mode == "hosted")
            free = max(0, round(o.concurrency - hosted))
            slow = {"fast-gpu": o.slowdown} if t0 >= fault_t else {}
            best = optimum(gpus, free, o.max_tokens, o.prompt_tokens, slow)["tok_s"]
            out.append((round(t1 - fault_t, 2), round(got / best, 3) if best else 1.0))
        return out

    async def replicas(self) -> dict:
        o = self.o
        sims, gw = await self._fleet("replicas", "throughput", workers=o.workers, redis_url=o.redis_url)
        try:
            r = await run_phase(self._gw_targets(gw), o.warmup, o.duration, sims=sims, gateway=gw)
        finally:
            await self._teardown(gw, sims)
            await _redis_cleanup(o.redis_url, gw.redis_prefix)
        lim = {n: (self.sims[n].max_concurrency or self.sims[n].slots) for n in self.sims}
        r["limits"] = {
            n: {"inflight_peak": r["upstreams"][n]["inflight_peak"], "limit": lim[n],
                "rejected_429": r["upstreams"][n]["rejected_429"]}
            for n in r["upstreams"]
        }
        r["notes"] = f"{o.workers} gateway processes sharing Redis"
        return r

    # -- driver
    async def run(self) -> dict:
        o = self.o
        started = time.time()
        rr_est = round_robin_estimate(self.sims, o.concurrency, o.max_tokens, o.prompt_tokens)
        self.results = {}
        meta = {
            "started": started, "concurrency": o.concurrency, "max_tokens": o.max_tokens,
            "prompt_tokens": o.prompt_tokens, "warmup_s": o.warmup, "duration_s": o.duration,
            "compare_duration_s": o.compare_duration, "oracle_duration_s": o.oracle_duration, "quick": o.quick,
            "analytic_optimum": self.opt, "analytic_round_robin_tok_s": round(rr_est, 1),
            "sims": {k: asdict(v) for k, v in self.sims.items()}, "cpus": os.cpu_count(),
        }
        print(f"analytic optimum for C={o.concurrency}, M={o.max_tokens}, P={o.prompt_tokens}: "
              f"{self.opt['tok_s']:.0f} tok/s with " +
              ", ".join(f"{n}={k} ({self.opt['per_upstream'][n]:.0f} tok/s)" for n, k in self.opt["allocation"].items()),
              flush=True)
        extra = registry()
        core = ("throughput", "round_robin", "least_busy", "weighted", "lowest_latency", "adapt", "replicas")
        plan: list[tuple[str, Any]] = []
        if any(s in core or (s in extra and extra[s].needs_oracle) for s in o.scenarios):
            plan.append(("oracle", self.oracle))
        for s in o.scenarios:
            if s in ("throughput", "round_robin", "least_busy", "weighted", "lowest_latency"):
                plan.append((s, lambda s=s: self.strategy(s, s)))
            elif s == "adapt":
                plan.append((s, self.adapt))
            elif s == "replicas":
                plan.append((s, self.replicas))
            elif s in extra:
                plan.append((s, lambda s=s: extra[s].run(self)))
            else:
                raise SystemExit(f"unknown scenario {s!r}")
        try:
            for name, fn in plan:
                t0 = time.monotonic()
                print(f"[{time.time() - started:5.0f}s] {name} ...", flush=True)
                self.results[name] = await fn()
                self.results[name]["wall_s"] = round(time.monotonic() - t0, 1)
        finally:
            await self.procs.stop_all()
        oracle = self.results.get("oracle", {}).get("tok_s")
        for name, r in self.results.items():
            if "tok_s" in r:
                r["pct_of_oracle"] = round(100 * r["tok_s"] / oracle, 1) if oracle else None
                r["pct_of_analytic"] = round(100 * r["tok_s"] / self.opt["tok_s"], 1) if self.opt["tok_s"] else None
        meta["wall_s"] = round(time.time() - started, 1)
        return {"meta": meta, "scenarios": self.results}


def _rolling(xs: list[int], k: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def _settle(xs: list[float], target: float, tol: float) -> float | None:
    """Seconds until every later 1-s value stays >= (1 - tol) * target; None if it never does."""
    if not xs or target <= 0:
        return None
    for i in range(len(xs)):
        if all(x >= (1 - tol) * target for x in xs[i:]):
            return float(i)
    return None


def _mean_alloc(timeline: list[dict], t0: float, t1: float) -> dict[str, float]:
    rows = [r for r in timeline if t0 <= r["t"] < t1 and r.get("sim")]
    out: dict[str, float] = {}
    for n in (rows[0]["sim"] if rows else {}):
        out[n] = round(statistics.fmean(r["sim"][n]["running"] + r["sim"][n]["waiting"] for r in rows if n in r["sim"]), 1)
    return out


async def _redis_cleanup(url: str, prefix: str | None) -> None:
    if not prefix:
        return
    try:
        import redis.asyncio as aioredis

        r = aioredis.from_url(url, socket_timeout=2)
        keys = [k async for k in r.scan_iter(f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()
    except Exception:  # noqa: BLE001 - best effort; keys carry TTLs anyway
        pass


# ------------------------------------------------------------------------------------------- report


def _f(x: Any, nd: int = 0, suffix: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.{nd}f}{suffix}" if isinstance(x, (int, float)) else str(x)


def render(res: dict) -> str:
    m = res["meta"]
    sc = res["scenarios"]
    opt = m["analytic_optimum"]
    lines = [
        f"Fleet: fast GPU + slow GPU + hosted API (rpm {m['sims']['hosted']['rpm']}), closed loop C={m['concurrency']}, "
        f"streaming, max_tokens {m['max_tokens']}, ~{m['prompt_tokens']} prompt tokens; "
        f"{m['warmup_s']:g}s warm-up, then measured: throughput/replicas {m['duration_s']:g}s, comparisons "
        f"{m['compare_duration_s']:g}s, oracle {m['oracle_duration_s']:g}s; {m['cpus']} CPUs.",
        f"Analytic optimum {opt['tok_s']:,.0f} tok/s: " + ", ".join(
            f"{n} x{k} = {opt['per_upstream'][n]:,.0f}" for n, k in opt["allocation"].items()) +
        f"; analytic round-robin ~{m['analytic_round_robin_tok_s']:,.0f}.",
        "",
        "| scenario | tok/s | % of oracle | % of analytic optimum | p50 | p99 | TTFT p50 | errors | 429s | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in sc.items():
        if "tok_s" not in r or "upstreams" not in r:
            continue
        share = " ".join(f"{n}:{u['tok_s']:.0f}/{u['mean_inflight'] if u['mean_inflight'] is not None else '-'}"
                         for n, u in r["upstreams"].items())
        note = r.get("notes", "")
        if name == "adapt":
            a = r["adapt"]
            note += (f"; rebalanced in {_f(a['rebalanced_s'], 0, ' s')} (3-s avg {_f(a['rebalanced_s_rolling3'], 0, ' s')};"
                     f" GPU allocation >= 90% of best after {_f(a['gpu_rebalanced_s'], 0, ' s')}),"
                     f" last {a['after_tok_s_last']:,.0f} tok/s = {_f(a['after_pct_of_target'], 0, '%')} of new optimum"
                     f" {a['target_tok_s']:,.0f}")
        if name == "replicas":
            note += "; peak in-flight/limit " + ", ".join(
                f"{n} {v['inflight_peak']}/{v['limit']}" for n, v in r["limits"].items())
        note += f"; tok/s/in-flight per upstream {share}"
        lines.append(
            f"| {name} | {r['tok_s']:,.0f} | {_f(r['pct_of_oracle'], 1, '%')} | {_f(r['pct_of_analytic'], 1, '%')} | "
            f"{_f(r['latency_p50_ms'] and r['latency_p50_ms'] / 1000, 2, ' s')} | "
            f"{_f(r['latency_p99_ms'] and r['latency_p99_ms'] / 1000, 2, ' s')} | {_f(r['ttft_p50_ms'], 0, ' ms')} | "
            f"{r['error_count']} | {r['sim_429']} | {note} |")
    if len(lines) == 5:  # no fleet scenario ran: no empty table
        del lines[2:]
    extra = registry()
    for name, r in sc.items():
        if name in extra and extra[name].render is not None:
            lines += ["", f"### {name}", *extra[name].render(r)]  # type: ignore[misc]
    lines.append("")
    lines.append(f"Per-upstream column: delivered tok/s / mean in-flight at the simulator. Wall time {m['wall_s']:.0f} s.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI

DEFAULT_SCENARIOS = "throughput,round_robin,adapt,replicas,overhead"


def parse(argv: list[str]) -> Opts:
    p = argparse.ArgumentParser(prog="gateway bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                   help="comma list of throughput, round_robin, least_busy, adapt, replicas, overhead "
                        "(the direct-to-sim oracle runs whenever a streaming scenario is chosen)")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds for throughput and replicas (default 60: one hosted rate-limit window, "
                        "so the gateway's burst/pause cycle on the hosted API averages out)")
    p.add_argument("--compare-duration", type=float, default=None,
                   help="measured seconds for round_robin / least_busy (default 25)")
    p.add_argument("--oracle-duration", type=float, default=None, help="measured seconds for the oracle (default 15)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds before measuring (default 2)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop workers (default 32)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt size in tokens (default 200)")
    p.add_argument("--fault-at", type=float, default=None, help="adapt: seconds into the window (default 10)")
    p.add_argument("--adapt-after", type=float, default=None, help="adapt: measured seconds after the fault (default 25)")
    p.add_argument("--slowdown", type=float, default=4.0, help="adapt: slowdown factor of the fault (default 4)")
    p.add_argument("--workers", type=int, default=3, help="replicas: gateway processes")
    p.add_argument("--redis-url", default=os.environ.get("GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
                   help="replicas: shared Redis (default: $GATEWAY_BENCH_REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--overhead-duration", type=float, default=None, help="seconds per overhead sub-phase (default 3)")
    p.add_argument("--overhead-concurrency", type=int, default=32, help="overhead: closed-loop workers (default 32)")
    p.add_argument("--out", default=".bench/result.json", help="result JSON path (default .bench/result.json)")
    p.add_argument("--quick", action="store_true", help="tiny durations (tests, smoke)")
    ns = p.parse_args(argv)
    q = ns.quick

    def pick(v: float | None, full: float, quick: float) -> float:
        return v if v is not None else (quick if q else full)

    return Opts(
        scenarios=[s.strip() for s in ns.scenarios.split(",") if s.strip()],
        duration=pick(ns.duration, 60, 3), compare_duration=pick(ns.compare_duration, 25, 3),
        oracle_duration=pick(ns.oracle_duration, 15, 3), warmup=pick(ns.warmup, 2, 1.5), concurrency=ns.concurrency,
        max_tokens=ns.max_tokens, prompt_tokens=ns.prompt_tokens, fault_at=pick(ns.fault_at, 10, 2),
        adapt_after=pick(ns.adapt_after, 25, 3), slowdown=ns.slowdown, workers=ns.workers, redis_url=ns.redis_url,
        overhead_duration=pick(ns.overhead_duration, 3, 1), overhead_concurrency=ns.overhead_concurrency,
        out=Path(ns.out), quick=q,
    )


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] == "--":  # `gateway bench -- ARGS` (the top-level parser may need the separator)
        argv = argv[1:]
    if argv and argv[0] == "_sims":
        p = argparse.ArgumentParser(prog="gateway.tools.bench _sims")
        p.add_argument("--spec", required=True, help="JSON list of simulators to start (internal)")
        ns = p.parse_args(argv[1:])
        asyncio.run(_sims_main(json.loads(ns.spec)))
        return 0
    o = parse(argv)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    bench = Bench(o)
    try:
        res = asyncio.run(bench.run())
    except KeyboardInterrupt:
        bench.procs.kill_all_now()
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException:
        bench.procs.kill_all_now()
        raise
    o.out.write_text(json.dumps(res, indent=1))
    print()
    print(render(res))
    print(f"\n(full results: {o.out})")
    failed = [n for n, r in res["scenarios"].items() if r.get("error_count")]
    if failed:
        print(f"errors in: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
