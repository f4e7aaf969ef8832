"""KV-cache affinity: which prompt prefixes each upstream probably still caches, and how many of a request's
prompt tokens it would therefore not have to prefill. The throughput strategy turns that into prefill time
saved (router.throughput_gain): affinity is a cost term in the marginal gain, not a routing mode.

The index. Per upstream, an LRU of the chained 16-token block hashes (gateway.routing.prefix, the same
definition the simulator and vLLM use) of the prompts this replica routed there, bounded by the engine's KV
capacity: `prefix_cache_tokens` in config, else vLLM's `vllm:cache_config_info` (num_gpu_blocks * block_size,
scraped by sync/engine_metrics.py), else DEFAULT_CAPACITY_TOKENS. A request that hits its upstream's cache
touches its blocks (moves them to the LRU's young end), as the engine's own LRU does, so the index ages
blocks about as the engine evicts them. It is approximate: the engine also holds blocks of running sequences
and of other clients; the measured ratio of actual to predicted cached tokens (`calibration`, from
usage.prompt_tokens_details.cached_tokens, i.e. the engine's real cache state per request) scales the
predictions, and the engine's own prefix-cache hit rate is shown beside the index's.

Per replica, not shared: each replica indexes only what it routed. Several replicas see the same sessions
only in part, so each replica's index misses blocks another replica placed, and two replicas may place the
same session differently at first; with stickiness keys (below) and the chained hashes of the shared system
prompts both converge on the same upstream after the first turn, because a turn placed anywhere makes the
next turn's prefix cached there and the other replica learns nothing about it -> its next turn may go
elsewhere once. The bench's `affinity` scenario measures the hit rate of two replicas against one. Sharing
through Redis would put a write on every request for a small gain; vLLM's KV events (BlockStored /
BlockRemoved over ZMQ) are the exact alternative: `UpstreamAffinity.lru` would then be fed by the engine
(`add` on BlockStored, `discard` on BlockRemoved) instead of by routing decisions.

Stickiness keys: a client may name its session (OpenAI `prompt_cache_key` or `user`, an `X-Session-Id`
header, Anthropic `metadata.user_id` which arrives as `user`); the upstream that served the key's last
request is then credited with that request's prompt as cached even when the prompts' leading blocks differ
from what the index holds. Without a key the prefix hashes alone decide.

Bounded load (`sticky_bound`): cached tokens are credited to an upstream only while, after this request, its
load stays within max_concurrency and within LOAD_FACTOR times its capacity-proportional share of the load of the
pool's upstreams without rate limits (share_basis; consistent hashing with bounded loads). Service-class limits
are applied before (classes.admit filters the candidates), so affinity can never place a request an upstream
could not otherwise take.

Homes (Affinity.home_withheld): when several engines hold a request's longest cached prefix (a tenant's system
prompt cached everywhere while its conversations were spread), only the first of them in the prefix's rendezvous
order (home_order) within HOME_LOAD_FACTOR times its share keeps the credit. New conversations of a prefix then
gather on its home and each engine's cache holds a share of the prefixes, a tenant partition found from the index
alone (gateway/tools/affinity_bound.py: `holder` vs `sticky`, 1.27x vs 1.04x prefix-blind placement in the
`saturated` steady state).

Shared KV (RunningBlocks): per upstream, the prompt blocks of this replica's requests in flight, so the router's
KV limit counts a block the engine holds once for several running sequences once (the KV load it plans with, and
a new request's charge: only the prompt tokens no running sequence there holds).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.routing import prefix

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.hooks import Attempt
    from gateway.state.fleet import Fleet, Pool
    from gateway.state.stats import UpstreamStats

#: Hash at most this many leading prompt tokens: bounds the hashing cost of very long prompts (2048 blocks).
PREFIX_LIMIT_TOKENS = 32768
#: Index capacity when neither config nor the engine says (tokens; a mid-size GPU's KV cache).
DEFAULT_CAPACITY_TOKENS = 200_000
#: Hosted providers cache prompts from this size on (OpenAI: 1024 tokens; Anthropic needs cache_control).
HOSTED_MIN_TOKENS = 1024
#: Bounded load: an upstream keeps its affinity credit while its load stays within this many times its share.
LOAD_FACTOR = 2.0
#: The home rule (Affinity.home_withheld): a prefix's home keeps the credit while its load stays within this many
#: times its share; tighter than LOAD_FACTOR, as it gathers the new conversations of a prefix, not one's turns
#: (gateway/tools/affinity_bound.py, `holder`: 1.25 keeps the no-think documents workload within 1% of prefix-blind
#: placement, where 2.0 lost 2-3%, and reaches the tenant partition's tok/s in `saturated`).
HOME_LOAD_FACTOR = 1.25
#: Sessions (stickiness keys) remembered per replica.
SESSIONS_MAX = 50_000
#: Weight of one request in the calibration's moving average.
CALIBRATION_ALPHA = 0.05


@dataclass(slots=True)
class PromptPrefix:
    """A request's prompt as block hashes (computed once, lazily, only for pools that use affinity)."""

    tokens: int  # prompt tokens the hashes cover (the full blocks among them)
    hashes: list[int]


