"""Hosted-API model: independent requests (ttft, then tok_s) behind rpm/tpm/concurrency limits."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import TYPE_CHECKING

from gateway.sim.engine import RateLimited, SimModel, SimStopped, TokenStream

if TYPE_CHECKING:
    from gateway.sim.server import SimConfig


class RateLimiter:
    """Sliding-window request and token limits over `cfg.window` seconds (read live from cfg)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self._reqs: deque[float] = deque()
        self._toks: deque[tuple[float, int]] = deque()
        self._tok_sum = 0

    def _prune(self, now: float) -> None:
        cutoff = now - self.cfg.window
        while self._reqs and self._reqs[0] <= cutoff:
            self._reqs.popleft()
        while self._toks and self._toks[0][0] <= cutoff:
            self._tok_sum -= self._toks.popleft()[1]

    def acquire(self, tokens: int, now: float | None = None) -> None:
        """Record one request costing `tokens`, or raise RateLimited with the wait until it fits."""
        now = time.monotonic() if now is None else now
        self._prune(now)
        window, rpm, tpm = self.cfg.window, self.cfg.rpm, self.cfg.tpm
        if rpm is not None and len(self._reqs) >= rpm:
            # Enough of the oldest requests must age out to leave one free slot.
            idx = len(self._reqs) - rpm
            wait = self._reqs[idx] + window - now if rpm > 0 else window
            raise RateLimited(wait, f"Rate limit reached: {rpm} requests per {window:g}s")
        if tpm is not None and self._tok_sum + tokens > tpm:
            wait, freed = window, 0
            if tokens <= tpm:
                for ts, amount in self._toks:
                    freed += amount
                    if self._tok_sum - freed + tokens <= tpm:
                        wait = ts + window - now
                        break
            raise RateLimited(wait, f"Rate limit reached: {tpm} tokens per {window:g}s (request needs {tokens})")
        self._reqs.append(now)
        self._toks.append((now, tokens))
        self._tok_sum += tokens

    def headers(self) -> dict[str, str]:
        """OpenAI-style x-ratelimit-* headers for the configured limits."""
        self._prune(time.monotonic())
        out: dict[str, str] = {}
        if self.cfg.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(self.cfg.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.cfg.rpm - len(self._reqs)))
        if self.cfg.tpm is not None:
            out["x-ratelimit-limit-tokens"] = str(self.cfg.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.cfg.tpm - self._tok_sum))
        return out


def retry_after_header(seconds: float) -> str:
    """Retry-After as whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds - 1e-6)))


class _HostedStream(TokenStream):
    """First token after ttft*slowdown, then one every slowdown/tok_s seconds."""

    def __init__(self, model: HostedModel, n: int) -> None:
        self.model = model
        self.n = n
        self.i = 0
        self.t0 = time.monotonic()
        self.deadline = self.t0
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._stopped = False

    async def __anext__(self) -> int:
        if self.i >= self.n:
            raise StopAsyncIteration
        if self._stopped:
            raise SimStopped("model stopped")
        cfg, slow = self.model.cfg, self.model.slowdown_now()
        if self.i == 0:
            self.deadline = self.t0 + cfg.ttft * slow
        else:
            self.deadline += slow / max(cfg.tok_s, 1e-9)
        await self._sleep(self.deadline - time.monotonic())
        i = self.i
        self.i += 1
        self.model.tokens_generated += 1
        if self.i == self.n:
            self.model.completed += 1
        return i

    async def _sleep(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(max(0.0, delay), lambda: None if fut.done() else fut.set_result(None))
        self._waiter = fut
        try:
            await fut
        finally:
            handle.cancel()
            self._waiter = None

    def abort(self) -> None:
        self._stopped = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(SimStopped("model stopped"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.model._streams.discard(self)


class HostedModel(SimModel):
    """Each request is independent; admission enforces max_concurrency, rpm and tpm."""

    mode = "hosted"

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self.limiter = RateLimiter(cfg)
        self._streams: set[_HostedStream] = set()

    @property
    def running(self) -> int:
        return len(self._streams)

    def open(self, prompt_tokens: int, n_tokens: int, budget: int) -> TokenStream:
        mc = self.cfg.max_concurrency
        try:
            if mc is not None and len(self._streams) >= mc:
                raise RateLimited(1.0, f"Too many concurrent requests (max {mc})")
            self.limiter.acquire(budget)
        except RateLimited:
            self.rejected_429 += 1
            raise
        self.prompt_tokens_total += prompt_tokens
        stream = _HostedStream(self, n_tokens)
        self._streams.add(stream)
        self.inflight_peak = max(self.inflight_peak, len(self._streams))
        if n_tokens <= 0:
            self.completed += 1
        return stream

    async def stop(self) -> None:
        for s in list(self._streams):
            s.abort()
