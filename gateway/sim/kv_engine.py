"""A vLLM-like GPU engine bounded by KV-cache tokens: prefix caching, chunked prefill, preemption, spec decode.

Selected by `--preset` or `--kv-cache-tokens` (the simple GpuEngine stays the default). Each step the
scheduler (as vLLM v1 with chunked prefill) spends a token budget (`max_batched_tokens`):

1. running sequences that are decoding get 1 token each (1 + k with speculative decoding). A sequence whose
   next token needs a new KV block when none is free preempts the most recently admitted running sequence:
   it loses its blocks and goes back to the head of the queue, to be *recomputed* (prompt + tokens generated
   so far) when re-admitted; its prompt blocks stay in the prefix cache until evicted, so recompute may hit.
2. sequences part-way through their prefill get the next chunk of what is left of the budget;
3. waiting sequences are admitted (FIFO, at most `slots` running) while their whole prompt's blocks fit;
   cached prefix blocks are shared and only the uncached tokens are prefilled.

Without chunked prefill (vLLM v0) a step that admits anything is prefill-only: whole prompts, decodes
stall for that step. Step time comes from the cost model (gateway.sim.profile). `schedule()` decides and
prices a step without touching time, `commit()` applies it; the async loop sleeps in between, and tests can
drive the two directly without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.sim.engine import GpuEngine, PromptTooLong, TokenStream, _Seq
from gateway.sim.kvcache import KvAlloc, KvCache
from gateway.sim.profile import PRESETS, CostModel, StepLoad

if TYPE_CHECKING:
    from gateway.sim.server import SimConfig


class KvSeq(_Seq):
    """A sequence with KV state: `computed` tokens have KV; `target` is what its prefill must reach."""

    __slots__ = ("hashes", "computed", "target", "alloc", "cached_tokens", "preempted")

    def __init__(self, engine: GpuEngine, sid: int, prompt_tokens: int, n: int, hashes: Sequence[int]) -> None:
        super().__init__(engine, sid, prompt_tokens, n)
        self.hashes = list(hashes)
        self.computed = 0
        self.target = prompt_tokens
        self.alloc: KvAlloc | None = None
        self.cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.preempted = 0


@dataclass
class StepPlan:
    """One step: (sequence, prefill tokens) chunks, decoding sequences, and its priced duration."""

    prefill: list[tuple[KvSeq, int]] = field(default_factory=list)
    decode: list[KvSeq] = field(default_factory=list)
    load: StepLoad = field(default_factory=StepLoad)
    seconds: float = 0.0


def cost_model(cfg: SimConfig) -> tuple[CostModel, int, int]:
    """(cost model, KV capacity in tokens, per-step token budget) for a config: preset values unless set."""
    p = PRESETS.get(cfg.preset or "")
    if cfg.preset and p is None:
        raise ValueError(f"unknown preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    capacity = cfg.kv_cache_tokens or (p.kv_cache_tokens if p else 0)
    if capacity <= 0:
        raise ValueError("the KV engine needs --kv-cache-tokens or a --preset")
    budget = cfg.max_batched_tokens or (p.max_batched_tokens if p else 2048)
    if cfg.block_size < 1 or cfg.spec_k < 0 or not 0.0 <= cfg.spec_accept <= 1.0 or budget < 1 + cfg.spec_k:
        raise ValueError("need block_size >= 1, spec_k >= 0, 0 <= spec_accept <= 1, max_batched_tokens > spec_k")
    if p is None:
        return CostModel("simple", base_step=cfg.base_step, per_seq=cfg.per_seq,
                         prefill_per_token=cfg.prefill_per_token, spec_draft_cost=cfg.spec_draft_cost), capacity, budget
    return CostModel(p.cost, p.table, p.kv_ms_per_1k, capacity, spec_draft_cost=cfg.spec_draft_cost), capacity, budget


class KvEngine(GpuEngine):
    """GpuEngine whose capacity is KV-cache blocks, not slots alone (see the module docstring)."""

    mode = "gpu"

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self.cost, capacity, self.budget = cost_model(cfg)
        self.kv = KvCache(max(1, capacity // cfg.block_size), cfg.block_size, cfg.prefix_caching)
        self.capacity_tokens = self.kv.num_blocks * cfg.block_size
        self._waiting: deque[KvSeq] = deque()  # type: ignore[assignment]
        self._running: dict[int, KvSeq] = {}  # type: ignore[assignment]

    @property
    def prefix_block_size(self) -> int | None:
        return self.cfg.block_size if self.cfg.prefix_caching else None

    @property
    def prefix_queries(self) -> int:
        return self.kv.queries

    @property
    def prefix_hits(self) -> int:
        return self.kv.hits

    def kv_usage(self) -> float:
        return self.kv.usage

    def open(self, prompt_tokens: int, n_tokens: int, budget: int, hashes: Sequence[int] = ()) -> TokenStream:
        if prompt_tokens + n_tokens > self.capacity_tokens:
            raise PromptTooLong(f"prompt ({prompt_tokens}) + max tokens ({n_tokens}) exceed the KV cache "
                                f"({self.capacity_tokens} tokens)")
        return self._enqueue(KvSeq(self, next(self._seq_ids), max(1, prompt_tokens), n_tokens, hashes))

    def _drop(self, seq: _Seq) -> None:
        super()._drop(seq)
        if isinstance(seq, KvSeq) and seq.alloc is not None:
            self.kv.free(seq.alloc)
            seq.alloc = None

    # -- scheduling (pure: no time) -----------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        left = self.budget
        if not self.cfg.chunked_prefill:
            left = self._admit_whole(plan, left)
            if plan.prefill:
                return self._price(plan)
        left = self._schedule_decodes(plan, left)
        for seq in list(self._running.values()):
            if seq.computed < seq.target and left > 0:
                chunk = min(seq.target - seq.computed, left)
                plan.prefill.append((seq, chunk))
                left -= chunk
        self._admit_chunked(plan, left)
        return self._price(plan)

    def _schedule_decodes(self, plan: StepPlan, left: int) -> int:
        need = 1 + self.cfg.spec_k
        for seq in list(self._running.values()):
            if seq.id not in self._running or seq.computed < seq.target:
                continue
            if left < need:
                break
            assert seq.alloc is not None
            while not self.kv.grow(seq.alloc, seq.computed + need):
                victim = next(reversed(self._running.values()))
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                plan.decode.append(seq)
                left -= need
        return left

    def _try_admit(self, seq: KvSeq) -> bool:
        """Allocate blocks for `seq`'s whole prefill target and move it to running; False if it does not fit."""
        got = self.kv.allocate(seq.hashes, seq.prompt_tokens, seq.target)
        if got is None:
            return False
        seq.alloc, cached = got
        seq.computed = min(cached, seq.target - 1)
        if seq.cached_tokens is None:
            seq.cached_tokens = cached
            self.prompt_tokens_total += seq.prompt_tokens
        self._waiting.popleft()
        self._running[seq.id] = seq
        return True

    def _admit_chunked(self, plan: StepPlan, left: int) -> None:
        while self._waiting and left > 0 and len(self._running) < max(1, self.cfg.slots):
            seq = self._waiting[0]
            if not self._try_admit(seq):
                break
            chunk = min(seq.target - seq.computed, left)
            plan.prefill.append((seq, chunk))
            left -= chunk

    def _admit_whole(self, plan: StepPlan, left: int) -> int:
        while self._waiting and len(self._running) < max(1, self.cfg.slots):
            seq = self._waiting[0]
            if (plan.prefill and seq.target > left) or not self._try_admit(seq):
                break
            chunk = seq.target - seq.computed
            plan.prefill.append((seq, chunk))
            left -= chunk
        return left

    def _preempt(self, seq: KvSeq) -> None:
        """vLLM's recompute preemption: drop the KV, requeue at the head, prefill prompt + output again."""
        del self._running[seq.id]
        if seq.alloc is not None:
            self.kv.free(seq.alloc)
            seq.alloc = None
        seq.computed = 0
        seq.target = seq.prompt_tokens + seq.emitted
        seq.preempted += 1
        self.preemptions += 1
        self._waiting.appendleft(seq)

    def _price(self, plan: StepPlan) -> StepPlan:
        k = self.cfg.spec_k
        dec = len(plan.decode)
        pre = sum(c for _, c in plan.prefill)
        kv_read = sum(s.computed + 1 + k for s in plan.decode) + sum(s.computed + c for s, c in plan.prefill)
        plan.load = StepLoad(seqs=dec + len(plan.prefill), decode_seqs=dec, batched_tokens=dec * (1 + k) + pre,
                             prefill_tokens=pre, kv_read=kv_read,
                             active_kv=sum(s.computed for s in self._running.values()), spec_k=k if dec else 0)
        plan.seconds = self.cost.step_seconds(plan.load) * self.slowdown_now()
        return plan

    def commit(self, plan: StepPlan) -> None:
        """Apply a step: prefill progress, first tokens of finished prefills, decode (+ accepted drafts)."""
        self.steps += 1
        for seq, chunk in plan.prefill:
            if seq.closed or seq.id not in self._running:
                continue
            seq.computed += chunk
            if seq.computed >= seq.target:
                assert seq.alloc is not None
                self.kv.commit_prompt(seq.alloc, seq.hashes)
                self._emit(seq, 1)
        for seq in plan.decode:
            if not seq.closed and seq.id in self._running:
                self._emit(seq, self._accepted())

    def _accepted(self) -> int:
        """Tokens one decode step yields: 1, or with speculation 1 + the accepted run of k drafts."""
        k, a, n = self.cfg.spec_k, self.cfg.spec_accept, 0
        while n < k and self.rng.random() < a:
            n += 1
        return 1 + n

    def _emit(self, seq: KvSeq, count: int) -> None:
        for _ in range(min(count, seq.n - seq.emitted)):
            seq.queue.put_nowait(seq.emitted)
            seq.emitted += 1
            seq.computed += 1
            self.tokens_generated += 1
        seq.target = max(seq.target, seq.computed)
        if seq.emitted >= seq.n:
            del self._running[seq.id]
            if seq.alloc is not None:
                self.kv.free(seq.alloc)
                seq.alloc = None
            self.completed += 1

    async def _run(self) -> None:
        deadline = time.monotonic()
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
            plan = self.schedule()
            if not plan.prefill and not plan.decode:
                await asyncio.sleep(0.001)  # nothing fits this instant (all preempted); retry shortly
                continue
            now = time.monotonic()
            if deadline < now - plan.seconds:
                deadline = now
            deadline += plan.seconds
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            self.commit(plan)
