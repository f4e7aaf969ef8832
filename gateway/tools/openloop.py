"""Open-loop (Poisson) arrivals on the simulated fleet: its capacity and the latency-optimal static split.

Below saturation every work-conserving router eventually serves everything offered, so tok/s alone cannot rank
them: what placement changes is how long requests take. The reference is a fluid model on the simulators' own
formulas (the same ones as tools/bench.py's closed-loop optimum):

* GPU receiving lam requests/s of P prompt and M output tokens: by Little's law the sequences in it are
  n = lam * (M+1) * step(n), step(n) = base + per_seq*n + prefill_per_token*P*n/M (the closed-loop step of n
  workers), which is linear in n: n = lam*(M+1)*base / (1 - lam*(M+1)*(per_seq + prefill_per_token*P/M)).
  A request takes (M+1)*step(n). Stable while n < slots.
* Hosted: a request takes ttft + (M-1)/tok_s; lam is capped by rpm, tpm and max_concurrency.

`best_split` gives each upstream the share of the arrivals that minimises the mean latency (marginal-cost
water-filling in small steps, exact up to the step for these convex costs). The scenario measures that split as
the oracle: each arrival is sent straight to a simulator drawn with those probabilities (no gateway); it ignores
Poisson burstiness, which a router that looks at the live load can absorb better than a static split.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable

import aiohttp

from gateway.sim import SimConfig
from gateway.tools import bench as B

#: A run_phase `load`: drives requests into the recorder until the phase's stop time.
Load = Callable[[aiohttp.ClientSession, B.Recorder, float], Awaitable[None]]


def latency(c: SimConfig, lam: float, m: int, p: int) -> float:
    """Seconds per request at `lam` arrivals/s (inf past the upstream's capacity); 0 arrivals: an idle request."""
    if c.mode != "gpu":
        return c.ttft + (m - 1) / c.tok_s if lam <= max_rate(c, m, p) + 1e-9 else math.inf
    per = c.per_seq + c.prefill_per_token * p / m
    den = 1.0 - lam * (m + 1) * per
    if den <= 0:
        return math.inf
    n = lam * (m + 1) * c.base_step / den
    if n >= c.slots:
        return math.inf
    return (m + 1) * (c.base_step + per * n)


def max_rate(c: SimConfig, m: int, p: int) -> float:
    """Most arrivals/s the upstream sustains (GPU: its slots all running; hosted: its limits)."""
    if c.mode == "gpu":
        n = c.slots
        return n / ((m + 1) * (c.base_step + (c.per_seq + c.prefill_per_token * p / m) * n))
    t = c.ttft + (m - 1) / c.tok_s
    caps = [c.max_concurrency / t if c.max_concurrency else math.inf]
    if c.rpm:
        caps.append(c.rpm / c.window)
    if c.tpm:
        caps.append(c.tpm / c.window / (p + m))
    return min(caps)


def capacity(sims: dict[str, SimConfig], m: int, p: int) -> float:
    """The fleet's most sustainable arrivals/s."""
    return sum(max_rate(c, m, p) for c in sims.values())


def best_split(sims: dict[str, SimConfig], lam: float, m: int, p: int, steps: int = 400) -> dict[str, float]:
    """Arrival rate per upstream minimising the mean latency of `lam` arrivals/s (raises ValueError past capacity).

    Each of `steps` increments of the rate goes where it adds the least total latency (lam_k * L_k(lam_k)).
    """
    if lam >= capacity(sims, m, p):
        raise ValueError(f"{lam:.2f} arrivals/s is beyond the fleet's capacity")
    d = lam / steps
    rates = dict.fromkeys(sims, 0.0)

    def cost(k: str, x: float) -> float:
        return x * latency(sims[k], x, m, p)

    for _ in range(steps):
        k = min(sims, key=lambda k: cost(k, rates[k] + d) - cost(k, rates[k]))
        rates[k] += d
    return rates


def mean_latency(sims: dict[str, SimConfig], rates: dict[str, float], m: int, p: int) -> float:
    total = sum(rates.values())
    return sum(r * latency(sims[k], r, m, p) for k, r in rates.items() if r > 0) / total


def poisson_load(choices: list[tuple[str, bytes]], weights: list[float], rate: float, sent: list[float] | None = None,
                 seed: int = 14) -> Load:
    """A run_phase `load`: Poisson arrivals at `rate`/s, each sent to a (url, body) drawn with `weights`; the
    arrival times (seconds since the phase's origin) are appended to `sent`. Same seed, same arrivals.

    Arrivals are scheduled on absolute times (each one `expovariate` after the previous *schedule*, not after the
    previous wake-up), so the event loop's lateness does not thin the process below its rate."""
    rnd = random.Random(seed)

    async def load(session: aiohttp.ClientSession, rec: B.Recorder, stop_at: float) -> None:
        pending: set[asyncio.Task] = set()
        next_at = time.monotonic()
        try:
            while True:
                next_at += rnd.expovariate(rate)
                if next_at >= stop_at:
                    break
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                if sent is not None:
                    sent.append(time.monotonic() - rec.origin)
                url, body = rnd.choices(choices, weights)[0]
                t = asyncio.create_task(send_logged(session, url, body, rec))
                pending.add(t)
                t.add_done_callback(pending.discard)
        finally:
            for t in list(pending):
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    return load


async def send_logged(session: aiohttp.ClientSession, url: str, body: bytes, rec: B.Recorder) -> None:
    """One streamed request; a transport failure is recorded as an error, not raised (an open loop goes on)."""
    try:
        await B._stream_once(session, url, body, rec)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as e:
        rec.error(type(e).__name__, time.monotonic() - rec.origin)
