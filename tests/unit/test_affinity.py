"""KV-cache affinity (routing/affinity.py) on real in-memory fleet state: bounded hashing, the index's bounds and
aging, stickiness keys, the cost term in the marginal gain and the bounded-load rule. Pure: no I/O."""

from __future__ import annotations

import pytest

from gateway.config import FleetConfig
from gateway.context import Estimate, RequestContext
from gateway.dialects.anthropic_wire import messages_request_to_chat
from gateway.errors import GatewayError
from gateway.hooks import Attempt
from gateway.http.validation import build_context, validate
from gateway.reliability.outlier import OutlierDetector
from gateway.routing import prefix
from gateway.routing.affinity import (
    PREFIX_LIMIT_TOKENS,
    Affinity,
    BlockLru,
    UpstreamAffinity,
    home_order,
    prompt_prefix,
    share_basis,
    sticky_bound,
)
from gateway.routing.router import Refusal, Router, throughput_gain
from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.sim.server import WORDS
from gateway.state.fleet import Fleet
from gateway.state.measure import Outcome
from gateway.sync.engine_metrics import parse_cache
from tests.state_helpers import hold


def text(words: int, salt: int = 0) -> str:
    return "".join(WORDS[(i * 7 + salt) % len(WORDS)] for i in range(words))


def make(twin: bool = False, **pool_cfg) -> tuple[Fleet, Router, Affinity]:
    """The reference fleet with prefill costs (as calibrated_fleet seeds them) and an affinity index.
    `twin`: slow-gpu becomes a second fast-gpu (two replicas of one engine: only the cache tells them apart)."""
    cfg: FleetConfig = reference_fleet(DEMO_PORTS)
    cfg.upstreams["fast-gpu"].capacity.prefill = 2e-5
    cfg.upstreams["slow-gpu"].capacity.prefill = 1.5e-4
    if twin:
        fast, slow = cfg.upstreams["fast-gpu"], cfg.upstreams["slow-gpu"]
        slow.capacity, slow.max_concurrency = fast.capacity.model_copy(), fast.max_concurrency
    for k, v in pool_cfg.items():
        setattr(cfg.models["fleet-model"], k, v)
    fleet = Fleet(cfg, "throughput")
    router = Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=4, queue_timeout=0.3)
    router.affinity = Affinity(fleet)
    return fleet, router, router.affinity


def chat(messages: list[dict], headers: dict | None = None, **body) -> RequestContext:
    b = {"model": "fleet-model", "messages": messages, "max_tokens": 200, "stream": True, **body}
    validate("chat", b)
    ctx = build_context("chat", b, headers=headers or {})
    ctx.service_class = ctx.service_class or "interactive"  # as the proxy resolves it
    return ctx


def conversation(turns: int, system_words: int = 1500, salt: int = 0) -> list[dict]:
    msgs = [{"role": "system", "content": text(system_words, salt)}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i} " + text(30, i)}, {"role": "assistant", "content": text(150, i + 1)}]
    return [*msgs, {"role": "user", "content": "and now?"}]


def routed(router: Router, aff: Affinity, fleet: Fleet, ctx: RequestContext) -> str:
    """Pick, dispatch and run the `decision` hook, as the proxy does; the slot is freed again at once."""
    pool = fleet.pools["fleet-model"]
    d = router._dispatch(router.pick(pool, ctx), ctx)
    aff.decision(ctx, Attempt(1, d, Outcome()))
    router.release(d.upstream, ctx)
    return d.upstream.name


# ---- hashing -------------------------------------------------------------------------------------------------
def test_bounded_prompt_hashing_is_a_prefix_of_the_simulators_hashes() -> None:
    body = {"messages": conversation(3)}
    ids = prefix.prompt_token_ids(body)
    for limit in (5, 100, 1000, len(ids) - 3, len(ids), 10 * len(ids)):
        part = prefix.prompt_token_ids(body, limit=limit)
        assert ids[: len(part)] == part and len(part) == min(limit, len(ids))
    # One enormous message is cut before encoding: the ids kept still agree with the full encoding.
    huge = {"messages": [{"role": "user", "content": text(60_000)}]}
    full = prefix.prompt_token_ids(huge)
    part = prefix.prompt_token_ids(huge, limit=PREFIX_LIMIT_TOKENS)
    assert len(full) > PREFIX_LIMIT_TOKENS and 0.9 * PREFIX_LIMIT_TOKENS < len(part) <= PREFIX_LIMIT_TOKENS
    assert full[: len(part)] == part
    ctx = chat(huge["messages"])
    p = prompt_prefix(ctx)
    assert p.hashes == prefix.block_hashes(full)[: len(p.hashes)] and prompt_prefix(ctx) is p  # hashed once