def prompt_prefix(ctx: RequestContext) -> PromptPrefix:
    """The request's block hashes, cached on the context (a retry or a queued re-pick does not hash again)."""
    p = ctx.prefix
    if p is None:
        ids = prefix.prompt_token_ids(ctx.body, limit=PREFIX_LIMIT_TOKENS)
        p = ctx.prefix = PromptPrefix(len(ids), prefix.block_hashes(ids))
    assert isinstance(p, PromptPrefix)
    return p


def session_key(key: str | None) -> bytes | None:
    """The index's name for a stickiness key: a short digest (the raw key may be a user id; never stored)."""
    return hashlib.blake2b(key.encode(), digest_size=12).digest() if key else None


class BlockLru:
    """Block hashes one upstream probably caches, oldest first, at most `capacity` blocks."""

    __slots__ = ("capacity", "_blocks")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` held (chained hashes: a hit at i implies the whole prefix up to i)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[int]) -> None:
        """The upstream computed (or reused) these blocks: make them the youngest; evict the oldest beyond capacity.
        Inserted last block first, so a prompt's leading blocks are the youngest, as they are shared the most."""
        blocks = self._blocks
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        self._trim()

    def discard(self, h: int) -> None:
        self._blocks.pop(h, None)

    def resize(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._trim()

    def _trim(self) -> None:
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


class RunningBlocks:
    """The prompt blocks of this replica's requests in flight on one upstream, counted per block.

    An engine with prefix caching holds a block once however many running sequences use it (the tenants' system
    prompts, a conversation's earlier turns), while the gateway's KV accounting (EndpointLoad.kv_local) adds up
    each request's prompt. The difference, `shared_tokens`, is what that sum over-counts; `held` tells how much of
    a new request's prompt the running sequences already hold, i.e. needs no new KV there. Without it a pool whose
    conversations share long prompts is refused at the KV limit (KV_FILL) with the engines' caches far from full."""

    __slots__ = ("_counts", "_refs")

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._refs = 0

    @property
    def shared_tokens(self) -> int:
        """Prompt tokens counted more than once by the in-flight requests' sum."""
        return (self._refs - len(self._counts)) * prefix.BLOCK_SIZE

    def held(self, hashes: Sequence[int]) -> int:
        """Leading prompt tokens of `hashes` some running request holds (chained: a hole ends the shared run)."""
        n = 0
        for h in hashes:
            if h not in self._counts:
                break
            n += 1
        return n * prefix.BLOCK_SIZE

    def start(self, hashes: Sequence[int]) -> None:
        counts = self._counts
        for h in hashes:
            counts[h] = counts.get(h, 0) + 1
        self._refs += len(hashes)

    def end(self, hashes: Sequence[int]) -> None:
        counts = self._counts
        for h in hashes:
            left = counts[h] - 1
            if left:
                counts[h] = left
            else:
                del counts[h]
        self._refs -= len(hashes)


class UpstreamAffinity:
    """One upstream's index and cache figures (per replica)."""

    def __init__(self, u: UpstreamStats) -> None:
        cfg = u.cfg
        self.configured = cfg.prefix_cache_tokens
        self.lru = BlockLru((cfg.prefix_cache_tokens or DEFAULT_CAPACITY_TOKENS) // prefix.BLOCK_SIZE)
        self.min_tokens = HOSTED_MIN_TOKENS if cfg.kind == "hosted" else 0
        if cfg.prompt_cache_min_tokens is not None:
            self.min_tokens = cfg.prompt_cache_min_tokens
        self.calibration = 1.0  # moving average of actual / predicted cached tokens
        self.requests = 0
        self.hits = 0  # requests the upstream reported cached tokens for
        self.prompt_tokens = 0
        self.cached_tokens = 0  # actual, as reported
        self.predicted_tokens = 0
        self.ttft = {True: [0.0, 0], False: [0.0, 0]}  # hit?: [sum of TTFT seconds, count]
        self.running = RunningBlocks()
        self.engine_hit_rate: float | None = None  # the engine's own (vllm:prefix_cache_hits / queries)
        self._engine_last: tuple[float, float] | None = None

    def predict(self, p: PromptPrefix, prompt_tokens: int, session_tokens: int) -> int:
        """Prompt tokens this upstream would probably not prefill: the leading blocks it holds, or the
        session's last prompt when the key last went here; at most prompt - 1 (the last token is always
        computed); 0 under the provider's prompt-caching threshold."""
        return self.credit(self.lru.match(p.hashes), prompt_tokens, session_tokens)

    def credit(self, held_blocks: int, prompt_tokens: int, session_tokens: int) -> int:
        """predict's rule for a prompt whose first `held_blocks` blocks this upstream holds (lru.match)."""
        if prompt_tokens < self.min_tokens:
            return 0
        held = held_blocks * prefix.BLOCK_SIZE
        best = max(held, min(session_tokens, prompt_tokens))
        return max(0, min(int(best * self.calibration), prompt_tokens - 1))

    def observe(self, prompt_tokens: int, predicted: int, actual: int, ttft: float | None) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += actual
        self.predicted_tokens += predicted
        if actual > 0:
            self.hits += 1
        if ttft is not None:
            s = self.ttft[actual > 0]
            s[0] += ttft
            s[1] += 1
        if predicted > 0:  # how far the index's predictions hold on this upstream
            ratio = min(1.0, actual / (predicted / self.calibration))
            self.calibration = max(0.05, (1 - CALIBRATION_ALPHA) * self.calibration + CALIBRATION_ALPHA * ratio)

    def engine_counters(self, queries: float, hits: float) -> None:
        """The engine's cumulative prefix-cache counters: its hit rate since the previous scrape."""
        last, self._engine_last = self._engine_last, (queries, hits)
        if last is not None and queries > last[0] and hits >= last[1]:
            self.engine_hit_rate = (hits - last[1]) / (queries - last[0])

    def engine_capacity(self, tokens: int) -> None:
        """The engine's KV capacity (cache_config_info), unless config fixed the index's size."""
        if self.configured is None and tokens > 0:
            self.lru.resize(tokens // prefix.BLOCK_SIZE)

    def snapshot(self) -> dict[str, Any]:
        def mean_ms(hit: bool) -> float | None:
            s, n = self.ttft[hit]
            return round(s / n * 1000, 1) if n else None

        return {
            "hit_rate": round(self.cached_tokens / self.prompt_tokens, 4) if self.prompt_tokens else None,
            "requests": self.requests,
            "hit_requests": self.hits,
            "cached_tokens": self.cached_tokens,
            "predicted_tokens": self.predicted_tokens,
            "calibration": round(self.calibration, 3),
            "ttft_hit_ms": mean_ms(True),
            "ttft_miss_ms": mean_ms(False),
            "index_blocks": len(self.lru),
            "index_capacity_blocks": self.lru.capacity,
            "engine_hit_rate": None if self.engine_hit_rate is None else round(self.engine_hit_rate, 4),
        }


def sticky_bound(u: UpstreamStats, pool_load: float, pool_slots: int, factor: float = LOAD_FACTOR) -> float:
    """The highest load (this request included) at which `u` may still be credited with cached tokens:
    within max_concurrency and within `factor` times its slot-proportional share of the pool's load (at least
    one request, so an idle upstream always may). Past it the request is scored as a full prefill there, so
    a popular prefix spills to other upstreams instead of piling onto one."""
    mc = u.cfg.max_concurrency
    share = (pool_load + 1) * mc / max(1, pool_slots)
    return float(min(mc, max(1, math.ceil(factor * share))))


def share_basis(pool: Pool) -> tuple[float, int]:
    """The load and slots an upstream's share (sticky_bound) is taken of: those of the upstreams without a request
    or token rate limit (all of them when every one has one). A rate-limited API takes requests at its budget's
    pace, not in proportion to its slots: counted in, its slots (32 for a hosted API carrying ~4 requests beside
    four 16-slot engines) shrink every engine's share by a third, and the bounded-load rule then moves a
    conversation off the engine holding it at ~1.3 times its true share instead of LOAD_FACTOR times."""
    if pool.unmetered_slots == pool.slots:
        return sum(x.load for x in pool.upstreams), pool.slots
    return sum(x.load for x in pool.upstreams if not x.cfg.rate_limited), pool.unmetered_slots


class Affinity:
    """The replica's prefix index over every upstream, the session map, and the hook subscriber feeding them."""

    def __init__(self, fleet: Fleet, load_factor: float = LOAD_FACTOR, sessions_max: int = SESSIONS_MAX) -> None:
        self.fleet = fleet
        self.load_factor = load_factor
        self.sessions_max = sessions_max
        self.upstreams: dict[str, UpstreamAffinity] = {}
        for name, u in fleet.upstreams.items():
            ua = self.upstreams[name] = UpstreamAffinity(u)
            u.attach_affinity(ua)
        #: (pool, session digest) -> (upstream, prompt tokens of the session's last request there)
        self.sessions: OrderedDict[tuple[str, bytes], tuple[str, int]] = OrderedDict()

    @staticmethod
    def enabled(pool: Pool, ctx: RequestContext) -> bool:
        """Affinity only matters where there is a choice: a pool of one upstream skips the prompt hashing."""
        return pool.cfg.affinity and pool.strategy == "throughput" and ctx.operation != "embeddings" and len(pool.upstreams) > 1

    def predict(self, pool: Pool, cands: list[UpstreamStats], ctx: RequestContext) -> dict[str, int]:
        """Predicted cached prompt tokens per candidate, 0 where the bounded-load rule or the home rule
        (home_withheld) withholds the credit."""
        p = prompt_prefix(ctx)
        pt = ctx.est.prompt_tokens
        sess = self._session(pool, ctx)
        out: dict[str, int] = {}
        held: dict[str, int] = {}  # blocks of the prompt each credited upstream holds (lru.match, once per request)
        totals: tuple[float, int] | None = None  # share_basis, summed only when a hit needs the bound
        for u in cands:
            st = sess[1] if sess is not None and sess[0] == u.name else 0
            idx = self.upstreams[u.name]
            blocks = idx.lru.match(p.hashes)
            c = idx.credit(blocks, pt, st)
            if c <= 0:
                continue
            if totals is None:
                totals = share_basis(pool)
            if u.load + 1 <= sticky_bound(u, totals[0], totals[1], self.load_factor):
                out[u.name], held[u.name] = c, blocks
        if totals is not None and len(out) > 1:
            for name in self.home_withheld(p, [u for u in cands if u.name in out], held, totals,
                                           sess[0] if sess else None):
                del out[name]
        return out

    def home_withheld(self, p: PromptPrefix, credited: list[UpstreamStats], held: dict[str, int],
                      totals: tuple[float, int], keep: str | None = None) -> list[str]:
        """The home rule: the engines whose credit for a prefix several of them hold is withheld, so that only its
        home keeps it.

        When the longest prefix of the request any engine holds is held by several (a tenant's system prompt that
        every engine cached while its conversations were spread over them), crediting all of them leaves the
        choice to load, and each engine's cache keeps needing every tenant's prompt: past one engine's KV they
        evict each other. So the credit goes to one of them, the prefix's home: the first, in rendezvous order of
        the prefix's last block (home_order: the same on every replica), whose load stays within HOME_LOAD_FACTOR
        times its share (sticky_bound). The others are scored as a full prefill there, so new conversations of the
        prefix collect on its home, the other engines' copies age out, and each engine's cache holds a share of
        the prefixes (a tenant partition, found from the index, with no notion of tenants). A busy home passes the
        credit on to the next in order; none within the bound: nothing is withheld (load decides, as before).
        Only GPU engines take part (a hosted API's cache is the provider's); a conversation's own history is held
        by one engine alone, so its turns are not affected, nor is `keep` (the upstream of the request's stickiness
        key). `held`: the prompt's blocks each credited upstream holds (Affinity.predict's lru.match)."""
        deepest = max(held.values(), default=0)
        holders = {u.name: u for u in credited if u.cfg.kind == "gpu" and held[u.name] == deepest and u.name != keep}
        if deepest <= 0 or len(holders) < 2:
            return []
        for name in home_order(p.hashes[deepest - 1], list(holders)):
            u = holders[name]
            if u.load + 1 <= sticky_bound(u, totals[0], totals[1], HOME_LOAD_FACTOR):
                return [n for n in holders if n != name]
        return []

    def saved_prefill_s(self, pool: Pool, u: UpstreamStats, ctx: RequestContext) -> float:
        """Seconds of prefill `u` would probably not spend on the request (its predicted cached tokens, without the
        bounded-load rule: the question is whose prefix `u` holds, not whether more may pile onto it)."""
        sess = self._session(pool, ctx)
        pt = ctx.est.prompt_tokens
        c = self.upstreams[u.name].predict(prompt_prefix(ctx), pt, sess[1] if sess and sess[0] == u.name else 0)
        return u.curve.ttft_for(pt) - u.curve.ttft_for(pt - c) if c > 0 else 0.0

    def kv_shared(self, ups: Sequence[UpstreamStats], ctx: RequestContext) -> dict[str, int]:
        """Per upstream, prompt tokens of the request its running sequences (this replica's) already hold: KV the
        request would not add there (RunningBlocks). Only where some is held (a GPU engine's; hosted APIs have no
        KV accounting)."""
        p = prompt_prefix(ctx)
        out: dict[str, int] = {}
        for u in ups:
            held = self.upstreams[u.name].running.held(p.hashes) if u.cfg.kind == "gpu" else 0
            if held:
                out[u.name] = min(held, ctx.est.prompt_tokens)
        return out

    def started(self, u: UpstreamStats, ctx: RequestContext) -> None:
        """A request was dispatched to `u`: its prompt blocks are in use there until it ends (`ended`)."""
        p = ctx.prefix
        if p is None or u.cfg.kind != "gpu":
            return
        running = self.upstreams[u.name].running
        running.start(p.hashes)
        ctx.extras["kv_running"] = (u.name, p.hashes)
        u.endpoint.kv_shared = running.shared_tokens

    def ended(self, u: UpstreamStats, ctx: RequestContext) -> None:
        """The request dispatched to `u` ended (or never reached it): its blocks are no longer in use."""
        started = ctx.extras.pop("kv_running", None)
        if started is None:
            return
        name, hashes = started
        running = self.upstreams[name].running
        running.end(hashes)
        u.endpoint.kv_shared = running.shared_tokens

    def _session(self, pool: Pool, ctx: RequestContext) -> tuple[str, int] | None:
        k = session_key(ctx.cache_key)
        return None if k is None else self.sessions.get((pool.model, k))

    # ---- hook subscriber -----------------------------------------------------------------------------------------
    def decision(self, ctx: RequestContext, a: Attempt) -> None:
        """The request goes to `a.upstream`: its prompt's blocks will be cached there (credited at once, so the
        next turn of a conversation, or a burst sharing a system prompt, finds them even before this one ends)."""
        pool = self.fleet.pool(ctx.model)
        if pool is None or not self.enabled(pool, ctx):
            return
        u = a.upstream
        a.extras["affinity_predicted"] = ctx.predicted_cached.get(u.name, 0) if ctx.predicted_cached else 0
        p = prompt_prefix(ctx)
        self.upstreams[u.name].lru.add(p.hashes)
        k = session_key(ctx.cache_key)
        if k is not None:
            sessions = self.sessions
            sessions[(pool.model, k)] = (u.name, ctx.est.prompt_tokens)
            sessions.move_to_end((pool.model, k))
            if len(sessions) > self.sessions_max:
                sessions.popitem(last=False)

    def attempt_end(self, ctx: RequestContext, a: Attempt) -> None:
        """Predicted vs actual cached tokens, hit rate and TTFT by hit/miss (attempts that got an answer)."""
        predicted = a.extras.get("affinity_predicted")
        if predicted is None or a.error is not None or not a.status:
            return
        out = a.outcome
        pt = out.input_tokens if out.input_tokens is not None else ctx.est.prompt_tokens
        self.upstreams[a.upstream.name].observe(pt, predicted, out.cached_tokens, out.ttft if ctx.stream else None)


def home_order(key: int, names: Sequence[str]) -> list[str]:
    """`names` in rendezvous (highest-random-weight) order for a prefix's block hash `key`: every replica
    computes the same order without sharing state, and removing an upstream moves only the keys it ranked first."""
    kb = key.to_bytes(8, "little")
    return sorted(names, key=lambda n: hashlib.blake2b(kb + n.encode(), digest_size=8).digest(), reverse=True)
