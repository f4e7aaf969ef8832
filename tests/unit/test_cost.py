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
    assert d.scores["hosted"] == pytest.approx(round(200 * 0.15 + 128 * 0.6) / 128)  # whole micro-dollars
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
