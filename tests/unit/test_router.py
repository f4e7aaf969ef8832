"""Routing decisions on real in-memory fleet state (no I/O): marginal gain, limits, queueing, strategies."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.config import FleetConfig
from gateway.context import Estimate, RequestContext
from gateway.errors import GatewayError
from gateway.reliability.outlier import OutlierDetector
from gateway.routing.classes import TURNOVER_WAIT
from gateway.routing.router import Refusal, Router, _Waiter, throughput_gain
from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.state.fleet import Fleet
from gateway.state.stats import UpstreamStats


def make(strategy: str = "throughput", **limits) -> tuple[Fleet, Router]:
    cfg: FleetConfig = reference_fleet(DEMO_PORTS)
    for name, kv in limits.items():
        for k, v in kv.items():
            setattr(cfg.upstreams[name], k, v)
    fleet = Fleet(cfg, strategy)
    for p in fleet.pools.values():
        p.strategy = strategy
    return fleet, Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=4, queue_timeout=0.3)


def req(prompt_tokens: int, output_tokens: int, operation: str = "chat", service_class: str = "interactive") -> RequestContext:
    """A request context carrying only what routing reads."""
    est = Estimate(prompt_tokens=prompt_tokens, output_tokens=output_tokens, operation=operation)
    return RequestContext(operation, "fleet-model", {}, True, False, "openai", est, service_class=service_class)


EST = req(prompt_tokens=200, output_tokens=128)


def test_low_load_picks_fastest_per_request_upstream():
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    d = router.pick(pool, EST)
    assert d.upstream.name == "fast-gpu"
    assert set(d.scores) == {"fast-gpu", "slow-gpu", "hosted"}
    assert "marginal gain" in d.reason


def test_burst_water_fills_across_the_fleet():
    """Credit each dispatch at once: a burst spreads out over every upstream in proportion to capacity."""
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    counts: dict[str, int] = {}
    for _ in range(60):
        d = router._dispatch(router.pick(pool, EST), EST)
        counts[d.upstream.name] = counts.get(d.upstream.name, 0) + 1
    assert counts["fast-gpu"] > counts["slow-gpu"] > 0
    assert counts.get("hosted", 0) > 0
    # Greedy marginal gain: at the end every used upstream's next gain is close to the others'.
    open_ = [u for u in pool.upstreams if u.has_slot() and u.rate_allows(u.tpm_charge(EST.est))]
    assert len(open_) >= 2
    gains = {u.name: throughput_gain(u, EST.est) for u in open_}
    assert max(gains.values()) - min(gains.values()) < 0.5 * max(gains.values())


def test_max_concurrency_is_never_exceeded_and_requests_queue():
    fleet, router = make(**{"fast-gpu": {"max_concurrency": 2}, "slow-gpu": {"max_concurrency": 1}, "hosted": {"max_concurrency": 1}})
    pool = fleet.pools["fleet-model"]
    for _ in range(4):
        router._dispatch(router.pick(pool, EST), EST)
    assert [u.inflight for u in pool.upstreams] == [2, 1, 1]
    with pytest.raises(Refusal) as r:
        router.pick(pool, EST)
    assert r.value.kind == "saturated"


async def test_queue_serves_fifo_when_a_slot_frees_and_times_out_otherwise():
    fleet, router = make(**{"fast-gpu": {"max_concurrency": 1}, "slow-gpu": {"weight": 0}, "hosted": {"weight": 0}})
    pool = fleet.pools["fleet-model"]
    first = await router.admit(pool, EST)
    waiter = asyncio.create_task(router.admit(pool, EST))
    await asyncio.sleep(0.05)
    assert router.queue_depth()["fleet-model"] == 1
    router.release(first.upstream, EST)
    second = await asyncio.wait_for(waiter, 1)
    assert second.upstream.name == "fast-gpu" and second.queue_wait > 0.03
    with pytest.raises(GatewayError) as e:
        await router.admit(pool, EST)
    assert e.value.status == 503 and e.value.code == "saturated"


def test_rpm_limit_is_respected_and_reported():
    fleet, router = make(**{"fast-gpu": {"weight": 0}, "slow-gpu": {"weight": 0}})
    pool = fleet.pools["fleet-model"]
    hosted = fleet.upstreams["hosted"]
    hosted.cfg.rpm = 6
    hosted.refresh(time.time())
    sent = 0
    with pytest.raises(Refusal) as r:
        for _ in range(10):
            router._dispatch(router.pick(pool, EST), EST)
            hosted.release("interactive")
            sent += 1
    assert r.value.kind == "rate_limited"
    assert sent == 6


def test_rate_limits_are_paced_not_capped_by_request_duration():
    """rpm 120: a burst may start the pacing bucket's 8 requests, whatever the requests' lengths; the rest of the
    minute's budget follows at the limit's rate instead of being burnt in the first second."""
    for output_tokens in (8, 400):
        fleet, router = make(**{"fast-gpu": {"weight": 0}, "slow-gpu": {"weight": 0}, "hosted": {"max_concurrency": 200, "tpm": None}})
        pool = fleet.pools["fleet-model"]
        hosted = fleet.upstreams["hosted"]
        hosted.refresh(time.time())
        r_ = req(prompt_tokens=200, output_tokens=output_tokens)
        n = 0
        with pytest.raises(Refusal) as r:
            for _ in range(40):
                router._dispatch(router.pick(pool, r_), r_)
                n += 1
        assert r.value.kind == "rate_limited"
        assert n == 8


def test_tpm_counts_prompt_and_max_tokens():
    fleet, router = make(**{"fast-gpu": {"weight": 0}, "slow-gpu": {"weight": 0}})
    pool = fleet.pools["fleet-model"]
    hosted = fleet.upstreams["hosted"]
    hosted.cfg.rpm, hosted.cfg.tpm = None, 6000
    hosted.refresh(time.time())
    big = req(prompt_tokens=700, output_tokens=300)
    n = 0
    with pytest.raises(Refusal):
        for _ in range(10):
            router._dispatch(router.pick(pool, big), big)
            n += 1
    assert n * 1000 <= 6000


def test_limits_are_shared_between_replicas():
    """With 3 live replicas each may take a third of the headroom between refreshes: the fleet cannot overshoot."""
    fleet, router = make(**{"fast-gpu": {"weight": 0}, "slow-gpu": {"weight": 0}})
    hosted = fleet.upstreams["hosted"]
    hosted.cfg.rpm, hosted.cfg.tpm = 6000, None  # the pacing bucket (2 s of a third of it) is not what binds here
    hosted.cfg.max_concurrency = 30
    hosted.set_membership(3, 0)
    hosted.refresh(time.time())
    pool = fleet.pools["fleet-model"]
    n = 0
    with pytest.raises(Refusal):
        for _ in range(100):
            router._dispatch(router.pick(pool, EST), EST)
            n += 1
    assert n == 10  # 30 slots / 3 replicas


def test_weight_zero_drains_and_other_strategies():
    fleet, router = make(**{"fast-gpu": {"weight": 0}})
    pool = fleet.pools["fleet-model"]
    assert router.pick(pool, EST).upstream.name != "fast-gpu"
    for strategy in ("round_robin", "weighted", "least_busy", "lowest_latency"):
        fleet, router = make(strategy)
        pool = fleet.pools["fleet-model"]
        names = set()
        for _ in range(30):
            d = router._dispatch(router.pick(pool, EST), EST)
            assert d.strategy == strategy
            names.add(d.upstream.name)
        assert len(names) >= 2, strategy


def test_ejected_upstream_is_skipped_then_probed_once():
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    fast = fleet.upstreams["fast-gpu"]
    for _ in range(3):
        router.health.failure(fast)
    assert router.health.is_ejected(fast, time.time())
    assert router.pick(pool, EST).upstream.name != "fast-gpu"
    router.health.state(fast).ejected_until = time.time() - 0.01  # backoff elapsed: half-open
    d = router._dispatch(router.pick(pool, EST), EST)
    assert d.upstream is fast and router.health.state(fast).probing
    assert router.pick(pool, EST).upstream is not fast  # only one probe at a time
    router.health.success(fast)
    assert not router.health.state(fast).probing and router.health.state(fast).consecutive == 0


def test_work_conserving_even_when_marginal_gain_is_negative():
    """Short or embedding requests on a busy fleet are still dispatched while any upstream has a slot."""
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    for _ in range(40):
        router._dispatch(router.pick(pool, EST), EST)
    tiny = req(prompt_tokens=10, output_tokens=1)
    d = router.pick(pool, tiny)
    assert d.upstream.has_slot()
    emb = req(prompt_tokens=10, output_tokens=1, operation="embeddings")
    d = router.pick(pool, emb)
    assert d.strategy == "throughput" and "utilisation" in d.reason


async def test_client_leaving_as_it_is_admitted_frees_slot_and_probe():
    fleet, router = make(**{"fast-gpu": {"max_concurrency": 1}, "slow-gpu": {"weight": 0}, "hosted": {"weight": 0}})
    pool = fleet.pools["fleet-model"]
    fast = fleet.upstreams["fast-gpu"]
    first = await router.admit(pool, EST)
    waiter = asyncio.create_task(router.admit(pool, EST))
    await asyncio.sleep(0.01)
    for _ in range(3):
        router.health.failure(fast)  # ejected ...
    router.health.state(fast).ejected_until = time.time() - 0.01  # ... and now half-open
    waiter.cancel()  # the client leaves ...
    router.release(first.upstream, EST)  # ... and in the same loop iteration its request is dispatched as the probe
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert fast.inflight_local == 0 and not router.health.state(fast).probing
    assert router.pick(pool, EST).upstream is fast


def _fleet(upstreams: dict[str, int], models: dict[str, list[str]]) -> tuple[Fleet, Router]:
    from gateway.config import ModelConfig, UpstreamConfig

    cfg = FleetConfig(
        upstreams={n: UpstreamConfig(base_url=f"http://127.0.0.1:1/{n}", max_concurrency=c) for n, c in upstreams.items()},
        models={m: ModelConfig(upstreams=ups) for m, ups in models.items()},
    )
    fleet = Fleet(cfg, "throughput")
    return fleet, Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=8, queue_timeout=2.0)


async def test_a_retry_waiting_for_one_upstream_does_not_block_the_queue():
    fleet, router = _fleet({"A": 8, "B": 1}, {"m": ["A", "B"]})
    pool = fleet.pools["m"]
    b = fleet.upstreams["B"]
    b.credit(0, "interactive")  # B is busy
    retry = asyncio.create_task(router.admit(pool, EST, frozenset({"A"})))  # failed on A, may only use B
    await asyncio.sleep(0.01)
    assert router.queue_depth()["m"] == 1
    d = await asyncio.wait_for(router.admit(pool, EST), 0.5)  # A is idle: no waiting behind the retry
    assert d.upstream.name == "A" and d.queue_wait == 0.0
    router.release(b, EST)
    assert (await asyncio.wait_for(retry, 0.5)).upstream is b


async def test_models_sharing_an_upstream_are_served_oldest_first():
    fleet, router = _fleet({"S": 1}, {"m1": ["S"], "m2": ["S"]})
    s = fleet.upstreams["S"]
    first = await router.admit(fleet.pools["m1"], EST)
    older = asyncio.create_task(router.admit(fleet.pools["m2"], EST))
    await asyncio.sleep(0.01)
    newer = asyncio.create_task(router.admit(fleet.pools["m1"], EST))
    await asyncio.sleep(0.01)
    router.release(first.upstream, EST)
    await asyncio.sleep(0.01)
    assert older.done() and not newer.done()
    router.release(s, EST)
    await asyncio.wait_for(newer, 0.5)
    await older


def test_replica_shares_add_up_exactly():
    """Three replicas see 3 of 4 slots taken: exactly one of them may add one; a 2-rpm limit serves two."""
    admitted = 0
    for rank in range(3):
        fleet, router = make(**{"slow-gpu": {"weight": 0}, "hosted": {"weight": 0}, "fast-gpu": {"max_concurrency": 4}})
        fast = fleet.upstreams["fast-gpu"]
        fast.set_membership(3, rank)
        fast.set_remote_inflight(3)
        fast.refresh(time.time())
        try:
            while True:
                router._dispatch(router.pick(fleet.pools["fleet-model"], EST), EST)
                admitted += 1
        except Refusal:
            pass
    assert admitted == 1
    admitted = 0
    for rank in range(3):
        fleet, router = make(**{"fast-gpu": {"weight": 0}, "slow-gpu": {"weight": 0}, "hosted": {"rpm": 2}})
        hosted = fleet.upstreams["hosted"]
        hosted.set_membership(3, rank)
        hosted.refresh(time.time())
        try:
            while True:
                router._dispatch(router.pick(fleet.pools["fleet-model"], EST), EST)
                hosted.release("interactive")
                admitted += 1
        except Refusal:
            pass
    assert admitted == 2


async def test_request_larger_than_any_tpm_share_is_refused_clearly():
    fleet, router = make(**{"fast-gpu": {"weight": 0}, "slow-gpu": {"weight": 0}, "hosted": {"tpm": 9000, "rpm": None}})
    hosted = fleet.upstreams["hosted"]
    hosted.set_membership(3, 0)
    big = req(prompt_tokens=100, output_tokens=4000)
    with pytest.raises(GatewayError) as e:
        await router.admit(fleet.pools["fleet-model"], big)
    assert e.value.status == 400 and e.value.param == "max_tokens" and "4100 tokens" in e.value.message
    hosted.set_membership(1, 0)
    assert (await router.admit(fleet.pools["fleet-model"], big)).upstream is hosted


def test_error_adjusted_gain():
    from gateway.routing.router import error_adjusted

    assert error_adjusted(10.0, 1.0) == 10.0
    assert abs(error_adjusted(10.0, 0.7) - 4.0) < 1e-9  # 70% delivered, 30% cost a retry elsewhere
    assert error_adjusted(10.0, 0.5) == 0.0
    assert error_adjusted(-2.0, 0.5) < -2.0  # the least harmful place only gets worse


def test_failing_upstream_gets_less_than_its_success_weighted_share():
    """Three equal upstreams, one failing 30%: greedy dispatch gives it less than 0.7/2.7 of the traffic."""
    from gateway.config import CapacityHint, ModelConfig, UpstreamConfig

    hint = CapacityHint(a=0.01, b=0.001, ttft=0.05)  # a batching server: each extra sequence slows the others
    cfg = FleetConfig(
        upstreams={n: UpstreamConfig(base_url=f"http://127.0.0.1:1/{n}", max_concurrency=64, capacity=hint)
                   for n in ("a", "b", "c")},
        models={"m": ModelConfig(upstreams=["a", "b", "c"])},
    )
    fleet = Fleet(cfg, "throughput")
    det = OutlierDetector(5, 1.0, 10.0, pools=[["a", "b", "c"]])
    router = Router(fleet, det, queue_max=4, queue_timeout=0.3)
    pool = fleet.pools["m"]
    bad = fleet.upstreams["c"]
    for i in range(100):
        (det.failure if i % 10 < 3 else det.success)(bad, time.monotonic())
    counts = {"a": 0, "b": 0, "c": 0}
    for _ in range(90):
        d = router._dispatch(router.pick(pool, EST), EST)
        counts[d.upstream.name] += 1
    share = counts["c"] / 90
    assert 0 < share < 0.7 / 2.7, counts


# ---- a scarce request budget goes to long answers -------------------------------------------------------------
def _spend_rpm(fleet: Fleet, name: str, requests: int) -> None:
    """`requests` started on `name` this second, as the sync loop then sees them (refresh); its pacing bucket is
    refilled (as if they had been paced over the last seconds), so only the budget's pressure is new."""
    u = fleet.upstreams[name]
    for _ in range(requests):
        u.credit(0)
        u.release()
    u.refresh(time.time())
    u.rates._pace_at -= 10.0


