"""Service classes: selection and its errors, the per-class concurrency limit from a curve, admission, queue order."""

from __future__ import annotations

import asyncio

import pytest

from gateway.config import FleetConfig, ServiceClass, default_classes
from gateway.context import Estimate, RequestContext
from gateway.errors import GatewayError
from gateway.reliability.outlier import OutlierDetector
from gateway.routing import classes
from gateway.routing.capacity import Sample
from gateway.routing.classes import FLOOR_MARGIN, ClassPolicy, interactive_limit
from gateway.routing.router import Refusal, Router
from gateway.state.fleet import Fleet


def fleet_of(slots: dict[str, int], interactive: ServiceClass | None = None, preempt: int = 0) -> tuple[Fleet, Router]:
    """GPU upstreams with t(n) = 0.008 + 0.0004 n (floor 40 tok/s with the 3% margin -> n_f = 40) and the given slots;
    batch requests may be preempted `preempt` times (0: the room for interactive requests is kept idle)."""
    ups = {
        n: {"base_url": f"http://127.0.0.1:1/{n}", "max_concurrency": mc, "capacity": {"a": 0.008, "b": 0.0004, "ttft": 0.1}}
        for n, mc in slots.items()
    }
    batch = default_classes()["batch"].model_copy(update={"max_preemptions": preempt})
    model: dict = {"upstreams": list(slots), "classes": {"batch": batch.model_dump()}}
    if interactive is not None:
        model["classes"]["interactive"] = interactive.model_dump()
    fleet = Fleet(FleetConfig.model_validate({"upstreams": ups, "models": {"m": model}}), "throughput")
    return fleet, Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=16, queue_timeout=5.0)


FLOOR40 = ServiceClass(min_tok_s=40.0, max_ttft_s=1.0, wait_s=0.5)


def req(service_class: str = "interactive", prompt: int = 100, output: int = 64) -> RequestContext:
    return RequestContext("chat", "m", {}, True, False, "openai", Estimate(prompt, output), service_class=service_class)


def fill(router: Router, fleet: Fleet, name: str, n: int, service_class: str) -> None:
    for _ in range(n):
        fleet.upstreams[name].credit(0, service_class)


# ---- selection ----------------------------------------------------------------------------------------------
def test_class_comes_from_header_then_service_tier() -> None:
    assert classes.requested_class({"X-Gateway-Class": "Batch"}, {"service_tier": "priority"}) == ("batch", "X-Gateway-Class")
    assert classes.requested_class({}, {"service_tier": "flex"}) == ("batch", "service_tier")
    assert classes.requested_class({}, {"service_tier": "priority"}) == ("interactive", "service_tier")
    assert classes.requested_class({}, {"service_tier": "auto"}) == (None, None)
    assert classes.requested_class({}, {}) == (None, None)
    with pytest.raises(GatewayError) as e:
        classes.requested_class({}, {"service_tier": "turbo"})
    assert e.value.status == 400 and e.value.param == "service_tier"


def test_resolve_order_and_unknown_class() -> None:
    fleet, _ = fleet_of({"A": 8})
    pool = fleet.pools["m"]
    assert classes.resolve(pool, None, None, None) == "interactive"  # pool default
    assert classes.resolve(pool, None, None, "batch") == "batch"  # the key's default
    assert classes.resolve(pool, "interactive", "X-Gateway-Class", "batch") == "interactive"  # explicit wins
    with pytest.raises(GatewayError) as e:
        classes.resolve(pool, "gold", "X-Gateway-Class", None)
    assert e.value.status == 400 and e.value.code == "invalid_service_class" and e.value.param == "X-Gateway-Class"


# ---- the limit a floor puts on a curve -----------------------------------------------------------------------
def test_interactive_limit_from_curve() -> None:
    fleet, _ = fleet_of({"A": 64, "B": 16})
    a, b = fleet.upstreams["A"], fleet.upstreams["B"]
    assert interactive_limit(a, FLOOR40) == 40  # (1/(40 * 1.03) - 0.008) / 0.0004 = 40.7
    assert interactive_limit(b, FLOOR40) == 16  # capped by the engine's slots
    assert interactive_limit(a, ServiceClass(min_tok_s=200.0)) == 0  # a alone is 1/0.008 = 125 tok/s
    assert interactive_limit(a, ServiceClass()) == 64  # no floor
    a.curve.b = 0.0
    assert interactive_limit(a, FLOOR40) == 64  # flat curve (hosted-like)


