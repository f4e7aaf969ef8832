"""Simulated upstream models: the shared base and the GPU continuous-batching engine.

A model hands out *token streams*: async iterators yielding token indices 0..n-1 at the
pace the simulated hardware would produce them. The HTTP layer (server.py) turns indices
into wire-format chunks; closing a stream early frees its slot.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.sim.server import SimConfig


class SimStopped(Exception):
    """The model shut down while a stream was still open."""


class PromptTooLong(Exception):
    """The request can never fit this engine (prompt + output beyond its KV cache): a 400."""


class RateLimited(Exception):
    """Admission refused; `retry_after` is seconds until a retry can succeed."""

    def __init__(self, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


class TokenStream:
    """Async iterator of token indices; `close()` must be called when done (idempotent).
    `cached_tokens`: prompt tokens served from a prefix / prompt cache, None when the model has no cache."""

    n: int
    cached_tokens: int | None = None

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class SimModel:
    """State and counters shared by both modes. `cfg` is live: faults mutate it."""

    mode = "base"

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.fail_streams_after: int | None = None
        self.started_at = time.monotonic()
        self.completed = 0
        self.tokens_generated = 0
        self.prompt_tokens_total = 0
        self.rejected_429 = 0
        self.errors_500 = 0
        self.inflight_peak = 0
        self.preemptions = 0
        self._ids = 0

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.started_at = time.monotonic()

    async def stop(self) -> None:
        pass

    # -- admission -------------------------------------------------------------------
    def open(self, prompt_tokens: int, n_tokens: int, budget: int, hashes: Sequence[int] = ()) -> TokenStream:
        """Admit a request producing `n_tokens`; `budget` is its tpm cost; `hashes` its prompt's chained
        block hashes (gateway.routing.prefix) when `prefix_block_size` asks for them. May raise RateLimited."""
        raise NotImplementedError

    @property
    def prefix_block_size(self) -> int | None:
        """Block size the model caches prompt prefixes in, or None (no prefix cache: no hashing needed)."""
        return None

    @property
    def prefix_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache (vllm:prefix_cache_queries_total)."""
        return 0

    @property
    def prefix_hits(self) -> int:
        """Of those, tokens found cached (vllm:prefix_cache_hits_total)."""
        return 0

    def kv_usage(self) -> float:
        """Fraction of the KV cache in use; the slot model approximates it by running / slots."""
        return self.running / max(1, self.cfg.slots)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def roll_error(self) -> bool:
        """True if this request should fail with a 500 (per `error_rate`)."""
        if self.cfg.error_rate > 0 and self.rng.random() < self.cfg.error_rate:
            self.errors_500 += 1
            return True
        return False

    def slowdown_now(self) -> float:
        """Current slowdown multiplier, including the scheduled `slowdown_at` step."""
        s = self.cfg.slowdown
        at = self.cfg.slowdown_at
        if at is not None and time.monotonic() - self.started_at >= at:
            s *= self.cfg.slowdown_factor
        return s

    # -- observation -----------------------------------------------------------------
    @property
    def running(self) -> int:
        return 0

    @property
    def waiting(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "waiting": self.waiting,
            "completed": self.completed,
            "tokens_generated": self.tokens_generated,
            "rejected_429": self.rejected_429,
            "inflight_peak": self.inflight_peak,
            "errors_500": self.errors_500,
            "prompt_tokens": self.prompt_tokens_total,
            "preemptions": self.preemptions,
            "prefix_cache_queries": self.prefix_queries,
            "prefix_cache_hits": self.prefix_hits,
            "kv_cache_usage": self.kv_usage(),
            "mode": self.mode,
            "slowdown": self.slowdown_now(),
        }


class _Seq(TokenStream):
    """One sequence in the engine; receives token indices through a queue."""

    __slots__ = ("engine", "id", "n", "prompt_tokens", "emitted", "received", "queue", "closed")

    def __init__(self, engine: GpuEngine, sid: int, prompt_tokens: int, n: int) -> None:
        self.engine = engine
        self.id = sid
        self.n = n
        self.prompt_tokens = prompt_tokens
        self.emitted = 0
        self.received = 0
        self.queue: asyncio.Queue[int | BaseException] = asyncio.Queue()
        self.closed = False

    async def __anext__(self) -> int:
        if self.received >= self.n:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        self.received += 1
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine._drop(self)


class GpuEngine(SimModel):
    """vLLM-like continuous batching: one loop, every running sequence gets a token per step.

    step_time = (base_step + per_seq * running + prefill_per_token * admitted prompt tokens)
    * slowdown. Sequences beyond `slots` wait in a FIFO queue.
    """

    mode = "gpu"

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self._waiting: deque[_Seq] = deque()
        self._running: dict[int, _Seq] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0
        self._seq_ids = itertools.count(1)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def start(self) -> None:
        await super().start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for seq in [*self._running.values(), *self._waiting]:
            seq.queue.put_nowait(SimStopped("engine stopped"))
        self._running.clear()
        self._waiting.clear()

    def open(self, prompt_tokens: int, n_tokens: int, budget: int, hashes: Sequence[int] = ()) -> TokenStream:
        return self._enqueue(_Seq(self, next(self._seq_ids), prompt_tokens, n_tokens))

    def _enqueue(self, seq: _Seq) -> _Seq:
        """Queue a new sequence for the scheduler (one asking for no tokens is finished at once)."""
        if seq.n <= 0:
            seq.closed = True
            self.completed += 1
            return seq
        self._waiting.append(seq)
        self.inflight_peak = max(self.inflight_peak, self.running + self.waiting)
        self._wake.set()
        return seq

    def _drop(self, seq: _Seq) -> None:
        if self._running.pop(seq.id, None) is None:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass

    def _admit(self) -> int:
        """Move waiting sequences into free slots; return their prompt tokens (prefill work)."""
        prefill = 0
        while self._waiting and len(self._running) < max(1, self.cfg.slots):
            seq = self._waiting.popleft()
            self._running[seq.id] = seq
            prefill += seq.prompt_tokens
            self.prompt_tokens_total += seq.prompt_tokens
        return prefill

    def step_time(self, running: int, prefill_tokens: int) -> float:
        c = self.cfg
        return (c.base_step + c.per_seq * running + c.prefill_per_token * prefill_tokens) * self.slowdown_now()

    async def _run(self) -> None:
        deadline = time.monotonic()
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
            prefill = self._admit()
            if not self._running:
                continue
            step = self.step_time(len(self._running), prefill)
            now = time.monotonic()
            # Absolute deadlines absorb sleep overshoot; after idling or a big stall, restart the clock.
            if deadline < now - step:
                deadline = now
            deadline += step
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            self.steps += 1
            for seq in list(self._running.values()):
                seq.queue.put_nowait(seq.emitted)
                seq.emitted += 1
                self.tokens_generated += 1
                if seq.emitted >= seq.n:
                    del self._running[seq.id]
                    self.completed += 1
