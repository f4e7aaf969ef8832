"""The simulated GPU's KV cache: a pool of fixed-size token blocks with automatic prefix caching (as vLLM's).

Pure bookkeeping, no time and no I/O. A running sequence holds blocks for every token whose KV it keeps.
With prefix caching on, the full blocks of a prompt are registered under their chained hash
(gateway.routing.prefix, the same function the router uses) once the prompt has been computed; later prompts
starting with the same blocks take references to them instead of recomputing them. A cached block is shared
by every running sequence that uses it and cannot be evicted while any of them runs; when its last user
finishes it joins an LRU of evictable blocks, which are reused (and forgotten) only when no empty block is
left. So "KV usage" (vLLM's kv_cache_usage_perc) counts blocks held by running sequences, not cached ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class KvAlloc:
    """The blocks one sequence holds: shared prefix blocks (by hash) and private ones (a count)."""

    hashes: list[int] = field(default_factory=list)
    private: int = 0

    @property
    def blocks(self) -> int:
        return len(self.hashes) + self.private


class KvCache:
    """`num_blocks` blocks of `block_size` tokens; prefix caching keyed by chained block hashes."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs: dict[int, int] = {}  # cached block in use -> number of sequences using it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; first = evicted first
        self._private = 0  # blocks in use that are not (yet) cached
        self.queries = 0  # prompt tokens looked up (vllm:prefix_cache_queries_total)
        self.hits = 0  # of which found cached (vllm:prefix_cache_hits_total)

    # -- observation ------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Blocks held by running sequences (shared blocks once)."""
        return len(self._refs) + self._private

    @property
    def available(self) -> int:
        """Blocks a new allocation can get: empty ones plus evictable cached ones."""
        return self.num_blocks - self.used

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks

    def is_cached(self, h: int) -> bool:
        return h in self._refs or h in self._evictable

    def cached_hashes(self) -> set[int]:
        return set(self._refs) | set(self._evictable)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- allocation -------------------------------------------------------------------
    def cached_prefix(self, hashes: Sequence[int], prompt_tokens: int) -> int:
        """Leading blocks of `hashes` found in the cache. At least the last prompt token is always
        computed (its logits start generation), so at most (prompt_tokens - 1) // block_size blocks hit."""
        if not self.prefix_caching:
            return 0
        limit = min(len(hashes), max(0, prompt_tokens - 1) // self.block_size)
        n = 0
        while n < limit and self.is_cached(hashes[n]):
            n += 1
        return n

    def allocate(self, hashes: Sequence[int], prompt_tokens: int, total_tokens: int) -> tuple[KvAlloc, int] | None:
        """Blocks for a sequence that must hold `total_tokens`, reusing cached prompt blocks.
        Returns (allocation, cached tokens) or None (nothing changed) when the pool cannot fit it."""
        hit = self.cached_prefix(hashes, prompt_tokens)
        new = max(0, self.blocks_for(total_tokens) - hit)
        reclaimed = sum(1 for h in hashes[:hit] if h in self._evictable)  # leave the evictable pool
        if new > self.available - reclaimed:
            return None
        self.queries += prompt_tokens
        self.hits += hit * self.block_size
        alloc = KvAlloc()
        for h in hashes[:hit]:
            self._take(h)
            alloc.hashes.append(h)
        self._claim(new)
        alloc.private = new
        return alloc, hit * self.block_size

    def grow(self, alloc: KvAlloc, total_tokens: int) -> bool:
        """Extend `alloc` to hold `total_tokens`; False (nothing changed) when no block is available."""
        need = self.blocks_for(total_tokens) - alloc.blocks
        if need <= 0:
            return True
        if need > self.available:
            return False
        self._claim(need)
        alloc.private += need
        return True

    def commit_prompt(self, alloc: KvAlloc, hashes: Sequence[int]) -> None:
        """The prompt is computed: register its full blocks beyond the ones already shared. A block another
        sequence registered meanwhile is shared instead (our private copy goes back to the pool)."""
        if not self.prefix_caching:
            return
        for h in hashes[len(alloc.hashes):]:
            if alloc.private <= 0:
                break
            alloc.private -= 1
            self._private -= 1
            self._take(h)
            alloc.hashes.append(h)

    def free(self, alloc: KvAlloc) -> None:
        """Release a finished or preempted sequence's blocks. Cached blocks become evictable, the tail of
        a prompt first (as vLLM), so a shared head outlives the tails that differ."""
        for h in reversed(alloc.hashes):
            n = self._refs[h] - 1
            if n:
                self._refs[h] = n
            else:
                del self._refs[h]
                self._evictable[h] = None
        self._private -= alloc.private
        alloc.hashes, alloc.private = [], 0

    # -- internals --------------------------------------------------------------------
    def _take(self, h: int) -> None:
        if h in self._refs:
            self._refs[h] += 1
            return
        if h in self._evictable:
            del self._evictable[h]
        elif self.available - len(self._evictable) <= 0:
            self._evict(1)
        self._refs[h] = 1

    def _claim(self, n: int) -> None:
        empty = self.num_blocks - self.used - len(self._evictable)
        if n > empty:
            self._evict(n - empty)
        self._private += n

    def _evict(self, n: int) -> None:
        for _ in range(n):
            self._evictable.popitem(last=False)