def test_interactive_limit_follows_the_curves_shape_not_the_line_alone() -> None:
    """A KV-bound engine measured only around 8 streams: the line's intercept is off (0.03 s here, past the 40
    tok/s floor on its own), the shape factor brings t(n) back to what the data shows there (0.7x: ~0.023 s at 8).
    The limit is where t(n) crosses the floor, not where the line does (0, which refused the engine outright)."""
    fleet, _ = fleet_of({"A": 16})
    c = fleet.upstreams["A"].curve
    c.a, c.b = 0.03, 0.0004
    c._shape_n, c._shape_k = [8.0], [0.7]
    t = 1.0 / (40.0 * (1.0 + FLOOR_MARGIN))  # the floor with its margin: 0.02427 s
    assert c.tpot(11) < t < c.tpot(12)  # (0.02427 / 0.7 - 0.03) / 0.0004 = 11.7
    assert interactive_limit(fleet.upstreams["A"], FLOOR40) == 11


def test_policy_keeps_the_limit_until_the_curve_is_refitted_or_the_slots_change() -> None:
    """ClassPolicy.limit caches interactive_limit per upstream and floor: a change of the curve's figures between
    fits is not seen (nothing but a fit changes them in service), a fit or new max_concurrency is."""
    fleet, router = fleet_of({"A": 64})
    a, policy = fleet.upstreams["A"], router.classes
    assert policy.limit(a, FLOOR40) == 40
    a.curve.b = 0.0008  # not a fit: the cached limit stands
    assert policy.limit(a, FLOOR40) == 40
    assert policy.limit(a, ServiceClass(min_tok_s=20.0)) == 50  # another floor: its own entry, from the curve now
    now = 1000.0  # a fit to samples of t(n) = 0.008 + 0.0008 n: n_f = (0.02427 - 0.008) / 0.0008 = 20.3
    a.curve.fit([Sample(now - i * 0.01, n, 0.008 + 0.0008 * n, 0.1, 100, 128) for i in range(40) for n in (4, 16, 32)], now)
    assert policy.limit(a, FLOOR40) == interactive_limit(a, FLOOR40) == 20
    a.cfg.max_concurrency = 16
    assert policy.limit(a, FLOOR40) == 16


def test_interactive_admitted_only_within_its_floor_and_ttft() -> None:
    fleet, router = fleet_of({"A": 64}, FLOOR40)
    pool, a = fleet.pools["m"], fleet.upstreams["A"]
    fill(router, fleet, "A", 39, "batch")
    assert router.pick(pool, req()).upstream is a  # 40th sequence still decodes at >= 40 tok/s (with the margin)
    fill(router, fleet, "A", 1, "batch")
    with pytest.raises(Refusal) as r:
        router.pick(pool, req())
    assert r.value.kind == "class_limited"
    assert router.pick(pool, req(), best_effort=True).upstream is a  # slots remain for best effort
    fleet2, router2 = fleet_of({"A": 64}, FLOOR40)
    fleet2.upstreams["A"].curve.ttft = 2.0
    with pytest.raises(Refusal):
        router2.pick(fleet2.pools["m"], req())  # predicted TTFT over the 1 s target


def test_batch_never_pushes_running_interactive_below_floor() -> None:
    fleet, router = fleet_of({"A": 64, "B": 64}, FLOOR40)
    pool = fleet.pools["m"]
    fill(router, fleet, "A", 1, "interactive")
    fill(router, fleet, "A", 39, "batch")  # A at its interactive limit
    d = router.pick(pool, req("batch"))
    assert d.upstream.name == "B", "batch must not go where interactive requests would slow below their floor"


def test_batch_keeps_room_for_interactive_demand_but_gets_its_min_share() -> None:
    fleet, router = fleet_of({"A": 64}, FLOOR40)
    pool = fleet.pools["m"]
    policy: ClassPolicy = router.classes
    fill(router, fleet, "A", 10, "interactive")
    policy.observe(pool)  # demand estimate: ~10 interactive in flight
    assert policy.reserve(pool) >= 1
    fill(router, fleet, "A", 26, "batch")  # room left for interactive: 40 - 36 = 4 < reserve (20 - 10)
    with pytest.raises(Refusal) as r:
        router.pick(pool, req("batch"))
    assert r.value.kind == "class_limited"
    # ... unless batch is below its guaranteed share of the pool (10% of 64 slots = 6).
    fleet2, router2 = fleet_of({"A": 64}, FLOOR40)
    fill(router2, fleet2, "A", 36, "interactive")
    router2.classes.observe(fleet2.pools["m"])
    assert router2.pick(fleet2.pools["m"], req("batch")).upstream.name == "A"