def _lengths(fleet: Fleet, short: int, long: int) -> None:
    lengths = fleet.pools["fleet-model"].lengths
    for _ in range(short):
        lengths.arrived(64)
    for _ in range(long):
        lengths.arrived(512)


def test_short_answer_avoids_a_nearly_spent_rpm_budget_long_one_keeps_it():
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    _lengths(fleet, 80, 20)  # p90 of recent arrivals' expected outputs: 512
    for _ in range(30):
        fleet.upstreams["fast-gpu"].credit(0)  # a busy GPU: its marginal gain is well below the hosted API's
    short, long = req(200, 64), req(200, 512)
    assert router.pick(pool, short).upstream.name == "hosted", "with budget headroom the hosted API is free to use"
    _spend_rpm(fleet, "hosted", 20)  # 20 requests in the last 10 s = 120/min: at the limit's pace
    d = router.pick(pool, short)
    assert d.upstream.name != "hosted" and "hosted" not in d.scores
    assert router.pick(pool, long).upstream.name == "hosted", "a long answer gets the most from a request unit"
    for _ in range(34):
        fleet.upstreams["fast-gpu"].credit(0)
    for _ in range(16):
        fleet.upstreams["slow-gpu"].credit(0)
    with pytest.raises(Refusal):  # a fresh short answer with a TTFT target first waits for a GPU slot
        router.pick(pool, short)
    short.started -= _hold_s(fleet, short)
    assert router.pick(pool, short).upstream.name == "hosted", "the scarce budget is still used when nothing else can"


