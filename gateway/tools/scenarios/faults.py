"""`faults` bench scenario: the reference fleet under load while upstreams fail (issue 15).

Timeline (seconds into the measured window; `--quick` compresses it): slow-gpu's simulator process is killed with
requests in flight and restarted on the same port 2 s later; later fast-gpu fails 30% of its requests for a while.
Reported: client-visible failures (per kind), seconds from slow-gpu's restart to its first completed request via
the gateway (recovery), slow-gpu's share of attempts during the error phase, and the gateway's RSS (start, peak,
end). The simulator being killed runs in its own process so the others keep serving.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from gateway.tools import bench as B
from gateway.tools.scenarios import scenario

VICTIM = "slow-gpu"
FLAKY = "fast-gpu"


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _stats(session: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with session.get(url + "/sim/stats", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return await r.json()
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
        return None


class _Run:
    """The fault events of one run and what they measured."""

    def __init__(self, bench: Any, victim: B.SimFleetProc, others: B.SimFleetProc, gw: B.GatewayProc) -> None:
        self.b, self.victim, self.others, self.gw = bench, victim, others, gw
        self.port = victim.ports[VICTIM]
        self.recovery_s: float | None = None
        self.rss: list[float] = []
        self.flaky_attempts: dict[str, int] = {}

    async def kill(self) -> None:
        await self.b.procs.stop(self.victim.proc, grace=0.0)

    async def restart(self) -> None:
        self.victim = await _start_on_port(self.b, {VICTIM: self.b.sims[VICTIM]}, self.port)
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as s:
            while time.monotonic() - t0 < 20:
                st = await _stats(s, self.victim.url(VICTIM))
                if st and st["completed"] > 0:
                    self.recovery_s = round(time.monotonic() - t0, 2)
                    return
                await asyncio.sleep(0.1)

    async def flaky(self, rate: float) -> None:
        async with aiohttp.ClientSession() as s:
            before = await _stats(s, self.others.url(FLAKY))
            async with s.post(self.others.url(FLAKY) + "/sim/faults", json={"error_rate": rate}) as r:
                r.raise_for_status()
            if rate == 0 and before is not None:
                self.flaky_attempts["end"] = before["completed"] + before["errors_500"]
            elif before is not None:
                self.flaky_attempts["start"] = before["completed"] + before["errors_500"]

    async def watch_rss(self, until: float) -> None:
        while time.monotonic() < until:
            v = _rss_mb(self.gw.proc.pid)
            if v is not None:
                self.rss.append(v)
            await asyncio.sleep(0.5)


async def _start_on_port(bench: Any, sims: dict, port: int) -> B.SimFleetProc:
    """Restart one simulator on a fixed port (the spec's `port` key, read by bench._sims_main)."""
    import json
    import sys

    spec = {n: {**asdict(c), "port": port} for n, c in sims.items()}
    proc = await bench.procs.start([sys.executable, "-m", "gateway.tools.bench", "_sims", "--spec", json.dumps(spec)],
                                   "sims-faults-victim-2.log", stdout_pipe=True)
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if not line:
            raise RuntimeError("restarted simulator exited")
        if line.startswith(b"READY "):
            return B.SimFleetProc(proc, json.loads(line[6:]))


@scenario("faults", render=lambda r: render(r))
async def run(bench: Any) -> dict:
    o = bench.o
    scale = 0.5 if o.quick else 2.0
    kill_at, restart_at, flaky_at, flaky_end = 1.0 * scale, 3.0 * scale, 6.0 * scale, 10.0 * scale
    duration = flaky_end + 2.0 * scale
    victim = await B.start_sims(bench.procs, {VICTIM: bench.sims[VICTIM]}, "faults-victim")
    others = await B.start_sims(bench.procs, {k: v for k, v in bench.sims.items() if k != VICTIM}, "faults-others")
    ports = {**others.ports, **victim.ports}
    gw = await B.start_gateway(bench.procs, B.fleet_yaml(ports, bench.sims, "throughput"), "faults")
    f = _Run(bench, victim, others, gw)
    try:
        rss_task = asyncio.create_task(f.watch_rss(time.monotonic() + o.warmup + duration + 1))
        r = await B.run_phase(
            bench._gw_targets(gw), o.warmup, duration, sims=None, gateway=gw,
            events=[(kill_at, f.kill), (restart_at, f.restart),
                    (flaky_at, lambda: f.flaky(0.3)), (flaky_end, lambda: f.flaky(0.0))],
        )
        await rss_task
    finally:
        await bench._teardown(gw, f.victim, others)
    r.pop("timeline", None)
    fa = f.flaky_attempts
    r["faults"] = {
        "client_failures": r["error_count"],
        "client_failure_pct": round(100 * r["error_count"] / max(1, r["requests"] + r["error_count"]), 3),
        "recovery_s": f.recovery_s,
        "flaky_attempts_during_errors": (fa["end"] - fa["start"]) if "end" in fa and "start" in fa else None,
        "rss_mb": {"start": f.rss[0] if f.rss else None, "peak": max(f.rss) if f.rss else None,
                   "end": f.rss[-1] if f.rss else None},
        "timeline_s": {"kill": kill_at, "restart": restart_at, "errors_30pct": [flaky_at, flaky_end]},
    }
    r["notes"] = f"{VICTIM} killed at +{kill_at:g}s, restarted at +{restart_at:g}s; {FLAKY} 30% errors " \
                 f"+{flaky_at:g}..{flaky_end:g}s"
    return r


def render(r: dict) -> list[str]:
    f = r["faults"]
    rss = f["rss_mb"]
    return [
        f"{r['notes']}.",
        "",
        "| client-visible failures | recovery after restart | fast-gpu attempts while failing | RSS start / peak / end |",
        "|---|---|---|---|",
        f"| {f['client_failures']} ({f['client_failure_pct']}%) {r['errors'] or ''} | {B._f(f['recovery_s'], 2, ' s')} "
        f"| {B._f(f['flaky_attempts_during_errors'])} | {rss['start']} / {rss['peak']} / {rss['end']} MB |",
    ]
