"""Pure cost logic: request prices, live $/1M for hourly servers, pool/fleet blends, budget shares, cost routing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from gateway import cost
from gateway.config import FleetConfig, Prices
from gateway.context import Estimate, RequestContext
from gateway.reliability.outlier import OutlierDetector
from gateway.routing.router import Router
from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.spend import _report, day_id, month_id, next_reset, share
from gateway.state.fleet import Fleet
from tests.state_helpers import hold


def req(prompt_tokens: int, output_tokens: int) -> RequestContext:
    """A request context carrying only what routing reads (the batch class: no speed targets to meet)."""
    return RequestContext("chat", "fleet-model", {}, True, False, "openai", Estimate(prompt_tokens, output_tokens),
                          service_class="batch")

HOSTED = Prices(input_per_1m=0.15, cached_input_per_1m=0.075, output_per_1m=0.6, batch_input_per_1m=0.075, batch_output_per_1m=0.3)


def test_request_cost_hosted_in_micro_dollars_exact():
    # 1000 fresh input * 0.15 + 0 cached + 500 output * 0.6 = 150 + 300 micro-dollars
    assert cost.request_cost_micros(HOSTED, cost.Tokens(1000, 0, 500)) == 450
    # 400 of the 1000 input tokens cached at half price: 600*0.15 + 400*0.075 + 500*0.6 = 90 + 30 + 300
    assert cost.request_cost_micros(HOSTED, cost.Tokens(1000, 400, 500)) == 420
    # batch prices where given
    assert cost.request_cost_micros(HOSTED, cost.Tokens(1000, 0, 500), batch=True) == 75 + 150
    # rounding half-up once per request, with decimal prices (0.15 * 50 = 7.5 -> 8, never 7.499...)
    assert cost.request_cost_micros(HOSTED, cost.Tokens(50, 0, 0)) == 8
    # cached larger than input is clamped; no price = free
    assert cost.request_cost_micros(HOSTED, cost.Tokens(10, 99, 0)) == 1
    assert cost.request_cost_micros(None, cost.Tokens(10, 0, 10)) == 0


def test_cached_defaults_to_input_price_and_batch_to_normal():
    p = Prices(input_per_1m=2, output_per_1m=8)
    assert cost.request_cost_micros(p, cost.Tokens(100, 50, 10)) == 100 * 2 + 10 * 8
    assert cost.request_cost_micros(p, cost.Tokens(100, 0, 10), batch=True) == 100 * 2 + 10 * 8


def test_gpu_per_token_cost_falls_as_throughput_rises():
    p = Prices(gpu_per_hour=2.0, gpus=4)
    assert p.hourly == 8.0
    slow = cost.gpu_usd_per_1m(8.0, 100.0)
    fast = cost.gpu_usd_per_1m(8.0, 1000.0)
    assert slow == pytest.approx(8.0 / 3600 / 100 * 1e6) and fast == pytest.approx(slow / 10)
    assert cost.gpu_usd_per_1m(8.0, 0.0) is None  # idle: no tokens to divide by
    # an hourly server bills output tokens at the live rate; its prompt is inside the hour
    assert cost.request_cost_micros(p, cost.Tokens(1000, 0, 100), live_usd_per_1m=fast) == round(100 * fast)
    assert cost.billing_tok_s(0.0, 40.0) == 40.0 and cost.billing_tok_s(500.0, 40.0) == 500.0


def test_prices_validation():
    with pytest.raises(ValidationError):
        Prices(per_hour=1, gpu_per_hour=1)
    with pytest.raises(ValidationError):
        Prices(input_per_1m=-1)
    with pytest.raises(ValidationError):
        Prices(per_hr=1)  # type: ignore[call-arg]  # unknown field


def test_live_usd_per_1m_and_blends():
    # per token: what requests really cost per output token (input included), else the output price
    assert cost.usd_per_1m_output(HOSTED, 0.0) == pytest.approx(0.6)
    assert cost.usd_per_1m_output(HOSTED, 5.0, spend_micros=450, output_tokens=500) == pytest.approx(0.9)
    hourly = Prices(per_hour=3.6)
    assert cost.usd_per_1m_output(hourly, 1000.0) == pytest.approx(1.0)
    # fleet: an idle hourly server still costs its hour, which makes every delivered token dearer
    busy = (cost.usd_per_second(hourly, 1000.0, 1.0), 1000.0)
    idle = (cost.usd_per_second(hourly, 0.0, None), 0.0)
    assert cost.blended_usd_per_1m([busy]) == pytest.approx(1.0)
    assert cost.blended_usd_per_1m([busy, idle]) == pytest.approx(2.0)
    assert cost.blended_usd_per_1m([idle]) is None


def test_estimate_is_the_dearest_upstream():
    cheap = Prices(input_per_1m=1, output_per_1m=2)
    dear = Prices(input_per_1m=10, output_per_1m=20)
    assert cost.estimate_micros([(cheap, None), (dear, None), (None, None)], 100, 10) == 100 * 10 + 10 * 20


def test_budget_share_adds_up_and_small_headroom_goes_to_rank_0():
    for headroom in (1000, 1001, 7):
        shares = [share(headroom, 3, r, 1) for r in range(3)]
        assert sum(shares) == headroom
    # less than one request per replica: only rank 0 may spend it (all of it), so the fleet can use it
    assert [share(150, 2, r, 100) for r in range(2)] == [150, 0]
    assert share(0, 2, 0, 1) == 0 and share(-5, 1, 0, 1) == 0


def test_periods_and_resets_are_utc():
    t = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    assert day_id(t) == "20261231" and month_id(t) == "202612"
    assert next_reset(t, "day") == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_reset(t, "month") == datetime(2027, 1, 1, tzinfo=UTC)
    mid = datetime(2026, 2, 10, 5, tzinfo=UTC).timestamp()
    assert next_reset(mid, "month") == datetime(2026, 3, 1, tzinfo=UTC)


def test_report_groups_by_day_and_name():
    rows = [
        {b"key|a|usd_micros": b"5", b"key|a|requests": b"1", b"model|m|x|usd_micros": b"5"},
        {},
        {"key|a|usd_micros": "7", "key|b|usd_micros": "1"},
    ]
    r = _report("key", ["20261101", "20261102", "20261103"], rows)
    assert [d["date"] for d in r["days"]] == ["2026-11-01", "2026-11-03"]
    assert r["totals"]["a"]["usd_micros"] == 12 and r["totals"]["a"]["requests"] == 1
    assert r["totals"]["b"]["usd"] == pytest.approx(1e-6)
    m = _report("model", ["20261101"], rows[:1])
    assert m["totals"] == {"m|x": {"usd": 5e-06, "usd_micros": 5, "requests": 0, "input_tokens": 0, "output_tokens": 0}}


def _fleet(prefer: str | None) -> Fleet:
    cfg: FleetConfig = reference_fleet(DEMO_PORTS)
    cfg.models["fleet-model"].prefer = prefer  # type: ignore[assignment]
    return Fleet(cfg, "throughput")


def test_cost_strategy_fills_paid_for_servers_then_cheapest_per_token():
    fleet = _fleet("cost")
    pool = fleet.pools["fleet-model"]
    assert pool.strategy == "cost"
    router = Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=4, queue_timeout=0.3)
    est = req(200, 128)
    d = router.pick(pool, est)
    # hourly GPUs add no spend at the margin; between them the larger throughput gain wins (fast-gpu)
    assert d.strategy == "cost" and d.upstream.name == "fast-gpu"
    assert d.scores["fast-gpu"] == 0.0 and d.scores["slow-gpu"] == 0.0
    # whole micro-dollars, at the batch rates a batch-class request is charged
    assert d.scores["hosted"] == pytest.approx(round(200 * 0.075 + 128 * 0.3) / 128)
    # GPUs full: overflow to the per-token upstream
    for name in ("fast-gpu", "slow-gpu"):
        hold(fleet.upstreams[name], fleet.upstreams[name].cfg.max_concurrency)
    assert router.pick(pool, est).upstream.name == "hosted"


def test_cost_strategy_picks_the_cheaper_per_token_upstream():
    cfg: FleetConfig = reference_fleet(DEMO_PORTS)
    cfg.upstreams["fast-gpu"].price = Prices(input_per_1m=1.0, output_per_1m=4.0)  # a chargeback rate
    cfg.upstreams["slow-gpu"].price = Prices(input_per_1m=0.1, output_per_1m=0.2)
    cfg.upstreams["hosted"].price = Prices(input_per_1m=0.5, output_per_1m=1.0)
    cfg.models["fleet-model"].prefer = "cost"
    fleet = Fleet(cfg, "throughput")
    router = Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=4, queue_timeout=0.3)
    assert router.pick(fleet.pools["fleet-model"], req(200, 128)).upstream.name == "slow-gpu"


def test_busier_gpu_is_cheaper_per_token():
    fleet = _fleet(None)
    fast = fleet.upstreams["fast-gpu"]
    idle = cost.gpu_usd_per_1m(2.5, fast.curve.aggregate(1))
    busy = cost.gpu_usd_per_1m(2.5, fast.curve.aggregate(40))
    assert idle is not None and busy is not None and busy < idle / 10
    assert fast.costs.live_usd_per_1m(1000.0) == pytest.approx(2.5 / 3600 / 1000 * 1e6)  # at a measured 1000 tok/s


def test_prefer_cost_off_keeps_the_configured_strategy():
    assert _fleet(None).pools["fleet-model"].strategy == "throughput"


def test_bench_prices_a_window():
    from gateway.tools.scenarios.cost import price_window

    prices = {"gpu": Prices(per_hour=36.0), "api": Prices(input_per_1m=1, output_per_1m=2), "free": None}
    per_up = {"gpu": {"tok_s": 1000.0, "completed": 10}, "api": {"tok_s": 100.0, "completed": 5},
              "free": {"tok_s": 0.0, "completed": 0}}
    r = price_window(prices, per_up, 10.0, 200)
    assert r["upstreams"]["gpu"]["usd"] == pytest.approx(0.1)  # 36 $/h for 10 s
    assert r["upstreams"]["gpu"]["usd_per_1m_output"] == pytest.approx(10.0)  # 0.1 $ / 10k tokens
    assert r["upstreams"]["api"]["usd"] == pytest.approx((5 * 200 * 1 + 1000 * 2) / 1e6)
    assert r["upstreams"]["free"]["usd_per_1m_output"] is None
    assert r["fleet_usd_per_1m_output"] == pytest.approx((0.1 + 0.003) / 11000 * 1e6, abs=1e-4)  # rounded to 4 places


# ---- per-class cost preference ---------------------------------------------------------------------------------
def _priced(batch_prefer: str | None, pool_prefer: str | None = None, inter_prefer: str | None = None) -> tuple[Fleet, Router]:
    """The reference fleet with per-token prices: fast-gpu dear (a chargeback rate), slow-gpu cheapest, hosted
    between them; the batch class's (and optionally the pool's and interactive's) preference set."""
    from gateway.config import ServiceClass

    cfg: FleetConfig = reference_fleet(DEMO_PORTS)
    cfg.upstreams["fast-gpu"].price = Prices(input_per_1m=1.0, output_per_1m=8.0)
    cfg.upstreams["slow-gpu"].price = Prices(input_per_1m=0.1, output_per_1m=0.2)
    cfg.upstreams["hosted"].price = Prices(input_per_1m=0.5, output_per_1m=1.0)
    m = cfg.models["fleet-model"]
    m.prefer = pool_prefer  # type: ignore[assignment]
    m.classes["batch"] = m.classes["batch"].model_copy(update={"prefer": batch_prefer})
    m.classes["interactive"] = ServiceClass.model_validate({**m.classes["interactive"].model_dump(), "prefer": inter_prefer})
    fleet = Fleet(cfg, "throughput")
    return fleet, Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=4, queue_timeout=0.3)