# ---- the index -----------------------------------------------------------------------------------------------
def test_block_lru_is_bounded_and_ages_out_the_least_recently_used() -> None:
    lru = BlockLru(capacity=10)
    a, b = prefix.block_hashes(list(range(16 * 6))), prefix.block_hashes(list(range(1000, 1000 + 16 * 6)))
    lru.add(a)
    assert lru.match(a) == 6 and len(lru) == 6
    lru.add(b)  # 12 blocks > 10: a's oldest blocks go (its tail: leading blocks are inserted youngest)
    assert len(lru) == 10 and lru.match(b) == 6
    assert lru.match(a) == 4 and a[5] not in lru and a[4] not in lru
    lru.add(a[:4])  # a hit touches its blocks: now b's tail is the oldest
    lru.add(prefix.block_hashes(list(range(5000, 5000 + 32))))
    assert lru.match(a) == 4 and lru.match(b) == 4
    lru.resize(3)
    assert len(lru) == 3
    assert lru.match([12345, *a]) == 0  # chained: a miss at block 0 means nothing after it is reusable


def test_prediction_respects_the_hosted_threshold_the_last_token_and_calibration(tmp_path) -> None:
    fleet, _, aff = make()
    ctx = chat(conversation(1, system_words=300))
    p = prompt_prefix(ctx)
    pt = ctx.est.prompt_tokens
    hosted, fast = aff.upstreams["hosted"], aff.upstreams["fast-gpu"]
    fast.lru.add(p.hashes)
    hosted.lru.add(p.hashes)
    assert fast.predict(p, pt, 0) == len(p.hashes) * 16 <= pt - 1
    assert pt < 1024 and hosted.predict(p, pt, 0) == 0  # providers cache only prompts from 1024 tokens on
    assert fast.predict(p, pt, session_tokens=pt) == pt - 1
    for _ in range(60):  # the engine keeps reporting half of what the index predicted: predictions shrink
        fast.observe(pt, fast.predict(p, pt, 0), len(p.hashes) * 8, 0.01)
    assert 0.45 < fast.calibration < 0.6
    assert fast.predict(p, pt, 0) < 0.65 * len(p.hashes) * 16


# ---- stickiness keys -----------------------------------------------------------------------------------------
def test_stickiness_keys_from_body_header_and_anthropic_metadata() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert chat(msgs).cache_key is None
    assert chat(msgs, prompt_cache_key="conv-1", user="alice").cache_key == "k:conv-1"
    assert chat(msgs, {"X-Session-Id": "s9"}, user="alice").cache_key == "s:s9"
    assert chat(msgs, user="alice").cache_key == "u:alice"
    anthropic = {"model": "fleet-model", "max_tokens": 10, "messages": msgs, "metadata": {"user_id": "bob"}}
    assert chat(messages_request_to_chat(anthropic)["messages"], user="bob").cache_key == "u:bob"
    assert messages_request_to_chat(anthropic)["user"] == "bob"
    for bad in ({"prompt_cache_key": 3}, {"user": ["x"]}, {"prompt_cache_key": "k" * 600}):
        with pytest.raises(GatewayError) as e:
            chat(msgs, **bad)
        assert e.value.status == 400 and e.value.param in ("prompt_cache_key", "user")


def test_a_session_key_keeps_a_conversation_whose_prefix_changed_on_its_upstream() -> None:
    fleet, router, aff = make()
    first = chat(conversation(2, salt=1), prompt_cache_key="conv")
    u = routed(router, aff, fleet, first)
    # Same session, but the client rewrote the system prompt: no block matches, the key still does.
    again = chat(conversation(2, salt=2), prompt_cache_key="conv")
    pool = fleet.pools["fleet-model"]
    router.pick(pool, again)
    assert again.predicted_cached == {u: min(first.est.prompt_tokens, again.est.prompt_tokens - 1)}
    other = chat(conversation(2, salt=2), prompt_cache_key="other")
    router.pick(pool, other)
    assert not other.predicted_cached


