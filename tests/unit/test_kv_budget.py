"""Routing within each GPU engine's KV-cache token budget: admission, preemption-risk discount, capacity learned
from vLLM metrics, max_concurrency still a hard cap."""

from __future__ import annotations

import os

from gateway.config import FleetConfig
from gateway.context import Estimate, RequestContext
from gateway.reliability.outlier import OutlierDetector
from gateway.routing.router import Refusal, Router, kv_risk, throughput_gain
from gateway.state.fleet import Fleet
from gateway.sync.engine_metrics import parse_kv


def gpu_fleet(**upstreams: dict) -> tuple[Fleet, Router]:
    cfg = FleetConfig.model_validate({
        "upstreams": {n: {"base_url": "http://127.0.0.1:1", "kind": "gpu", "capacity": {"a": 0.01, "b": 0.0005}, **kv}
                      for n, kv in upstreams.items()},
        "models": {"m": {"upstreams": list(upstreams)}},
    })
    fleet = Fleet(cfg, "throughput")
    return fleet, Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=8, queue_timeout=1.0)


def req(prompt: int, output: int) -> RequestContext:
    return RequestContext("chat", "m", {}, True, False, "openai", Estimate(prompt, output), service_class="interactive")


def dispatch_until_refused(router: Router, fleet: Fleet, ctx: RequestContext) -> tuple[int, Refusal]:
    n = 0
    while True:
        try:
            router._dispatch(router.pick(fleet.pools["m"], ctx), ctx)
        except Refusal as r:
            return n, r
        n += 1


def test_kv_tokens_bound_admission_by_tokens_not_sequences():
    fleet, router = gpu_fleet(g={"kv_tokens": 10_000, "max_concurrency": 64})
    n, r = dispatch_until_refused(router, fleet, req(3000, 500))  # 3,500 KV tokens each
    assert n == 2 and r.kind == "saturated"  # a third would need 10,500 > 92% of 10,000
    short = req(200, 100)
    n_short, _ = dispatch_until_refused(router, fleet, short)
    assert n_short == (9200 - 7000) // 300  # short conversations still fit in what is left
    g = fleet.upstreams["g"]
    router.release(g, req(3000, 500))
    assert g.endpoint.kv_local == 3500 + n_short * 300


def test_max_concurrency_stays_a_hard_cap_and_an_idle_engine_takes_anything():
    fleet, router = gpu_fleet(g={"kv_tokens": 1_000_000, "max_concurrency": 3})
    assert dispatch_until_refused(router, fleet, req(100, 100))[0] == 3
    fleet, router = gpu_fleet(g={"kv_tokens": 1000})
    assert dispatch_until_refused(router, fleet, req(5000, 100))[0] == 1  # larger than the cache: alone


def test_preemption_risk_discounts_the_gain_of_a_filling_cache():
    fleet, _ = gpu_fleet(a={"kv_tokens": 10_000}, b={"kv_tokens": 100_000})
    a, b = fleet.upstreams["a"], fleet.upstreams["b"]
    for u in (a, b):
        u.credit(0, "interactive", 7000)  # same load, same curve; a's cache is 70% full, b's 7%
    est = req(1000, 200).est  # a: 82% with it
    assert kv_risk(b, est.kv_tokens) == 0.0 and 0.3 < kv_risk(a, est.kv_tokens) < 0.5
    assert throughput_gain(a, est) < 0.7 * throughput_gain(b, est)


def test_unknown_capacity_means_no_kv_limit():
    fleet, router = gpu_fleet(g={"max_concurrency": 5})
    assert fleet.upstreams["g"].kv_capacity is None
    assert dispatch_until_refused(router, fleet, req(50_000, 1000))[0] == 5


def test_capacity_and_external_kv_learned_from_vllm_metrics():
    page = (
        '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="x"} 0.5\n'
        '# TYPE vllm:cache_config_info gauge\n'
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="2000",enable_prefix_caching="True"} 1\n'
    )
    assert parse_kv(page) == (32_000, 0.5)
    assert parse_kv("vllm:num_requests_running 3\n") == (None, None)
    fleet, _ = gpu_fleet(g={}, h={"kv_tokens": 8000})
    g, h = fleet.upstreams["g"], fleet.upstreams["h"]
    g.credit(0, "interactive", 6000)
    g.endpoint.learn_kv(*parse_kv(page))
    assert g.kv_capacity == 32_000 and g.endpoint.kv_external == 16_000 - 6000  # the engine holds more than we sent
    g.endpoint.learn_kv(None, 0.1)  # now less than ours (our estimate includes expected, not yet generated tokens)
    assert g.endpoint.kv_external == 0.0
    h.endpoint.learn_kv(32_000, None)
    assert h.kv_capacity == 8000  # configured wins


