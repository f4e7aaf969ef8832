"""state/rate.py: the one sliding window and limit check behind upstream RPM/TPM and gateway-key limits."""

from __future__ import annotations

from gateway.auth import KEY_TOK, ApiKey
from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.state.fleet import Fleet
from gateway.state.rate import WINDOW_S, Window, even_share, exceeded, headroom_share, static_share


def test_static_shares_add_up_to_the_limit_and_the_remainder_goes_to_low_ranks():
    for limit in (0, 1, 2, 7, 100, 101):
        for n in (1, 2, 3, 7):
            parts = [static_share(limit, n, r) for r in range(n)]
            assert sum(parts) == limit and max(parts) - min(parts) <= 1 and parts == sorted(parts, reverse=True)


def test_headroom_share_splits_what_is_left_and_nothing_when_used_up():
    assert [headroom_share(10, 6, 3, r) for r in range(3)] == [2, 1, 1]
    assert headroom_share(10, 10, 3, 0) == 0 and headroom_share(10, 12, 1, 0) == 0
    assert even_share(1, 3) == 1.0 and even_share(300, 3) == 100.0  # a key is usable on every replica


def test_exceeded_names_the_limit_a_request_would_break():
    class Lim:
        rpm: int | None = 10
        tpm: int | None = 1000

    assert exceeded(Lim(), 9, 10, 0, 1000, 1000) is None
    assert exceeded(Lim(), 10, 10, 0, 1000, 1) == "requests"
    assert exceeded(Lim(), 0, 10, 900, 1000, 101) == "tokens"
    Lim.rpm = None
    assert exceeded(Lim(), 10**6, 0, 0, 1000, 1) is None  # no RPM limit: never "requests"


def test_window_frees_in_counts_from_the_oldest_second_and_refund_lapses_with_its_second():
    w = Window(2)
    w.add(100, 0, 5)
    w.add(130, 0, 5)
    assert w.frees_in(0, used=10, fits=6, now=140.0) == 100 + WINDOW_S - 140  # the first second frees enough
    assert w.frees_in(0, used=10, fits=0, now=140.0) == 130 + WINDOW_S - 140
    assert w.refund(130, 1, 3) and w.buckets[130][1] == 0  # never below zero
    w.prune(101)
    assert not w.refund(100, 0, 1) and w.oldest() == 130


def test_keys_and_upstreams_count_in_the_same_window_type():
    k = ApiKey("d", "id", "team", "sk-gw-x", rpm=None, tpm=1000)
    sec = k.admit(400, 1, now=1_000_000.0)
    assert isinstance(k.usage, Window) and k.usage.buckets[sec][KEY_TOK] == 400
    u = Fleet(reference_fleet(DEMO_PORTS), "throughput").upstreams["hosted"]
    assert isinstance(u.rates.mine, Window) and isinstance(u.rates.others, Window)


def test_endpoint_load_stays_the_sum_of_its_parts_through_every_writer():
    u = Fleet(reference_fleet(DEMO_PORTS), "throughput").upstreams["fast-gpu"]
    u.credit(100, "interactive", 50)
    u.credit(100, "batch", 50)
    u.set_remote_inflight(3)
    u.set_external_load(1.5)
    assert u.load == 2 + 3 + 1.5 and u.inflight == 5 and u.class_inflight("batch") == 1
    u.release("batch", 50)
    u.set_external_load(0.0)
    assert u.load == 1 + 3 and u.endpoint.kv_local == 50
    area, _ = u.load_area()
    assert area > 0  # the integral saw the load while it was held


def test_operator_setters_report_changes_and_a_cooldown_only_extends():
    u = Fleet(reference_fleet(DEMO_PORTS), "throughput").upstreams["hosted"]
    assert u.set_cooldown(100.0) and not u.set_cooldown(50.0) and u.cooldown_until == 100.0
    assert u.set_weight(0.0) and not u.set_weight(0.0) and u.state(0.0) == "draining"
    u.set_membership(3, 2)
    assert (u.replicas, u.rank) == (3, 2) and u.rates.member is u.endpoint.member