# ---- the cost term and the bounded-load rule -------------------------------------------------------------------
def test_cached_tokens_raise_the_marginal_gain_most_where_prefill_is_slow() -> None:
    fleet, _, _ = make()
    slow, fast = fleet.upstreams["slow-gpu"], fleet.upstreams["fast-gpu"]
    est = Estimate(prompt_tokens=4000, output_tokens=200)
    for u in (slow, fast):
        hold(u, 4)  # a running batch that a prefill would stall
    gain = {u.name: (throughput_gain(u, est), throughput_gain(u, est, cached=3984)) for u in (slow, fast)}
    assert all(hit > miss > 0 for miss, hit in gain.values())
    assert gain["slow-gpu"][1] / gain["slow-gpu"][0] > 2 * gain["fast-gpu"][1] / gain["fast-gpu"][0]
    assert throughput_gain(slow, est, cached=0) == throughput_gain(slow, est)


def test_multi_turn_conversations_stay_on_the_upstream_that_caches_them() -> None:
    fleet, router, aff = make(twin=True)
    pool = fleet.pools["fleet-model"]
    # Turn 1 of a conversation was placed on slow-gpu (the twin listed second): the next turns follow it,
    # where a prefix-blind router breaks the tie to the first twin and loses the cache.
    first = chat(conversation(1))
    aff.upstreams["slow-gpu"].lru.add(prompt_prefix(first).hashes)
    blind_fleet, blind_router, _ = make(twin=True, affinity=False)
    for turns in (2, 3, 4):
        ctx = chat(conversation(turns))
        blind = chat(conversation(turns))
        assert blind_router.pick(blind_fleet.pools["fleet-model"], blind).upstream.name == "fast-gpu"
        assert blind.predicted_cached is None  # affinity off for the pool: prefix-blind, never hashed
        assert blind.prefix is None
        d = router.pick(pool, ctx)
        assert d.upstream.name == "slow-gpu" and "cached" in d.reason
        aff.decision(ctx, Attempt(1, d, Outcome()))


def test_bounded_load_withholds_the_credit_past_the_share_and_slots() -> None:
    fleet, router, aff = make()
    pool = fleet.pools["fleet-model"]
    slow, fast, hosted = (fleet.upstreams[n] for n in ("slow-gpu", "fast-gpu", "hosted"))
    slots = sum(u.cfg.max_concurrency for u in pool.upstreams)  # 64 + 16 + 32
    assert sticky_bound(slow, 0, slots) == 1  # idle pool: the first request may always stick
    assert sticky_bound(slow, 20, slots) == 6  # ceil(2 * 21 * 16 / 112)
    assert sticky_bound(slow, 500, slots) == 16  # never past max_concurrency
    ctx = chat(conversation(3))
    aff.upstreams["slow-gpu"].lru.add(prompt_prefix(ctx).hashes)
    hold(fast, 10)
    hold(slow, 6)  # load 16 on the engines (80 slots): slow-gpu may take a 7th sticky request (ceil(2 * 17 * 16 / 80))
    router.pick(pool, ctx)
    assert ctx.predicted_cached and "slow-gpu" in ctx.predicted_cached
    hold(slow, 7)  # an 8th would exceed twice its share: scored as a full prefill there
    hold(fast, 9)
    router.pick(pool, ctx)
    assert not ctx.predicted_cached


def test_the_share_leaves_out_rate_limited_apis() -> None:
    # The hosted API's 32 slots take requests at its budget's pace: they are not part of the engines' share.
    fleet, _, _ = make()
    pool = fleet.pools["fleet-model"]
    hold(fleet.upstreams["fast-gpu"], 10)
    hold(fleet.upstreams["hosted"], 4)
    assert share_basis(pool) == (10, 64 + 16)
    fleet.upstreams["fast-gpu"].cfg.rpm = 1000  # every upstream rate-limited: the whole pool
    fleet.upstreams["slow-gpu"].cfg.tpm = 10**6
    assert share_basis(Fleet(fleet.config, "throughput").pools["fleet-model"]) == (0, 112)