def _hold_s(fleet: Fleet, ctx: RequestContext) -> float:
    """How long `ctx` holds out for a GPU slot before it may spend the hosted API's budget."""
    cls = fleet.pools["fleet-model"].cfg.classes[ctx.service_class]
    assert cls.max_ttft_s is not None
    return TURNOVER_WAIT * (cls.max_ttft_s - fleet.upstreams["hosted"].curve.ttft_for(ctx.est.prompt_tokens)) + 0.01


def _gpus_full(fleet: Fleet) -> None:
    for name, n in (("fast-gpu", 64), ("slow-gpu", 16)):
        for _ in range(n):
            fleet.upstreams[name].credit(0)


def test_short_answer_with_ttft_target_waits_briefly_rather_than_spend_a_scarce_budget():
    """Held out of a scarce budget while it can wait for a GPU slot (TURNOVER_WAIT of the TTFT slack the hosted
    API leaves), allowed then, held again once the hosted API could no longer meet the target either."""
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    _lengths(fleet, 80, 20)
    _gpus_full(fleet)
    _spend_rpm(fleet, "hosted", 20)
    short = req(200, 64)
    with pytest.raises(Refusal) as r:
        router.pick(pool, short)
    assert r.value.kind == "class_limited"
    short.started -= _hold_s(fleet, short)
    assert router.pick(pool, short).upstream.name == "hosted"
    short.started -= 2.0  # past the TTFT target on the hosted API too: a miss anyway, so keep the budget
    with pytest.raises(Refusal):
        router.pick(pool, short)
    assert router.pick(pool, req(200, 64), best_effort=True).upstream.name == "hosted"  # its wait_s is over
    assert router.pick(pool, req(200, 512)).upstream.name == "hosted", "a long answer is not held"
    assert router.pick(pool, req(200, 64, service_class="batch")).upstream.name == "hosted", "no TTFT target"


