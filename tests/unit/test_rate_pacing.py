"""Rate-limit admission from the limits themselves (sliding window, pacing, TPM charge and settlement), no
head-of-line blocking by a request the limits cannot take yet, and the pool's expected output lengths."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.config import FleetConfig
from gateway.context import Estimate, RequestContext
from gateway.reliability.outlier import OutlierDetector
from gateway.routing.router import RATE_PASS_S, Refusal, Router
from gateway.state.fleet import Fleet
from gateway.state.lengths import BAND_MIN_OBSERVED, LONGEST_S, MIN_OBSERVED, Lengths, OutputLengths
from gateway.state.stats import UpstreamStats
from gateway.state.upstream_rates import ADM, REQ


def hosted_fleet(**limits) -> tuple[Fleet, Router, UpstreamStats]:
    cfg = FleetConfig.model_validate({
        "upstreams": {"h": {"base_url": "http://127.0.0.1:1", "kind": "hosted", "max_concurrency": 500, **limits}},
        "models": {"m": {"upstreams": ["h"]}},
    })
    fleet = Fleet(cfg, "throughput")
    return fleet, Router(fleet, OutlierDetector(3, 1.0, 10.0), queue_max=16, queue_timeout=2.0), fleet.upstreams["h"]


def req(prompt: int, output: int, max_tokens: int | None = None) -> RequestContext:
    est = Estimate(prompt, output, "chat", max_tokens)
    return RequestContext("chat", "m", {}, True, False, "openai", est, service_class="interactive")


def fill(router: Router, fleet: Fleet, ctx: RequestContext, limit: int = 1000) -> int:
    n = 0
    try:
        for _ in range(limit):
            router._dispatch(router.pick(fleet.pools["m"], ctx), ctx)
            n += 1
    except Refusal as r:
        assert r.kind == "rate_limited"
    return n


def test_sliding_window_counts_requests_started_in_the_last_minute():
    fleet, router, h = hosted_fleet(rpm=600)  # pacing bucket: 20 requests
    now = time.time()
    sec = int(now)
    h.rates.others.add(sec - 30, REQ, 590)  # the other replicas started 590 requests 30 s ago: 10 left this minute
    h.rates.others.add(sec - 70, REQ, 500)  # out of the window: does not count
    h.refresh(now)
    assert fill(router, fleet, req(100, 50)) == 10


def test_paced_in_is_the_time_until_the_buckets_hold_the_request_or_never_within_the_window():
    """600 RPM refills a request unit every 0.1 s; 6000 TPM 100 tokens a second (bucket: 8 of the 150-token
    requests charged, 1200 tokens, more than 2 s = 200). Once the minute's share is spent, only requests leaving the
    window free it: no short wait to promise (inf)."""
    fleet, router, h = hosted_fleet(rpm=600)
    h.refresh(time.time())
    fill(router, fleet, req(100, 50))  # the bucket's 20 requests
    assert h.rates.paced_in(150) == pytest.approx(0.1, abs=0.01)
    assert h.rates.paced_in(150, ahead=2) == pytest.approx(0.3, abs=0.01)  # after two others
    fleet, router, h = hosted_fleet(tpm=6000)
    h.refresh(time.time())
    fill(router, fleet, req(100, 50))
    assert h.rates.paced_in(150) == pytest.approx((150 - h.rates._pace_tok) * 60 / 6000, abs=0.02)
    assert h.rates.paced_in(400) == pytest.approx((400 - h.rates._pace_tok) * 60 / 6000, abs=0.02)
    assert h.rates.paced_in(1500) == pytest.approx((1200 - h.rates._pace_tok) * 60 / 6000, abs=0.02)  # a full bucket
    fleet, router, h = hosted_fleet(rpm=6)
    h.refresh(time.time())
    assert fill(router, fleet, req(100, 50)) == 6
    assert h.rates.paced_in(150) == float("inf")


def test_pacing_refills_at_the_limits_rate_and_ignores_request_length():
    """A burst takes the bucket (2 s of the limit), then requests start at the limit's own rate (10/s for 600
    RPM), whatever their length: no cap from the admitted request's duration."""
    for output in (5, 500):
        fleet, router, h = hosted_fleet(rpm=600)
        h.refresh(time.time())
        assert fill(router, fleet, req(100, output)) == 20
        h.rates._pace_at -= 1.5  # 1.5 s later
        assert fill(router, fleet, req(100, output)) == 15


def test_tpm_reserved_charges_max_tokens_and_usage_charges_expected_output_then_settles():
    _, _, h = hosted_fleet(tpm=100_000)
    loose = req(1000, 300, max_tokens=4000)  # expected 300 of a loose 4000
    assert h.tpm_charge(loose.est) == 5000
    assert h.tpm_charge(req(1000, 300).est) == 1300  # no max_tokens: expected output
    fleet, router, u = hosted_fleet(tpm=100_000, tpm_counts="usage")
    assert u.tpm_charge(loose.est) == 1300
    u.refresh(time.time())
    router._dispatch(router.pick(fleet.pools["m"], loose), loose)
    sec, charged = loose.extras["tpm_charge"]
    assert charged == 1300 and u.rates.mine.buckets[sec][ADM] == 1300
    bucket = u.rates._pace_tok
    u.settle_tokens(sec, charged, 1000 + 900)  # it ran longer than expected
    assert u.rates.mine.buckets[sec][ADM] == 1900 and u.rates.tok_since_refresh == 1900 and sec in u.rates.dirty
    assert u.rates._pace_tok == bucket - 600
    h.settle_tokens(sec, 5000, 1300)  # a reserving provider keeps its charge
    assert h.window_sum(ADM) == 0


