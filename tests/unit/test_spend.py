"""The spend ledger's in-memory logic (no Redis: the process is the fleet) and the key record's checks."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from gateway.auth import ApiKey
from gateway.errors import GatewayError
from gateway.spend import SpendLedger

T0 = datetime(2026, 11, 29, 12, tzinfo=UTC).timestamp()


def ledger(replicas: int = 1, rank: int = 0) -> tuple[SpendLedger, list[float]]:
    now = [T0]
    return SpendLedger(None, "t", "r1", fleet_rank=lambda: (replicas, rank), clock=lambda: now[0], key_ids=lambda: ["k"]), now


def test_reserve_charge_and_stop_within_one_request():
    led, _ = ledger()
    budget = (10_000, None)
    spent = 0
    for _ in range(20):
        try:
            r = led.admit("k", "team", budget, 3_000)
        except GatewayError as e:
            assert e.status == 429 and e.code == "insufficient_quota" and "2026-11-30 00:00 UTC" in e.message
            break
        led.charge("k", r, 2_900, "m", "up", (10, 7))
        spent += 2_900
        asyncio.run(led.sync())
    assert 10_000 - 3_000 <= spent <= 10_000
    assert led.spent("k")[0] == pytest.approx(spent / 1e6)


def test_running_requests_hold_the_share_with_a_retryable_429():
    led, _ = ledger(2, 0)  # this replica's share: 5_000 of 10_000
    r1 = led.admit("k", "team", (10_000, None), 4_000)
    with pytest.raises(GatewayError) as e:
        led.admit("k", "team", (10_000, None), 4_000)
    assert e.value.code == "rate_limit_exceeded" and e.value.retry_after == 1.0
    led.charge("k", r1, 0, "m", None, (0, 0))  # never reached an upstream: refunded
    assert led.admit("k", "team", (10_000, None), 4_000) == 4_000
    # too little left for the request at all: the budget is used
    led2, _ = ledger()
    led2.admit("k", "team", (10_000, None), 8_000)
    with pytest.raises(GatewayError) as e:
        led2.admit("k", "team", (10_000, None), 4_000)
    assert e.value.code == "insufficient_quota"


def test_two_replicas_split_the_headroom():
    a, _ = ledger(2, 0)
    b, _ = ledger(2, 1)
    ok = {"a": 0, "b": 0}
    for name, led in (("a", a), ("b", b)):
        for _ in range(10):
            try:
                led.charge("k", led.admit("k", "t", (None, 10_000), 1_000), 1_000, "m", "u", (1, 1))
                ok[name] += 1
            except GatewayError:
                break
    assert ok == {"a": 5, "b": 5}  # each its half, together the whole budget, never more


def test_budget_resets_next_period_and_month_budget_counts_too():
    led, now = ledger()
    led.charge("k", led.admit("k", "t", (5_000, 6_000), 5_000), 5_000, "m", "u", (1, 1))
    asyncio.run(led.sync())
    with pytest.raises(GatewayError):
        led.admit("k", "t", (5_000, 6_000), 1_000)
    now[0] += 86400  # next day: the daily budget is fresh, the monthly one still has 1_000 left
    led.charge("k", led.admit("k", "t", (5_000, 6_000), 1_000), 1_000, "m", "u", (1, 1))
    asyncio.run(led.sync())
    with pytest.raises(GatewayError) as e:
        led.admit("k", "t", (5_000, 6_000), 1_000)
    assert "monthly" in e.value.message and "2026-12-01 00:00 UTC" in e.value.message


def test_no_budget_is_never_refused_but_still_counted():
    led, _ = ledger()
    assert led.admit("k", "t", (None, None), 10**9) == 0
    led.charge("k", 0, 123, "m", "u", (1, 1))
    assert led.spent("k") == (pytest.approx(123e-6), pytest.approx(123e-6))


def test_key_access_checks_and_rate_headers():
    k = ApiKey("d" * 64, "id1", "team", "sk-gw-abcd", rpm=60, tpm=1000, models=["m"], expires_at=time.time() + 60)
    k.check_access("m", "m", time.time())
    k.check_access("alias-of-m", "m", time.time())  # an alias resolves to an allowed pool
    with pytest.raises(GatewayError) as e:
        k.check_access("other", "other", time.time())
    assert e.value.status == 403 and e.value.code == "model_not_allowed"
    with pytest.raises(GatewayError) as e:
        k.check_access("m", "m", time.time() + 120)
    assert e.value.status == 401 and e.value.code == "key_expired"
    now = float(int(time.time())) + 0.9995  # the window's oldest second frees in 59.0005 s: "60s", never "59s"
    k.admit(100, 2, now)
    h = k.rate_headers(2, now)
    assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-remaining-requests"] == "29"
    assert h["x-ratelimit-limit-tokens"] == "1000" and h["x-ratelimit-remaining-tokens"] == "400"
    assert h["x-ratelimit-reset-requests"] == "60s"
    assert ApiKey("d" * 64, "id2", "n", "p").rate_headers(1) == {}


def test_key_record_round_trips_new_fields():
    k = ApiKey("d" * 64, "id1", "team", "sk-gw-abcd", budget_usd_day=0.05, models=["m"], expires_at=5.0, metadata={"owner": "ana"})
    back = ApiKey.from_json("d" * 64, k.to_json())
    assert (back.budget_usd_day, back.models, back.expires_at, back.metadata) == (0.05, ["m"], 5.0, {"owner": "ana"})
    assert back.budgets_micros() == (50_000, None)
    assert "digest" not in k.public() and k.public()["prefix"] == "sk-gw-abcd..."