def test_no_hold_out_without_an_upstream_free_of_a_request_budget():
    fleet, router = make(**{"fast-gpu": {"weight": 0}, "slow-gpu": {"weight": 0}})
    _lengths(fleet, 80, 20)
    _spend_rpm(fleet, "hosted", 20)
    assert router.pick(fleet.pools["fleet-model"], req(200, 64)).upstream.name == "hosted"


def test_cold_start_a_long_answer_waiting_makes_the_budget_scarce_for_a_short_one():
    """Before any long answer has finished, the pool's p90 output is a short one's (they finish first); the
    backlog waiting in the queue shows what a budget unit would otherwise be spent on."""
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    _gpus_full(fleet)
    _spend_rpm(fleet, "hosted", 20)
    assert router.pick(pool, req(200, 64)).upstream.name == "hosted", "no long answer known: nothing displaced"
    loop = asyncio.new_event_loop()
    try:
        long = req(200, 512, service_class="batch")
        router._queues[pool.model].append(
            _Waiter(pool, long, pool.cfg.classes["batch"], frozenset(), loop.create_future(), time.monotonic(),
                    Refusal("saturated", "queued"))
        )
        router._queue_changed(pool)
        with pytest.raises(Refusal):
            router.pick(pool, req(200, 64))
    finally:
        loop.close()