def test_home_order_is_a_stable_rendezvous_order_that_moves_only_the_removed_upstreams_keys() -> None:
    names = [f"up-{i}" for i in range(5)]
    orders = {k: home_order(k, names) for k in range(200)}
    assert all(sorted(o) == names for o in orders.values())
    assert orders[7] == home_order(7, list(reversed(names)))  # the listing order does not matter
    assert len({o[0] for o in orders.values()}) == 5  # keys spread over every upstream
    for k, o in orders.items():  # without up-2, a key's order is its old one minus up-2
        assert home_order(k, [n for n in names if n != "up-2"]) == [n for n in o if n != "up-2"]


def test_a_prefix_several_engines_hold_is_credited_to_its_home_only() -> None:
    fleet, router, aff = make(twin=True)
    pool = fleet.pools["fleet-model"]
    system = [{"role": "system", "content": text(1500)}]
    shared = chat(system)
    for name in ("fast-gpu", "slow-gpu"):  # both twins cached the tenant's prompt
        aff.upstreams[name].lru.add(prompt_prefix(shared).hashes)
    ctx = chat([*system, {"role": "user", "content": "a new conversation " + text(60, 5)}])
    p = prompt_prefix(ctx)
    deepest = aff.upstreams["fast-gpu"].lru.match(p.hashes)
    home, other = home_order(p.hashes[deepest - 1], ["fast-gpu", "slow-gpu"])
    d = router.pick(pool, ctx)
    assert d.upstream.name == home and set(ctx.predicted_cached or {}) == {home}
    # The home past HOME_LOAD_FACTOR times its share (2 in flight on the twins, ceil(1.25 * 3 * 64 / 128) = 2):
    # the credit passes to the next holder.
    hold(fleet.upstreams[home], 2)
    router.pick(pool, ctx)
    assert set(ctx.predicted_cached or {}) == {other}
    # A conversation's history on one engine alone: the rule does not apply.
    hold(fleet.upstreams[home], 0)
    turn2 = chat([*system, {"role": "user", "content": "a new conversation " + text(60, 5)}, {"role": "assistant", "content": text(150, 3)},
                  {"role": "user", "content": "and then?"}])
    aff.upstreams[other].lru.add(prompt_prefix(ctx).hashes)
    assert router.pick(pool, turn2).upstream.name == other
    assert set(turn2.predicted_cached or {}) == {home, other}


def test_the_home_rule_spares_the_stickiness_keys_upstream() -> None:
    fleet, router, aff = make(twin=True)
    pool = fleet.pools["fleet-model"]
    system = [{"role": "system", "content": text(1500)}]
    for name in ("fast-gpu", "slow-gpu"):
        aff.upstreams[name].lru.add(prompt_prefix(chat(system)).hashes)
    ctx = chat([*system, {"role": "user", "content": "hi"}], user="alice")
    p = prompt_prefix(ctx)
    home, other = home_order(p.hashes[aff.upstreams["fast-gpu"].lru.match(p.hashes) - 1], ["fast-gpu", "slow-gpu"])
    aff.decision(ctx, Attempt(1, router.pick(pool, ctx), Outcome()))  # alice's session is on the home
    aff.sessions[next(iter(aff.sessions))] = (other, 10)  # ...then moved to the other one
    router.pick(pool, ctx)
    assert set(ctx.predicted_cached or {}) == {home, other}  # neither is withheld: only one other holder is left