def _ctx(cls: str) -> RequestContext:
    return RequestContext("chat", "fleet-model", {}, True, False, "openai", Estimate(200, 128), service_class=cls)


def test_batch_class_prefer_cost_picks_the_cheapest_while_interactive_keeps_throughput():
    fleet, router = _priced("cost")
    pool = fleet.pools["fleet-model"]
    assert pool.strategy == "throughput" and pool.strategy_for("batch") == "cost"
    b = router.pick(pool, _ctx("batch"))
    assert (b.strategy, b.upstream.name) == ("cost", "slow-gpu")
    i = router.pick(pool, _ctx("interactive"))
    assert i.strategy == "throughput" and i.upstream.name == "fast-gpu"  # the fastest, not the cheapest
    # the same batch request without the class preference goes where the throughput gain is largest
    fleet2, router2 = _priced(None)
    assert router2.pick(fleet2.pools["fleet-model"], _ctx("batch")).upstream.name == "fast-gpu"


def test_batch_prefer_cost_only_among_upstreams_its_admission_allows():
    """The cheapest upstream runs interactive work at its speed limit: batch admission refuses it, so the cost
    preference picks the cheapest of what is left (hosted), never the refused one."""
    fleet, router = _priced("cost")
    pool = fleet.pools["fleet-model"]
    slow = fleet.upstreams["slow-gpu"]
    slow.curve.b = 0.003  # floor 20 tok/s holds up to n_f = (1/20 - a) / b = 10 < 16 slots
    from gateway.routing.classes import interactive_limit

    limit = interactive_limit(slow, pool.cfg.classes["interactive"])
    assert 0 < limit < slow.cfg.max_concurrency
    for _ in range(limit):
        slow.credit(0, "interactive")
    assert slow.has_slot()  # a free slot by max_concurrency: only class admission keeps batch off it
    d = router.pick(pool, _ctx("batch"))
    assert d.strategy == "cost" and d.upstream.name == "hosted"
    assert "slow-gpu" not in d.scores