def test_batch_may_spend_a_rate_limited_api_when_gpu_room_is_kept() -> None:
    """A rate-limited API's slots are no interactive room (its budget goes to whoever comes first): batch work is
    not held back from it by the reserve, only from the GPU whose free slots the reserve keeps."""
    ups = {
        "A": {"base_url": "http://127.0.0.1:1/a", "max_concurrency": 64, "capacity": {"a": 0.008, "b": 0.0004, "ttft": 0.1}},
        "H": {"base_url": "http://127.0.0.1:1/h", "kind": "hosted", "max_concurrency": 32, "rpm": 120,
              "capacity": {"a": 0.0167, "b": 0.0, "ttft": 0.4}},
    }
    batch = default_classes()["batch"].model_copy(update={"max_preemptions": 0})
    model = {"upstreams": ["A", "H"], "classes": {"interactive": FLOOR40.model_dump(), "batch": batch.model_dump()}}
    fleet = Fleet(FleetConfig.model_validate({"upstreams": ups, "models": {"m": model}}), "throughput")
    router = Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=16, queue_timeout=5.0)
    pool = fleet.pools["m"]
    fill(router, fleet, "A", 10, "interactive")
    router.classes.observe(pool)
    fill(router, fleet, "A", 28, "batch")  # A's interactive room (2) is below the reserve
    d = router.pick(pool, req("batch", output=512))
    assert d.upstream.name == "H" and set(d.scores) == {"H"}, "only the rate-limited API is open to batch"


# ---- queue ---------------------------------------------------------------------------------------------------
async def test_queue_serves_interactive_before_older_batch_and_aging_lifts_batch() -> None:
    fleet, router = fleet_of({"A": 1}, ServiceClass())  # no targets: only priorities matter here
    pool = fleet.pools["m"]
    first = await router.admit(pool, req("batch"))
    older_batch = asyncio.create_task(router.admit(pool, req("batch")))
    await asyncio.sleep(0)
    newer_interactive = asyncio.create_task(router.admit(pool, req("interactive")))
    await asyncio.sleep(0)
    assert router.queue_depth()["m"] == 2
    router.release(first.upstream, req("batch"))
    d = await asyncio.wait_for(newer_interactive, 1.0)
    assert not older_batch.done(), "interactive (priority 0) is served before batch (priority 10)"
    # Aging: a batch request that has waited 10 priority steps' worth outranks a new interactive one.
    newest_interactive = asyncio.create_task(router.admit(pool, req("interactive")))
    await asyncio.sleep(0)
    for w in router._queues["m"]:
        if w.ctx.service_class == "batch":
            w.since -= 11 * w.cls.aging_s
    router.release(d.upstream, req("interactive"))
    await asyncio.wait_for(older_batch, 1.0)
    assert not newest_interactive.done()
    newest_interactive.cancel()


async def test_interactive_goes_best_effort_after_its_wait() -> None:
    fleet, router = fleet_of({"A": 64}, FLOOR40)
    pool = fleet.pools["m"]
    fill(router, fleet, "A", 40, "batch")  # past the interactive limit, slots remain
    ctx = req()
    task = asyncio.create_task(router.admit(pool, ctx))
    await asyncio.sleep(0)
    assert not task.done()
    router.wake()
    assert not task.done(), "waits while its wait_s has not passed"
    router._queues["m"][0].since -= FLOOR40.wait_s
    router.wake()
    d = await asyncio.wait_for(task, 1.0)
    assert d.upstream.name == "A" and ctx.extras.get("best_effort") is True


def test_room_is_kept_where_it_idles_fewest_slots() -> None:
    """A slow server whose floor allows 3 of its 16 slots is not held as room while the fast GPU (40 of 64) can hold
    the interactive demand: batch keeps filling it. It becomes room only when the demand needs it too."""
    fleet, _ = fleet_of({"A": 64, "S": 16})
    a, slow = fleet.upstreams["A"], fleet.upstreams["S"]
    slow.curve.a, slow.curve.b = 0.02, 0.0015  # 40 tok/s * 1.03 -> 2 sequences
    limits = {"A": interactive_limit(a, FLOOR40), "S": interactive_limit(slow, FLOOR40)}
    assert limits == {"A": 40, "S": 2}
    assert classes.room_upstreams([slow, a], limits, 25.0) == [a]
    assert classes.room_upstreams([slow, a], limits, 41.0) == [a, slow]
    assert classes.room_upstreams([slow, a], {"A": 0, "S": 2}, 5.0) == [slow]  # a GPU too slow for the floor: none