def test_other_replicas_kv_estimated_from_their_counts():
    fleet, _ = gpu_fleet(g={"kv_tokens": 100_000})
    g = fleet.upstreams["g"]
    g.credit(0, "interactive", 2000)
    g.credit(0, "interactive", 4000)
    g.set_remote_inflight(4)
    assert g.kv_load() == 6000 + 4 * 3000


# ---- prefix blocks shared by running sequences (affinity.RunningBlocks) ------------------------------------------
def shared_prompt_ctx(i: int) -> RequestContext:
    """A chat request opening with a ~3,000-token system prompt every request shares, then its own question."""
    from gateway.http.validation import build_context, validate
    from gateway.sim.server import WORDS

    system = "".join(WORDS[(k * 7) % len(WORDS)] for k in range(3000))
    body = {"model": "m", "max_tokens": 200, "stream": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]}
    validate("chat", body)
    ctx = build_context("chat", body, headers={})
    ctx.service_class = "interactive"
    return ctx


def test_running_blocks_count_each_shared_block_once() -> None:
    from gateway.routing.affinity import RunningBlocks
    from gateway.routing.prefix import BLOCK_SIZE, block_hashes

    a, b = block_hashes(list(range(10 * BLOCK_SIZE))), block_hashes(list(range(6 * BLOCK_SIZE)) + [9] * 4 * BLOCK_SIZE)
    rb = RunningBlocks()
    assert rb.held(a) == 0 and rb.shared_tokens == 0
    rb.start(a)
    assert rb.held(a) == 10 * BLOCK_SIZE and rb.held(b) == 6 * BLOCK_SIZE  # b shares a's first six blocks only
    rb.start(b)
    assert rb.shared_tokens == 6 * BLOCK_SIZE
    rb.start(a)
    assert rb.shared_tokens == 16 * BLOCK_SIZE
    rb.end(a)
    rb.end(a)
    assert rb.shared_tokens == 0 and rb.held(a) == 6 * BLOCK_SIZE
    rb.end(b)
    assert rb.held(b) == 0 and rb.shared_tokens == 0


def test_kv_limit_counts_a_prompt_running_sequences_share_once_with_affinity() -> None:
    """Requests sharing a 3,000-token system prompt on a 10,000-token engine: prefix-blind, each is charged its
    whole prompt and the third is refused (as in test_kv_tokens_bound_admission_by_tokens_not_sequences); with
    affinity the blocks the running ones hold are charged once, so many more run, and the releases give all back."""
    from gateway.routing.affinity import Affinity, prompt_prefix
    from gateway.routing.prefix import BLOCK_SIZE

    for affinity in (False, True):
        fleet, router = gpu_fleet(g={"kv_tokens": 10_000, "max_concurrency": 64}, h={"kv_tokens": 1, "max_concurrency": 1})
        fleet.pools["m"].cfg.affinity = affinity
        router.affinity = Affinity(fleet)
        g = fleet.upstreams["g"]
        fleet.upstreams["h"].credit(0, "interactive", 0)  # h is full: g is every request's only place
        ctxs: list[RequestContext] = []
        while True:
            ctx = shared_prompt_ctx(len(ctxs))
            try:
                assert router._dispatch(router.pick(fleet.pools["m"], ctx), ctx).upstream is g
            except Refusal as r:
                assert r.kind == "saturated"
                break
            ctxs.append(ctx)
        each = ctxs[0].est.kv_tokens
        if not affinity:
            assert len(ctxs) == 2 and g.endpoint.kv_shared == 0 and ctxs[0].prefix is None  # never hashed
        else:
            a, b = prompt_prefix(ctxs[0]).hashes, prompt_prefix(ctxs[1]).hashes
            common = len(os.path.commonprefix([a, b])) * BLOCK_SIZE  # the full blocks: all of the system prompt
            assert common > 2900
            assert len(ctxs) == 1 + int((0.92 * 10_000 - each) // (each - common))  # the first whole, the others their own part
            assert g.endpoint.kv_shared == (len(ctxs) - 1) * common
            assert g.endpoint.kv_load() == len(ctxs) * each - (len(ctxs) - 1) * common
        for ctx in ctxs:
            router.release(g, ctx)
        assert g.endpoint.kv_local == 0 and g.endpoint.kv_shared == 0