def test_tpm_admits_on_expected_output_so_loose_max_tokens_do_not_underfill():
    """tpm 60,000: the pacing bucket holds 2,000 tokens. Charged by expected output (600 tokens) three requests
    start; charged by the loose max_tokens (4,500) only one (a full bucket takes any size, then it is in debt)."""
    counts = []
    for counts_by in ("usage", "reserved"):
        fleet, router, u = hosted_fleet(tpm=60_000, tpm_counts=counts_by)
        u.refresh(time.time())
        counts.append(fill(router, fleet, req(500, 100, max_tokens=4000)))
    assert counts == [3, 1]


async def test_a_request_the_tpm_cannot_take_yet_does_not_block_smaller_ones():
    fleet, router, u = hosted_fleet(tpm=6000, rpm=None)
    u.refresh(time.time())
    u.credit(3000, "interactive")  # 3000 of 6000 used
    u.release("interactive")
    big, small = req(100, 3900), req(100, 400)
    waiting = asyncio.create_task(router.admit(fleet.pools["m"], big))
    await asyncio.sleep(0.01)
    assert router.queue_depth()["m"] == 1
    d = await asyncio.wait_for(router.admit(fleet.pools["m"], small), 0.5)  # fits: not queued behind `big`
    assert d.upstream is u and d.queue_wait == 0.0
    waiting.cancel()


async def test_a_rate_refused_request_holds_the_line_after_its_grace():
    fleet, router, u = hosted_fleet(tpm=6000, rpm=None)
    u.refresh(time.time())
    u.credit(3000, "interactive")
    u.release("interactive")
    big = req(100, 3900)
    waiting = asyncio.create_task(router.admit(fleet.pools["m"], big))
    await asyncio.sleep(0.01)
    w = router._queues["m"][0]
    w.since -= RATE_PASS_S  # it has waited its grace: now later requests queue behind it so it cannot starve
    small = asyncio.create_task(router.admit(fleet.pools["m"], req(100, 400)))
    await asyncio.sleep(0.01)
    assert router.queue_depth()["m"] == 2
    waiting.cancel()
    small.cancel()
    await asyncio.gather(waiting, small, return_exceptions=True)


def test_expected_output_from_the_pools_observed_lengths():
    lengths = OutputLengths()
    assert lengths.expected(None, 256) == 256 and lengths.expected(1000, 256) == 1000  # no history yet
    for x in [100] * MIN_OBSERVED + [900] * MIN_OBSERVED:
        lengths.observe(x)
    assert lengths.expected(None, 256) == 500
    assert lengths.expected(4000, 256) == 500  # a loose limit: the distribution decides
    assert lengths.expected(300, 256) == 200  # E[min(X, 300)] = (100 + 300) / 2
    assert lengths.expected(50, 256) == 50


def test_lengths_subscriber_refines_the_estimate_and_learns_from_finished_requests():
    fleet, _, _ = hosted_fleet(rpm=100)
    sub = Lengths(fleet)
    for _ in range(MIN_OBSERVED):
        done = req(10, 1, max_tokens=2048)
        done.usage.output_tokens = 120
        sub.request_end(done, None)
    failed = req(10, 1)
    failed.usage.output_tokens = 5000
    sub.request_end(failed, RuntimeError("upstream failed"))  # not a length the pool produces
    new = req(10, 2048, max_tokens=2048)
    sub.request_start(new)
    assert new.est.output_tokens == 120 and new.est.max_tokens == 2048


@pytest.mark.parametrize("replicas", [1, 3])
def test_paced_shares_of_replicas_add_up_to_the_limits_rate(replicas: int):
    """Each replica refills at its share of the rate: together, 1.5 s after their buckets ran dry, 15 requests."""
    total = 0
    for rank in range(replicas):
        fleet, router, h = hosted_fleet(rpm=600)
        h.set_membership(replicas, rank)
        h.refresh(time.time())
        fill(router, fleet, req(100, 50))
        h.rates._pace_at -= 1.5
        total += fill(router, fleet, req(100, 50))
    assert total == 15


def test_a_request_leaves_the_window_only_after_the_provider_could_have_dropped_it():
    """Bucket s may hold a request the provider received at s + 0.999 (+ skew): it still counts at s + 61.2 and
    no longer at s + 61.6, so a new request cannot meet a slot the provider still holds (a 429)."""
    _, _, h = hosted_fleet(rpm=120)
    s = 1_000_000
    h.rates.others.add(s, REQ, 120)
    h.refresh(s + 61.2)
    assert h.rates.used_req_60 == 120 and not h.rate_allows(1)
    h.refresh(s + 61.6)
    assert h.rates.used_req_60 == 0 and h.rate_allows(1)