def test_scarce_budget_only_for_request_limited_upstreams_and_short_requests():
    from gateway.routing.router import spends_scarce_budget

    fleet, _ = make()
    hosted, fast = fleet.upstreams["hosted"], fleet.upstreams["fast-gpu"]
    _spend_rpm(fleet, "hosted", 20)
    assert spends_scarce_budget(hosted, 64, 512, 512)
    assert not spends_scarce_budget(hosted, 512, 512, 512)
    assert not spends_scarce_budget(hosted, 512, 512, 1024)  # long, but the pacing bucket is full
    assert not spends_scarce_budget(fast, 64, 512, 512)  # no RPM limit: capacity is measured in tokens
    fleet2, _ = make()
    assert not spends_scarce_budget(fleet2.upstreams["hosted"], 64, 512, 512)  # budget not under pressure


def test_a_budget_started_at_its_pace_is_scarce_before_the_minute_shows_it():
    from gateway.routing.router import spends_scarce_budget

    fleet, _ = make()
    hosted = fleet.upstreams["hosted"]
    assert hosted.rate_allows(0) and not hosted.rates.pacing_low()
    for _ in range(6):  # a backlog takes most of the pacing bucket (8 requests) at once
        hosted.credit(0)
    assert hosted.rate_allows(0) and hosted.rates.pacing_low()
    assert spends_scarce_budget(hosted, 64, 512, 512)