def test_batch_prefer_cost_uses_the_batch_price():
    """A batch request is charged the provider's batch rate, so that is what the cost preference compares."""
    fleet, router = _priced("cost")
    fleet.upstreams["fast-gpu"].cfg.price = Prices(input_per_1m=1.0, output_per_1m=8.0, batch_input_per_1m=0.01,
                                                   batch_output_per_1m=0.01)
    d = router.pick(fleet.pools["fleet-model"], _ctx("batch"))
    assert d.upstream.name == "fast-gpu"
    assert d.scores["fast-gpu"] == pytest.approx(round(200 * 0.01 + 128 * 0.01) / 128)


def test_class_prefer_throughput_overrides_a_cost_pool():
    fleet, router = _priced(None, pool_prefer="cost", inter_prefer="throughput")
    pool = fleet.pools["fleet-model"]
    assert router.pick(pool, _ctx("batch")).upstream.name == "slow-gpu"  # the pool's cost strategy
    i = router.pick(pool, _ctx("interactive"))
    assert (i.strategy, i.upstream.name) == ("throughput", "fast-gpu")


def test_class_prefer_in_fleet_yaml():
    raw = {"upstreams": {"u": {"base_url": "http://127.0.0.1:1/v1"}},
           "models": {"m": {"upstreams": ["u"], "classes": {"batch": {"prefer": "cost"}}}}}
    m = FleetConfig.model_validate(raw).models["m"]
    assert m.classes["batch"].prefer == "cost" and m.classes["interactive"].prefer is None
    assert m.classes["batch"].priority == 0  # a class given in YAML replaces the built-in one as a whole
    raw["models"]["m"]["classes"]["batch"]["prefer"] = "cheapest"
    with pytest.raises(ValidationError, match="prefer"):
        FleetConfig.model_validate(raw)