def test_expected_output_from_the_requests_own_max_tokens_band():
    """Short answers are the many: pooled, a request allowed 1024 tokens would be expected at about the pool's
    mean. Its own band (max_tokens in (512, 1024]) says it produces ~1024, once that band has enough outputs."""
    lengths = OutputLengths()
    for _ in range(4 * MIN_OBSERVED):
        lengths.observe(16, max_tokens=16)
    for _ in range(BAND_MIN_OBSERVED - 1):
        lengths.observe(1000, max_tokens=1024)
    # Too few outputs of requests allowed as much: the 16-token answers (cut at 16) say nothing; its own limit.
    assert lengths.expected(1024, 256) == 1024
    lengths.observe(1000, max_tokens=1000)  # same band: (512, 1024]
    assert lengths.expected(1024, 256) == 1000
    assert lengths.expected(16, 256) == 16
    assert lengths.expected(300, 256) == 300  # band (256, 512] empty: the freer requests' E[min(X, 300)]
    assert lengths.expected(2048, 256) == 2048  # nothing as free as it yet


def test_long_requests_are_judged_among_those_arriving_not_those_finishing():
    """Finished outputs over-represent short requests (a long one is still running): quantiles are taken over the
    expected outputs of the requests routed lately."""
    lengths = OutputLengths()
    for _ in range(4 * MIN_OBSERVED):
        lengths.observe(16, max_tokens=16)
    assert lengths.quantile(0.9, 256) == 256  # nothing arrived yet: the default
    for x in [16] * 80 + [1024] * 20:
        lengths.arrived(x)
    assert lengths.quantile(0.9, 256) == 1024 and lengths.quantile(0.5, 256) == 16


def test_long_requests_are_judged_among_the_arrivals_of_the_budgets_minute():
    """A client's long answers arrive one answer apart: among the last few hundred arrivals of a busy pool they can
    be missing (512 at 40/s are 13 s, shorter than a 1024-token answer), and the threshold fell to the next-shorter
    class. The quantiles are over the arrivals of the last LONGEST_S (the RPM window), whatever their number."""
    lengths = OutputLengths()
    for i in range(8):
        lengths.arrived(1024, now=i / 100)
    for i in range(40 * 15):  # 15 s of 16-token answers at 40/s, and a few 256-token ones
        lengths.arrived(256 if i % 40 == 0 else 16, now=0.1 + i / 40)
    assert lengths.quantile(0.99, 128) == 1024  # 8 of 608 arrivals: the longest 1.3%
    assert lengths.quantile(0.97, 128) == 256
    for i in range(40 * 50):  # the minute passes: the 1024-token ones left it
        lengths.arrived(16, now=15.1 + i / 40)
    assert lengths.quantile(0.999, 128) == 256


def test_max_tokens_bands_are_powers_of_two():
    from gateway.state.lengths import band

    assert band(None) == 0
    assert band(1) == band(2) == 1
    assert band(3) == band(4) == 2
    assert band(513) == band(1024) == 10 != band(1025)


def test_the_tpm_bucket_holds_eight_of_the_largest_requests_of_the_minute():
    """100k TPM: 2 s of it (3,333 tokens) hold two 1,224-token requests; a group of long answers arriving together
    started two at once and one every 0.73 s after. The bucket holds PACE_BURST of the largest requests charged
    in the last minute (as the RPM bucket holds PACE_BURST requests), and shrinks back when they leave it."""
    fleet, router, h = hosted_fleet(tpm=100_000)
    h.refresh(time.time())
    assert h.rate_allows(1224) and h.rates._pace_tok == pytest.approx(3333, abs=1)  # nothing charged yet: 2 s
    assert fill(router, fleet, req(200, 1024, max_tokens=1024)) == 2
    h.rates._pace_at -= 10.0  # 10 s later: refilled up to 8 x 1,224 tokens, not 2 s
    assert fill(router, fleet, req(200, 1024, max_tokens=1024)) == 8
    h.rates._largest.max(time.monotonic() + 61.0, 1)  # a minute later the large requests left the window
    h.rates._pace_at -= 10.0
    assert h.rate_allows(1) and h.rates._pace_tok == pytest.approx(3333, abs=1)


def test_the_longest_arriving_answer_is_remembered_for_a_minute():
    """Long answers may come in groups, each one's answer apart: the longest is remembered by time, not by count."""
    lengths = OutputLengths()
    assert lengths.longest(128, now=0.0) == 128  # nothing arrived yet: the default
    lengths.arrived(1024, now=0.0)
    for i in range(2 * 512):  # far more short arrivals than the quantiles keep
        lengths.arrived(16, now=i / 100)
    assert lengths.longest(128, now=20.0) == 1024
    lengths.arrived(256, now=30.0)
    assert lengths.longest(128, now=LONGEST_S + 1) == 256  # the 1024-token one left the minute
    assert lengths.longest(128, now=30.0 + LONGEST_S + 1) == 128