def test_room_freed_on_an_engine_goes_first_to_the_queued_request_it_caches() -> None:
    """Wake-up order: a waiter whose prefix the freed upstream caches passes an older one whose prefix is elsewhere,
    by at most the prefill it saves there; a waiter older than that keeps its turn."""
    import asyncio
    import time

    from gateway.routing.router import _Waiter

    fleet, router, aff = make(twin=True)
    pool = fleet.pools["fleet-model"]
    slow = fleet.upstreams["slow-gpu"]
    elsewhere, here = chat(conversation(3, salt=1)), chat(conversation(3, salt=2))
    aff.upstreams["fast-gpu"].lru.add(prompt_prefix(elsewhere).hashes)
    aff.upstreams["slow-gpu"].lru.add(prompt_prefix(here).hashes)
    saved = aff.saved_prefill_s(pool, slow, here)
    assert saved > 0 and aff.saved_prefill_s(pool, slow, elsewhere) == 0
    loop = asyncio.new_event_loop()
    cls = pool.cfg.classes["interactive"]
    for older_by, first in ((0.5 * saved, here), (2 * saved, elsewhere)):
        for u in pool.upstreams:
            hold(u, u.cfg.max_concurrency - (u is slow))  # one slot, freed on slow-gpu
        now = time.monotonic()
        q = router._queues["fleet-model"]
        ws = [_Waiter(pool, ctx, cls, frozenset(), loop.create_future(), since, Refusal("saturated", "queued"))
              for ctx, since in ((elsewhere, now - 1 - older_by), (here, now - 1))]
        q.extend(ws)
        router.wake(slow)
        served = [w for w in ws if w.future.done()]
        assert [w.ctx for w in served] == [first] and served[0].future.result().upstream is slow
        q.clear()
        router.release(slow, first)
    loop.close()


def test_affinity_never_overrides_service_class_limits() -> None:
    """Class admission filters candidates before affinity scores them: a cached upstream past the interactive
    class's decode floor is not chosen for an interactive request, however much of its prompt it holds."""
    from gateway.config import ServiceClass, default_classes

    classes = default_classes()
    classes["interactive"] = ServiceClass(min_tok_s=100.0)  # t(n) <= 10 ms: n <= (0.01 - 0.008) / 0.0004 = 5
    fleet, router, aff = make(twin=True, classes=classes)
    pool = fleet.pools["fleet-model"]
    slow = fleet.upstreams["slow-gpu"]
    ctx = chat(conversation(3))
    ctx.service_class = "interactive"
    aff.upstreams["slow-gpu"].lru.add(prompt_prefix(ctx).hashes)
    assert router.pick(pool, ctx).upstream.name == "slow-gpu"
    hold(slow, 5)  # a 6th sequence would decode below the class's 100 tok/s floor
    d = router.pick(pool, ctx)
    assert d.upstream.name != "slow-gpu" and "slow-gpu" not in d.scores  # not even scored, cached or not


# ---- figures ---------------------------------------------------------------------------------------------------
def test_figures_predicted_vs_actual_and_ttft_by_hit() -> None:
    fleet, router, aff = make()
    ctx = chat(conversation(1), stream=True)
    pool = fleet.pools["fleet-model"]
    a = Attempt(1, router.pick(pool, ctx), Outcome())
    aff.decision(ctx, a)
    a.status = 200
    a.outcome.cached_tokens, a.outcome.input_tokens, a.outcome.ttft = 0, 2000, 0.4
    aff.attempt_end(ctx, a)
    ctx2 = chat(conversation(2), stream=True)
    a2 = Attempt(1, router.pick(pool, ctx2), Outcome())
    assert a2.upstream.name == a.upstream.name
    aff.decision(ctx2, a2)
    assert a2.extras["affinity_predicted"] > 1000
    a2.status = 200
    a2.outcome.cached_tokens, a2.outcome.input_tokens, a2.outcome.ttft = 1984, 2300, 0.05
    aff.attempt_end(ctx2, a2)
    snap = fleet.upstreams[a.upstream.name].snapshot(0.0, ["fleet-model"])["cache"]
    assert snap["requests"] == 2 and snap["hit_requests"] == 1
    assert snap["hit_rate"] == round(1984 / 4300, 4)
    assert snap["ttft_hit_ms"] == 50.0 and snap["ttft_miss_ms"] == 400.0
    assert snap["predicted_tokens"] == a2.extras["affinity_predicted"]