def test_the_pacing_buckets_lower_half_is_kept_for_the_longest_answers():
    """256-token answers count as long (they fill the budget with the 1024-token ones) but are not the longest:
    they take units only while the bucket is at least half full, so 1024-token answers arriving together find
    half of it (those in the longest one's max_tokens band count as the longest)."""
    from gateway.routing.router import spends_scarce_budget

    fleet, _ = make()
    hosted = fleet.upstreams["hosted"]
    assert hosted.rate_allows(0)  # its pacing bucket: 8 requests
    for _ in range(4):  # half full
        hosted.credit(0)
    assert hosted.rate_allows(0) and not hosted.rates.pacing_low()
    assert not spends_scarce_budget(hosted, 256, 256, 1024)
    hosted.credit(0)
    assert hosted.rate_allows(0) and hosted.rates.pacing_low()
    assert spends_scarce_budget(hosted, 256, 256, 1024)
    assert not spends_scarce_budget(hosted, 1024, 256, 1024)
    assert not spends_scarce_budget(hosted, 600, 256, 1024)  # the longest one's band: (512, 1024]
    fleet, _ = make()
    hosted = fleet.upstreams["hosted"]
    assert hosted.rate_allows(0)
    hosted.credit(3000)  # the TPM bucket is below half, the RPM bucket is not: only the request units are reserved
    assert hosted.rates.pacing_low() and not hosted.rates.requests_paced()
    assert not spends_scarce_budget(hosted, 256, 256, 1024)
    assert spends_scarce_budget(hosted, 64, 256, 1024)  # a short answer: any bucket half empty


def test_a_short_answer_takes_only_the_units_the_pacing_bucket_would_discard():
    """Below the pressure counts, with the bucket more than half full, a short answer still waits for the bucket to
    be within one request of full (UpstreamRates.requests_spare): a unit left there is not lost until it overflows,
    and the long answers come back for it. A long one (not the longest) keeps the half-full rule."""
    from gateway.routing.router import spends_scarce_budget

    fleet, _ = make()
    hosted = fleet.upstreams["hosted"]
    assert hosted.rate_allows(0) and hosted.rates.requests_spare()  # a full bucket: 8 requests
    assert not spends_scarce_budget(hosted, 64, 256, 1024)
    hosted.credit(0)
    assert hosted.rate_allows(0) and hosted.rates.requests_spare()  # 7 of 8: the next refill would overflow
    assert not spends_scarce_budget(hosted, 64, 256, 1024)
    hosted.credit(0)
    assert hosted.rate_allows(0) and not hosted.rates.requests_spare() and not hosted.rates.pacing_low()
    assert spends_scarce_budget(hosted, 64, 256, 1024)
    assert not spends_scarce_budget(hosted, 256, 256, 1024)  # long: only the lower half is reserved
    assert not spends_scarce_budget(hosted, 64, 64, 64)  # the longest of the minute: nothing to keep it for
    hosted.rates._pace_at -= 1.0  # refilled (2 requests a second): within one request of full again
    assert hosted.rate_allows(0) and hosted.rates.requests_spare()
    assert not spends_scarce_budget(hosted, 64, 256, 1024)


