"""The simulator's KV-cache engine, driven step by step in virtual time (schedule/commit; no sockets, no sleeps)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.routing.prefix import block_hashes
from gateway.sim import SimConfig
from gateway.sim.kv_engine import KvEngine, KvSeq
from gateway.sim.kvcache import KvCache
from gateway.sim.profile import PRESETS, interp_ms
from gateway.sim.virtual import Driver, capacity_hint, closed_loop, tok_s_curve


def drained(seq: KvSeq) -> list[int]:
    out = []
    while not seq.queue.empty():
        item = seq.queue.get_nowait()
        assert isinstance(item, int)
        out.append(item)
    return out


def within(value: float, published: float, tol: float = 0.10) -> bool:
    return abs(value - published) <= tol * published


# ----------------------------------------------------------------------------- calibration
def test_h100_preset_reproduces_vidur_linear_layer_times() -> None:
    """Vidur H100 Llama-2-7B: ~5.6 ms for 1 batched token, ~6.4 ms for 128, ~21 ms for 1,024."""
    d = Driver(KvEngine(SimConfig(preset="h100-llama8b", slots=256)))
    one = d.open(1, 3)
    d.step()  # prefill of a 1-token prompt: 1 batched token
    d.step()  # decode: 1 batched token
    assert within(d.steps[0] * 1000, 5.6) and within(d.steps[1] * 1000, 5.6)
    d.run()
    assert drained(one) == [0, 1, 2]
    for _ in range(128):
        d.open(1, 3)
    d.step()  # 128 one-token prefills
    d.step()  # 128 decodes
    assert within(d.steps[-2] * 1000, 6.4) and within(d.steps[-1] * 1000, 6.4)
    d.run()
    d.open(1024, 1)
    d.step()  # one 1,024-token prefill
    assert within(d.steps[-1] * 1000, 21.0)


def test_dynamo_preset_reproduces_the_mocker_formulas() -> None:
    """Dynamo mocker: prefill_ms = 4.21e-7 n^2 + 0.0152 n + 16.5; decode step_ms = -25.74u^2 + 54.01u + 5.74."""
    d = Driver(KvEngine(SimConfig(preset="dynamo-mocker", kv_cache_tokens=4096, max_batched_tokens=4096)))
    for n in (256, 2000):
        d.open(n, 1)
        d.step()
        assert within(d.steps[-1] * 1000, 4.21e-7 * n * n + 0.0152 * n + 16.5)
    d.run()
    seq = d.open(2048, 3)
    d.step()
    d.step()  # decode with ~2,049 of 4,096 KV tokens active
    u = 2049 / 4096
    assert within(d.steps[-1] * 1000, -25.74 * u * u + 54.01 * u + 5.74)
    d.run()
    assert drained(seq) == [0, 1, 2]


def test_a10g_preset_is_slower_than_h100_everywhere() -> None:
    h, a = PRESETS["h100-llama8b"], PRESETS["a10g-llama8b"]
    for tokens in (1, 64, 128, 512, 1024, 4096):
        assert interp_ms(a.table, tokens) > 4 * interp_ms(h.table, tokens)
    assert a.kv_cache_tokens < h.kv_cache_tokens / 5


# ----------------------------------------------------------------------------- KV cache bookkeeping
def test_blocks_in_use_are_not_evictable_and_eviction_is_lru_tail_first() -> None:
    kv = KvCache(num_blocks=4, block_size=4)
    ha = block_hashes(list(range(9)), 4)  # 2 full blocks + 1 token
    a, cached = kv.allocate(ha, 9, 9) or (None, -1)
    assert a is not None and cached == 0 and kv.used == 3
    kv.commit_prompt(a, ha)
    assert kv.is_cached(ha[0]) and kv.is_cached(ha[1]) and kv.used == 3
    assert kv.allocate(block_hashes(list(range(100, 108)), 4), 8, 8) is None  # needs 2, 1 available
    assert kv.used == 3 and kv.queries == 9  # a refused allocation changes nothing
    kv.free(a)
    assert kv.used == 0 and kv.cached_hashes() == set(ha)
    b, _ = kv.allocate(block_hashes(list(range(100, 112)), 4), 12, 12) or (None, -1)
    assert b is not None and kv.used == 3
    assert kv.is_cached(ha[0]) and not kv.is_cached(ha[1])  # the prompt's tail block went first
    # A later prompt sharing the surviving head block hits it, and only it.
    kv.free(b)
    c, cached = kv.allocate(ha, 9, 9) or (None, -1)
    assert c is not None and cached == 4 and kv.hits == 4


def test_identical_prompts_computed_together_share_their_blocks_once_done() -> None:
    kv = KvCache(num_blocks=32, block_size=16)
    h = block_hashes(list(range(64)))
    a, _ = kv.allocate(h, 64, 64) or (None, 0)
    b, _ = kv.allocate(h, 64, 64) or (None, 0)
    assert a is not None and b is not None and kv.used == 8  # both miss: nothing computed yet
    kv.commit_prompt(a, h)
    kv.commit_prompt(b, h)
    assert kv.used == 4 and kv.cached_hashes() == set(h)
    kv.free(a)
    assert kv.used == 4  # still held by b
    kv.free(b)
    assert kv.used == 0 and kv.available == 32


def test_prefix_hit_skips_prefill_of_cached_blocks() -> None:
    d = Driver(KvEngine(SimConfig(preset="h100-llama8b")))
    ids = list(range(1000))
    first = d.open(1000, 2, block_hashes(ids))
    d.run()
    assert first.cached_tokens == 0
    again = d.open(1000, 2, block_hashes(ids))
    plan = d.engine.schedule()
    assert again.cached_tokens == 992 and plan.load.prefill_tokens == 8  # the last token is always computed
    assert d.engine.prefix_queries == 2000 and d.engine.prefix_hits == 992
    off = Driver(KvEngine(SimConfig(preset="h100-llama8b", prefix_caching=False)))
    off.open(1000, 2, block_hashes(ids))
    off.run()
    miss = off.open(1000, 2, block_hashes(ids))
    assert off.engine.schedule().load.prefill_tokens == 1000 and miss.cached_tokens == 0


# ----------------------------------------------------------------------------- preemption
def test_kv_exhaustion_preempts_and_recomputes() -> None:
    engine = KvEngine(SimConfig(kv_cache_tokens=256, base_step=0.001, slots=8))  # 16 blocks
    d = Driver(engine)
    seqs = [d.open(40, 60, block_hashes(list(range(i * 1000, i * 1000 + 40)))) for i in range(4)]
    peak = 0.0
    for _ in range(10_000):
        if not (engine.running or engine.waiting):
            break
        d.step()
        peak = max(peak, engine.kv_usage())
    assert engine.preemptions > 0 and any(s.preempted for s in seqs)
    assert all(drained(s) == list(range(60)) for s in seqs)  # every token once, in order
    assert engine.completed == 4 and engine.kv.used == 0 and peak > 0.8
    # Without pressure nothing is preempted.
    roomy = KvEngine(SimConfig(kv_cache_tokens=4096, base_step=0.001, slots=8))
    d2 = Driver(roomy)
    for i in range(4):
        d2.open(40, 60)
    d2.run()
    assert roomy.preemptions == 0


def test_a_request_larger_than_the_kv_cache_is_refused() -> None:
    from gateway.sim.engine import PromptTooLong

    engine = KvEngine(SimConfig(kv_cache_tokens=256))
    with pytest.raises(PromptTooLong):
        engine.open(200, 100, 0)


# ----------------------------------------------------------------------------- chunked prefill
def _decode_gap_during_long_prefill(chunked: bool) -> tuple[float, float]:
    """(largest gap between a running decode's tokens while a 16k-token prompt prefills, that prompt's TTFT)."""
    d = Driver(KvEngine(SimConfig(preset="h100-llama8b", chunked_prefill=chunked)))
    dec = d.open(100, 400)
    d.run(max_steps=20)
    assert dec.emitted >= 10
    start = d.now
    long = d.open(16_000, 1)
    d.run(until=long)
    ttft = d.now - start
    d.run(max_steps=5)
    ts = [t for t in d.times[dec.id] if t >= start]
    gaps = [b - a for a, b in zip([start, *ts], ts)]
    return max(gaps), ttft


def test_chunked_prefill_does_not_stall_running_decodes() -> None:
    gap_chunked, ttft_chunked = _decode_gap_during_long_prefill(True)
    gap_whole, ttft_whole = _decode_gap_during_long_prefill(False)
    budget_step = (interp_ms(PRESETS["h100-llama8b"].table, 2048) + 5) / 1000  # one full-budget step
    assert gap_chunked <= budget_step
    assert gap_whole > 4 * gap_chunked and gap_whole > 0.2  # the whole 16k prefill in one stalled step
    assert ttft_chunked < 1.5 * ttft_whole  # chunking costs the long prompt little


# ----------------------------------------------------------------------------- speculative decoding
def _decode_rate(batch: int, spec_k: int) -> float:
    """Aggregate decode tokens/s of `batch` concurrent 200-token generations."""
    d = Driver(KvEngine(SimConfig(preset="h100-llama8b", slots=batch, spec_k=spec_k, spec_accept=0.7, seed=1)))
    for _ in range(batch):
        d.open(16, 200)
    while d.engine.waiting or any(s.computed < s.target for s in d.engine._running.values()):
        d.step()
    t0 = d.now
    d.run()
    return batch * 199 / (d.now - t0)


def test_speculative_decoding_gain_shrinks_with_batch() -> None:
    low = _decode_rate(1, 4) / _decode_rate(1, 0)
    high = _decode_rate(256, 4) / _decode_rate(256, 0)
    assert low > 1.5  # memory-bound: ~2.8 tokens per step for little extra step time
    assert high < 1.1  # compute-bound: verifying 5x the tokens costs as much as it gains


# ----------------------------------------------------------------------------- closed-loop figures
def test_closed_loop_throughput_preemption_and_hit_rate() -> None:
    h100 = SimConfig(preset="h100-llama8b", slots=64)
    one, many = closed_loop(h100, 1, 512, 64), closed_loop(h100, 32, 512, 64)
    assert 150 < one.tok_s < 180  # ~1 token per ~5.7 ms step
    assert many.tok_s > 15 * one.tok_s and many.preemptions_per_min == 0 and many.hit_rate == 0
    shared = closed_loop(h100, 8, 1024, 32, shared_prefix=768)
    assert 0.7 < shared.hit_rate <= 0.75 and shared.ttft < closed_loop(h100, 8, 1024, 32).ttft
    tight = replace(h100, kv_cache_tokens=16 * 1024)  # 32 x (512 + 256) tokens do not fit
    pressed = closed_loop(tight, 32, 512, 256)
    assert pressed.preemptions_per_min > 0 and pressed.tok_s < closed_loop(h100, 32, 512, 256).tok_s


def test_capacity_hint_matches_the_preset() -> None:
    hint = capacity_hint(SimConfig(preset="h100-llama8b", slots=64))
    assert 0.004 < hint["a"] < 0.007 and 0 < hint["b"] < 0.0002 and 0.005 < hint["ttft"] < 0.03
    slow = capacity_hint(SimConfig(preset="a10g-llama8b", slots=16))
    assert slow["a"] > 4 * hint["a"]


def test_tok_s_curve_bends_with_speculative_decoding() -> None:
    plain = tok_s_curve(SimConfig(preset="h100-llama8b", slots=64), 16, 256, 64)
    spec = tok_s_curve(SimConfig(preset="h100-llama8b", slots=64, spec_k=4), 16, 256, 64)
    assert plain[0] == spec[0] == 0 and len(plain) == 17
    assert all(b > a for a, b in zip(plain[1:], plain[2:]))  # more workers, more tok/s
    gains = [s / p for s, p in zip(spec[1:], plain[1:])]
    assert gains[0] > 1.5 and gains[-1] < gains[0] - 0.2  # per-worker gain shrinks: not a + b*n any more