def test_engine_cache_state_sizes_the_index_and_gives_its_hit_rate() -> None:
    page = (
        'vllm:num_requests_running{model_name="m"} 3\n'
        '# TYPE vllm:cache_config_info gauge\n'
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="2000",enable_prefix_caching="True"} 1\n'
        'vllm:prefix_cache_queries_total{model_name="m"} 1000\n'
        'vllm:prefix_cache_hits_total{model_name="m"} 400\n'
    )
    capacity, counters = parse_cache(page)
    assert capacity == 32000 and counters == (1000.0, 400.0)
    assert parse_cache('vllm:num_requests_running{model_name="m"} 3\n') == (None, None)
    fleet, _, aff = make()
    ua = aff.upstreams["fast-gpu"]
    ua.engine_capacity(capacity)
    assert ua.lru.capacity == 2000
    ua.engine_counters(*counters)
    assert ua.engine_hit_rate is None  # a rate needs two readings
    ua.engine_counters(1500.0, 800.0)
    assert ua.engine_hit_rate == 0.8
    fleet.upstreams["slow-gpu"].cfg.prefix_cache_tokens = 1600
    configured = UpstreamAffinity(fleet.upstreams["slow-gpu"])
    configured.engine_capacity(capacity)
    assert configured.lru.capacity == 100  # config wins over the engine's figure


def test_sticky_oracle_keeps_a_conversation_on_one_engine_and_balances_by_slots() -> None:
    from gateway.tools.scenarios.affinity import StickyOracle

    o = StickyOracle({"h100": "http://h", "a10g": "http://a"}, {"h100": 64, "a10g": 16})
    placed = {f"c{i}": o.open(f"c{i}") for i in range(10)}
    assert sum(u == "http://a" for u in placed.values()) == 2  # open conversations in proportion to slots: 8 to 2
    o.close("c0")
    o.close("c1")
    assert o.open("new") == placed["c0"] == "http://h"  # the freed place
    assert o.open_convs == {"h100": 7, "a10g": 2}


def test_many_tenants_prompts_span_one_to_four_k_tokens_and_share_no_block() -> None:
    from gateway import tokens
    from gateway.routing import prefix
    from gateway.tools.scenarios.affinity import Users

    prompts = Users(tenants=24).prompts()
    sizes = [len(tokens.encode(p)) for p in prompts]
    assert len(prompts) == 24 and 1000 <= min(sizes) < 1100 and 4000 <= max(sizes) < 4100
    assert 55_000 < sum(sizes) < 65_000  # 1.4x one A10G's ~42k KV tokens: more than one engine holds
    firsts = {prefix.block_hashes(tokens.encode(p))[0] for p in prompts}
    assert len(firsts) == 24  # no two tenants share even a first block: a hit is the tenant's own prompt
    assert Users().prompts() == Users(tenants=4).prompts()  # the other settings' four tenants are unchanged


def test_many_tenants_fleet_is_four_identical_a10gs_and_the_hosted_api() -> None:
    from gateway.sim.profile import PRESETS
    from gateway.tools.scenarios.affinity import MODEL, _fleet, _sims

    sims = _sims("a10g_hosted")
    assert [s.kv_cache_tokens for n, s in sims.items() if n != "hosted"] == [PRESETS["a10g-llama8b"].kv_cache_tokens] * 4
    cfg = _fleet("a10g_hosted", {n: 9000 + i for i, n in enumerate(sims)}, sims)
    assert cfg.models[MODEL].upstreams == ["up-0", "up-1", "up-2", "up-3", "hosted"]
    hosted = cfg.upstreams["hosted"]
    assert hosted.kind == "hosted" and hosted.base_url == "http://127.0.0.1:9004/v1"
    assert (hosted.rpm, hosted.tpm) == (sims["hosted"].rpm, sims["hosted"].tpm)
    assert {cfg.upstreams[f"up-{i}"].max_concurrency for i in range(4)} == {sims["gpu-0"].slots}


def test_gpu_hit_rate_leaves_the_hosted_upstreams_requests_out() -> None:
    import time

    from gateway.tools.scenarios.affinity import Rec, _verdict

    rec = Rec(t0=0.0, t1=time.monotonic() + 60)
    rec.add(1.0, 0.1, {"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 900}}, "up-0")
    rec.add(1.0, 0.1, {"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 100}}, "hosted")
    assert (rec.cached_tokens, rec.prompt_tokens, rec.hosted_cached, rec.hosted_prompt) == (1000, 2000, 100, 1000)
    rows = {"throughput+affinity": {"hit_rate": 0.5, "gpu_hit_rate": 0.9, "tok_s": 1.0}, "sticky_oracle": {"hit_rate": 0.9}}
    v = _verdict(rows)
    assert (v["hit_rate_vs_oracle"], v["gpu_hit_rate_vs_oracle"]) == (0.556, 1.0)