def test_long_threshold_follows_the_share_of_requests_the_budget_can_take():
    from gateway.routing.router import LONG_OUTPUT_Q, LONG_OUTPUT_Q_MAX, LONG_SHARE_MARGIN, long_output_q

    assert long_output_q(0.0, 30.0) == LONG_OUTPUT_Q  # no RPM limit in the pool
    assert long_output_q(2.0, 0.0) == LONG_OUTPUT_Q  # no traffic seen yet
    assert long_output_q(2.0, 32.0) == pytest.approx(1 - LONG_SHARE_MARGIN * 2 / 32)  # the longest ~5% of 32/s
    assert long_output_q(3.0, 3.0) == pytest.approx(1 - LONG_SHARE_MARGIN)  # a hosted-only pool: most count as long
    assert long_output_q(10.0, 5.0) == 0.0  # more budget than requests: nothing is short
    assert long_output_q(0.01, 1000.0) == LONG_OUTPUT_Q_MAX


def test_short_requests_are_the_many_the_budget_still_goes_to_the_long_ones():
    """16-token requests are 95% of arrivals: a fixed 90th percentile would call them long. With the pool sending
    ~30 requests/s and the hosted API allowing 2/s, the threshold is the 1024-token requests' length."""
    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    for _ in range(475):
        pool.lengths.arrived(16)
    for _ in range(25):
        pool.lengths.arrived(1024)
    for u in pool.upstreams:
        u.rates.rps = 10.0
    pool.observe_demand()
    assert pool.rpm_rps == pytest.approx(2.0) and pool.request_rps == pytest.approx(30.0)
    for name, busy in (("fast-gpu", 30), ("slow-gpu", 14)):  # busy GPUs: a short answer gains little there
        for _ in range(busy):
            fleet.upstreams[name].credit(0)
    _spend_rpm(fleet, "hosted", 20)  # at the limit's pace: the budget is under pressure
    assert router.pick(pool, req(200, 16)).upstream.name != "hosted"
    assert router.pick(pool, req(200, 1024)).upstream.name == "hosted"


# ---- a long answer waits a moment for the next unit of a budget spent at its pace ------------------------------
def _pacing_bucket_empty(fleet: Fleet) -> UpstreamStats:
    """The hosted API's requests are being started at its limit's pace: its pacing bucket has no unit left."""
    hosted = fleet.upstreams["hosted"]
    hosted.refresh(time.time())
    while hosted.rate_allows(0):
        hosted.credit(0)
        hosted.release()
    return hosted


def _make_patient(**limits) -> tuple[Fleet, Router]:
    """make() with the production queue timeout (30 s): a hold never outlasts the queue's timeout."""
    fleet, router = make(**limits)
    router.queue_timeout = 30.0
    return fleet, router


def _busy_fast_gpu(fleet: Fleet, n: int = 30) -> None:
    for _ in range(n):
        fleet.upstreams["fast-gpu"].credit(0)


def test_long_answer_waits_for_the_next_unit_rather_than_run_on_a_worse_upstream():
    fleet, router = _make_patient()
    pool = fleet.pools["fleet-model"]
    _lengths(fleet, 95, 5)  # the budget goes to answers of 64 tokens and more: the arriving p90 is 64
    _busy_fast_gpu(fleet)
    hosted = _pacing_bucket_empty(fleet)
    long = req(200, 1024)
    with pytest.raises(Refusal) as r:
        router.pick(pool, long)
    assert r.value.kind == "held" and 0 < r.value.wait <= 60 / 120, "one unit of a 120 RPM budget: within 0.5 s"
    assert router.pick(pool, req(200, 64)).upstream.name != "hosted", "as long as the budget's usual answer: no hold"
    late = req(200, 1024)
    late.started -= 1.5  # its TTFT target (2 s) on the hosted API (0.4 s) would be missed by waiting more
    assert router.pick(pool, late).upstream.name != "hosted"
    router.queue_timeout = 0.3
    assert router.pick(pool, req(200, 1024)).upstream.name != "hosted", "nor would it be held past its queue timeout"
    router.queue_timeout = 30.0
    hosted.rates._pace_at -= 60 / 120  # the next unit is in the bucket
    assert router.pick(pool, long).upstream.name == "hosted"