def test_batch_fills_a_server_kept_out_of_the_room_when_the_room_is_short() -> None:
    fleet, router = fleet_of({"A": 64, "S": 16}, FLOOR40)
    pool, slow = fleet.pools["m"], fleet.upstreams["S"]
    slow.curve.a, slow.curve.b = 0.02, 0.0015
    fill(router, fleet, "A", 10, "interactive")
    router.classes.observe(pool)
    fill(router, fleet, "A", 28, "batch")  # A's room (2) is below the reserve
    fill(router, fleet, "S", 15, "batch")
    d = router.pick(pool, req("batch", output=512))
    assert d.upstream is slow and set(d.scores) == {"S"}, "the slow server's last slot is batch's, A's room is kept"


def test_slots_for_wait_is_erlang_c_with_the_wait_an_arrival_can_afford() -> None:
    """M/M/c: P(wait > W) = C(c, a) e^{-(c-a) W/S}. 10 Erlangs need 20 slots for < 0.5% waiting at all; allowed
    to wait W = 0.5 s for 1.7-s holds (interactive answers end within it too) 17; 20 Erlangs 34 and 29."""
    assert classes.slots_for_wait(10.0, 0.0, 0.005) == 20
    assert classes.slots_for_wait(10.0, 0.5 / 1.7, 0.005) == 17
    assert classes.slots_for_wait(20.0, 0.0, 0.005) == 34
    assert classes.slots_for_wait(20.0, 0.5 / 1.7, 0.005) == 29
    assert classes.slots_for_wait(0.0, 0.3, 0.005) == 1
    # Erlang C itself at c = 12, a = 10: the textbook 0.449 (so 12 slots leave 45% of arrivals waiting).
    assert classes.slots_for_wait(10.0, 0.0, 0.45) == 12 and classes.slots_for_wait(10.0, 0.0, 0.449) == 13


def test_reserve_follows_the_interactive_completion_rate() -> None:
    """The holding time is demand / completion rate (Little's law): short answers ending often shrink the room
    kept (they give slots back within the wait); batch ends are not counted (they come in cohorts)."""
    fleet, router = fleet_of({"A": 64}, FLOOR40)
    pool, policy = fleet.pools["m"], router.classes
    a = fleet.upstreams["A"]
    fill(router, fleet, "A", 10, "interactive")
    fill(router, fleet, "A", 20, "batch")
    for t in range(200):  # ~10 in flight, none ending: every arrival must find a free slot
        policy.observe(pool, now=float(t))
    idle = policy.reserve(pool)
    assert idle == pytest.approx(classes.slots_for_wait(policy.demand["m"], 0.0, classes.WAIT_TAIL) - 10)
    for t in range(200, 400):  # every second 6 interactive requests end and 6 start (1.7 s each) ...
        policy.observe(pool, now=float(t) / 4 + 150)
        for _ in range(6 if t % 4 == 0 else 0):
            a.release("interactive", 0)
            a.credit(0, "interactive")
            a.release("batch", 0)  # ... and 6 batch requests: no room counted for them
            a.credit(0, "batch")
    assert policy.done_rate["m"] == pytest.approx(6.0, rel=0.05)
    assert policy.reserve(pool) < idle - 1


def test_a_cold_gateway_keeps_room_for_interactive_until_it_learns_there_is_none() -> None:
    fleet, router = fleet_of({"A": 64}, FLOOR40)
    pool, policy = fleet.pools["m"], router.classes
    assert policy.reserve(pool) >= classes.INITIAL_DEMAND  # before any interactive request was seen
    fill(router, fleet, "A", 32, "batch")  # room left for interactive: 40 - 32 = 8 < the cold reserve
    with pytest.raises(Refusal):
        router.pick(pool, req("batch"))
    for _ in range(200):  # ~30 s of sync ticks without interactive traffic: the prior decays away
        policy.observe(pool)
    assert policy.reserve(pool) < 1.1  # a vanishing estimate needs one slot
    assert router.pick(pool, req("batch")).upstream.name == "A"