# ---- cost per service class ------------------------------------------------------------------------------------
def test_class_cost_live_window_and_totals():
    from gateway.state.class_cost import ClassCost

    now = [1000.0]
    cc = ClassCost(window_s=60, clock=lambda: now[0])
    assert cc.view() == {}
    cc.add("m", "batch", 300, 100)  # 3 $/1M
    cc.add("m", "interactive", 0, 0)  # charged nothing yet, no output: no $/1M
    now[0] += 30
    cc.add("m", "batch", 100, 100)  # 1 $/1M
    v = cc.view()["m"]
    assert v["batch"]["usd_per_1m_output"] == 2.0 and v["batch"]["window_output_tokens"] == 200
    assert v["batch"]["spend_micros"] == 400 and v["batch"]["spend_usd"] == pytest.approx(4e-4)
    assert v["batch"]["requests"] == 2
    assert v["interactive"]["usd_per_1m_output"] is None
    now[0] += 45  # the first charge left the 60 s window; totals keep it
    v = cc.view()["m"]["batch"]
    assert v["usd_per_1m_output"] == 1.0 and v["window_spend_usd"] == pytest.approx(1e-4)
    assert v["usd_per_1m_output_total"] == 2.0 and v["output_tokens"] == 200
    now[0] += 60
    assert cc.view()["m"]["batch"]["usd_per_1m_output"] is None  # idle: no live figure, totals stay
    assert len(cc._recent[("m", "batch")]) == 0  # buckets are pruned: bounded by the window