def test_no_hold_when_a_free_upstream_gains_as_much_or_the_window_is_spent():
    fleet, router = _make_patient()
    pool = fleet.pools["fleet-model"]
    _lengths(fleet, 95, 5)
    _pacing_bucket_empty(fleet)
    assert router.pick(pool, req(200, 1024)).upstream.name == "fast-gpu", "an idle fast GPU beats waiting"
    fleet2, router2 = _make_patient(**{"hosted": {"rpm": 8}})
    _lengths(fleet2, 95, 5)
    _busy_fast_gpu(fleet2)
    _pacing_bucket_empty(fleet2)  # 8 requests: the minute's whole budget, not only the bucket
    assert router2.pick(fleet2.pools["fleet-model"], req(200, 1024)).upstream.name != "hosted"


async def test_a_held_long_answer_takes_the_next_unit_before_shorter_ones_and_blocks_nobody():
    fleet, router = _make_patient()
    pool = fleet.pools["fleet-model"]
    _lengths(fleet, 95, 5)
    _busy_fast_gpu(fleet)
    hosted = _pacing_bucket_empty(fleet)
    waiting = asyncio.create_task(router.admit(pool, req(200, 1024)))
    await asyncio.sleep(0.01)
    assert router.queue_depth()["fleet-model"] == 1 and pool.waiting_output == 1024
    hosted.rates._pace_at -= 60 / 120
    mid = await asyncio.wait_for(router.admit(pool, req(200, 256)), 0.1)  # not queued behind the held one ...
    assert mid.upstream.name != "hosted" and mid.queue_wait == 0.0  # ... and it leaves it the unit
    router.wake()
    d = await asyncio.wait_for(waiting, 0.1)
    assert d.upstream.name == "hosted" and pool.waiting_output == 0


async def test_held_answers_of_one_length_count_only_the_earlier_ones_ahead():
    """Two 1024-token answers held together: the first one's wait is one unit, the second's two. (Counting each
    other, both saw two, and the first let go of a hold it would have made in time.)"""
    fleet, router = _make_patient()
    pool = fleet.pools["fleet-model"]
    _lengths(fleet, 95, 5)
    _busy_fast_gpu(fleet)
    _pacing_bucket_empty(fleet)
    first, second = req(200, 1024), req(200, 1024)
    second.started = first.started + 0.01
    held = [asyncio.create_task(router.admit(pool, c)) for c in (first, second)]
    await asyncio.sleep(0.01)
    assert router.queue_depth()["fleet-model"] == 2
    assert router._held_ahead(pool, first) == 0 and router._held_ahead(pool, second) == 1
    assert router._held_ahead(pool, req(200, 256)) == 2  # a shorter one yields to both
    for t in held:
        t.cancel()
    await asyncio.gather(*held, return_exceptions=True)


def test_one_definition_of_a_long_answer_for_the_strategy_and_the_hold_out():
    """With 2 requests/s of budget out of 40/s, the longest ~4% count as long (long_output_q), not the longest 10%:
    a 256-token answer is short both for the strategy (a GPU with a free slot takes it) and for the hold-out of a
    request with a TTFT target (it waits for a GPU slot rather than spend the unit)."""
    from gateway.routing.router import long_output

    fleet, router = make()
    pool = fleet.pools["fleet-model"]
    lengths = pool.lengths
    for m, n in ((64, 90), (256, 6), (1024, 4)):
        for _ in range(n):
            lengths.arrived(m)
    pool.request_rps = 40.0
    mid = req(200, 256)
    assert long_output(pool, mid.est) == 1024
    _busy_fast_gpu(fleet)
    _spend_rpm(fleet, "hosted", 20)
    assert router.pick(pool, mid).upstream.name != "hosted"
    _gpus_full(fleet)
    with pytest.raises(Refusal) as r:
        router.pick(pool, mid)
    assert r.value.kind == "class_limited"
