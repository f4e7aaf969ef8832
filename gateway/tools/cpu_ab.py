"""Paired A/B of the gateway's CPU per request: two source trees, one simulator, the same load.

On a shared, noisy machine two separate runs of `gateway bench --scenarios overhead` can differ by 2x; a change
worth 20% is invisible in them. Here gateway A (one source tree) and gateway B (another) run at the same time
behind one near-instant simulator (the overhead scenario's), and every closed-loop worker alternates its requests
between them, so both see the same load, the same neighbours and the same moment. CPU per request is each
gateway process group's utime+stime (/proc) over the window divided by the requests it answered. Each round
swaps which gateway a worker calls first; the result is B's CPU per request over A's, per round and as a median.
Requests are non-streamed with max_tokens 1 (the overhead scenario's), or with `--stream` 20-chunk streams.

    gateway cpu-ab --a /work/main --b . --rounds 6 --seconds 8 [--stream]   (or python -m gateway.tools.cpu_ab)

Both trees must be importable as `gateway` from their directory (each gateway runs with that directory as its
working directory and PYTHONPATH). Errors (non-200 answers) are counted and reported; a run with errors is not
a valid comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from gateway.sim import SimConfig
from gateway.tools import bench as B
from gateway.tools.scenarios.overhead import STREAM_CHUNKS, _tiny_fleet


async def _load(urls: tuple[str, str], body: bytes, seconds: float, concurrency: int, flip: bool) -> list[int]:
    """Closed loop; worker i alternates between the two URLs, starting with A or B by parity (and `flip`).
    Returns [errors] + requests answered 200 by A and by B."""
    ok = [0, 0]
    errors = 0
    stop_at = time.monotonic() + seconds
    hdrs = {"Content-Type": "application/json"}

    async def worker(first: int) -> None:
        nonlocal errors
        side = first
        while time.monotonic() < stop_at:
            try:
                async with session.post(urls[side], data=body, headers=hdrs) as r:
                    await r.read()
                    if r.status == 200:
                        ok[side] += 1
                    else:
                        errors += 1
            except (aiohttp.ClientError, OSError):
                errors += 1
                await asyncio.sleep(0.05)
            side ^= 1

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(worker((i + flip) % 2) for i in range(concurrency)))
    return [errors, *ok]


async def run(a: Path, b: Path, rounds: int, seconds: float, concurrency: int, warmup: float,
              stream: bool = False) -> dict:
    logdir = Path(tempfile.mkdtemp(prefix="cpu_ab-"))
    procs = B.Procs(logdir)
    tiny = {"tiny": SimConfig(name="sim-tiny", mode="gpu", base_step=0.0005, per_seq=0.0, prefill_per_token=0.0,
                              slots=1024)}
    try:
        sims = await B.start_sims(procs, tiny, "ab")
        fleet = _tiny_fleet(sims.url("tiny"))
        gws = [await B.start_gateway(procs, fleet, tag, env={"PYTHONPATH": str(tree)}, cwd=str(tree))
               for tag, tree in (("A", a), ("B", b))]
        urls = (gws[0].url + "/v1/chat/completions", gws[1].url + "/v1/chat/completions")
        body = B.chat_body("tiny-model", 8, STREAM_CHUNKS if stream else 1, stream=stream)
        await _load(urls, body, warmup, concurrency, False)
        out: list[dict] = []
        for r in range(rounds):
            cpu0 = [B.group_cpu_seconds(g.proc.pid) for g in gws]
            errors, na, nb = await _load(urls, body, seconds, concurrency, bool(r % 2))
            cpu1 = [B.group_cpu_seconds(g.proc.pid) for g in gws]
            ms = [1000 * (cpu1[i] - cpu0[i]) / n if n else None for i, n in enumerate((na, nb))]
            row = {"round": r + 1, "a_first": not r % 2, "requests": [na, nb], "errors": errors,
                   "a_ms": round(ms[0], 3) if ms[0] else None, "b_ms": round(ms[1], 3) if ms[1] else None,
                   "ratio_b_a": round(ms[1] / ms[0], 3) if ms[0] and ms[1] else None}
            print(json.dumps(row), flush=True)
            out.append(row)
        ratios: list[float] = [r["ratio_b_a"] for r in out if r["ratio_b_a"]]
        return {"a": str(a), "b": str(b), "stream": stream, "rounds": out, "errors": sum(r["errors"] for r in out),
                "median_ratio_b_a": round(statistics.median(ratios), 3) if ratios else None,
                "mean_ratio_b_a": round(statistics.fmean(ratios), 3) if ratios else None}
    finally:
        await procs.stop_all()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gateway cpu-ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="source tree of gateway A (the baseline)")
    p.add_argument("--b", type=Path, required=True, help="source tree of gateway B (the candidate)")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds; odd ones call A first (default 6)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per round (default 8)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop workers (default 16)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (default 2)")
    p.add_argument("--stream", action="store_true", help="20-chunk streams instead of non-streamed requests")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    ns = p.parse_args(argv)
    res = asyncio.run(run(ns.a.resolve(), ns.b.resolve(), ns.rounds, ns.seconds, ns.concurrency, ns.warmup,
                        ns.stream))
    if ns.out:
        ns.out.write_text(json.dumps(res, indent=1))
    print(f"CPU per request B/A: median {res['median_ratio_b_a']}, mean {res['mean_ratio_b_a']}, errors {res['errors']}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