def test_charge_request_books_the_class_at_its_rates():
    """spend.charge_request: batch pays the batch rate; both classes land in their pool's class book under the
    pool's name (an alias resolves), and a refund (no tokens) books nothing."""
    from gateway.spend import SpendLedger, charge_request

    cfg: FleetConfig = reference_fleet(DEMO_PORTS)
    fleet = Fleet(cfg, "throughput")
    ledger = SpendLedger(None, "p", "r")
    t = cost.Tokens(1000, 0, 500)
    assert charge_request(fleet, ledger, None, 0, "gpt-4o-mini", "hosted", t, service_class="batch") == 75 + 150
    assert charge_request(fleet, ledger, None, 0, "fleet-model", "hosted", t, service_class="interactive") == 150 + 300
    assert charge_request(fleet, ledger, None, 0, "fleet-model", None, cost.Tokens(), service_class="batch") == 0
    v = fleet.cost_view()["classes"]["fleet-model"]
    assert (v["batch"]["spend_micros"], v["batch"]["requests"], v["batch"]["usd_per_1m_output"]) == (225, 1, 0.45)
    assert (v["interactive"]["spend_micros"], v["interactive"]["usd_per_1m_output"]) == (450, 0.9)


def test_class_cost_bench_prices_each_request_where_it_was_served():
    from gateway.sim.reference import REFERENCE_SIMS
    from gateway.tools.scenarios.classes import Rec
    from gateway.tools.scenarios.cost import class_cost_fleet, class_usd_per_1m

    recs = [Rec("batch", 0.0, 0.1, 5.0, 100, True, "hosted"), Rec("batch", 0.0, 0.1, 6.0, 100, True, "fast-gpu"),
            Rec("batch", 0.0, 0.1, 99.0, 100, True, "fast-gpu"),  # ended after the window: not counted
            Rec("interactive", 0.0, 0.1, 5.0, 10, True, "slow-gpu")]
    b = class_usd_per_1m(recs, "batch", 200, 2.0, 30.0)
    # hosted at its batch rates (0.075 in, 0.3 out), fast-gpu at 1 in, 4 out; whole micro-dollars per request
    assert b["output_tokens"] == 200 and b["usd"] == pytest.approx((round(15 + 30) + (200 + 400)) / 1e6)
    assert b["usd_per_1m_output"] == pytest.approx(645 / 200) and b["tokens_by_upstream"] == {"fast-gpu": 100, "hosted": 100}
    assert class_usd_per_1m(recs, "interactive", 200, 2.0, 30.0)["usd_per_1m_output"] == pytest.approx(23 / 10)
    cfg = FleetConfig.model_validate(class_cost_fleet(DEMO_PORTS, REFERENCE_SIMS, "cost"))
    batch = cfg.models["fleet-model"].classes["batch"]
    assert batch.prefer == "cost" and batch.priority == 10 and batch.max_wait_s == 300.0  # built-in batch kept
    assert cfg.upstreams["slow-gpu"].price is not None and cfg.upstreams["slow-gpu"].price.output_per_1m == 0.3
