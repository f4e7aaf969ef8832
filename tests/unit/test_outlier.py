"""Outlier detection on in-memory state (no I/O, no sleeps): episodes, backoff, success rate, ejection cap."""

from __future__ import annotations

import time

from gateway.config import UpstreamConfig
from gateway.reliability.outlier import OutlierDetector
from gateway.state.stats import UpstreamStats


def ups(*names: str) -> list[UpstreamStats]:
    return [UpstreamStats(UpstreamConfig(name=n, base_url=f"http://127.0.0.1:1/{n}")) for n in names]


def detector(after: int = 5, pools: list[list[str]] | None = None, **kw) -> OutlierDetector:
    return OutlierDetector(after, 5.0, 60.0, pools=pools or [], **kw)


def sequential_failures(det: OutlierDetector, u: UpstreamStats, n: int) -> None:
    for _ in range(n):
        det.failure(u, time.monotonic())  # each attempt starts after the previous one failed


def test_concurrent_failures_from_one_crash_are_one_event():
    det = detector(after=3)
    (u,) = ups("u")
    started = [time.monotonic() for _ in range(50)]  # 50 requests in flight when it crashes
    for t in started:
        det.failure(u, t)
    assert det.state(u).consecutive == 1
    assert not det.is_ejected(u, time.time())
    sequential_failures(det, u, 2)  # two later attempts fail too: now it is a pattern
    assert det.is_ejected(u, time.time()) and det.ejections(u) == 1


def test_backoff_does_not_grow_with_in_flight_count():
    det = detector(after=2)
    (u,) = ups("u")
    in_flight = [time.monotonic() for _ in range(64)]
    sequential_failures(det, u, 2)
    until = det.ejected_until(u)
    assert 4.0 < until - time.time() <= 5.0
    for t in in_flight:  # the rest of the crash's victims report after the ejection
        det.failure(u, t)
    assert det.ejected_until(u) == until and det.ejections(u) == 1


def test_half_open_probe_failure_doubles_and_success_resets_the_streak():
    det = detector(after=2)
    (u,) = ups("u")
    sequential_failures(det, u, 2)
    st = det.state(u)
    st.ejected_until = time.time() - 0.01  # backoff over: half-open
    assert det.available(u, time.time())
    det.dispatched(u)
    assert not det.available(u, time.time())  # one probe at a time
    det.failure(u, time.monotonic())
    assert st.ejections == 2 and 9.0 < st.ejected_until - time.time() <= 10.0
    st.ejected_until = time.time() - 0.01
    det.dispatched(u)
    det.success(u, time.monotonic())
    assert not st.half_open and st.streak == 0 and det.available(u, time.time())
    assert det.success_probability(u) == 1.0  # the failures before the ejection are forgotten
    sequential_failures(det, u, 2)
    assert 4.0 < st.ejected_until - time.time() <= 5.0  # a new episode starts at the base backoff


def test_stale_success_does_not_close_the_breaker():
    det = detector(after=2)
    (u,) = ups("u")
    old = time.monotonic()
    sequential_failures(det, u, 2)
    det.state(u).ejected_until = time.time() - 0.01
    det.success(u, old)  # a request that started before the ejection finished late
    assert det.state(u).half_open


def test_success_rate_outlier_is_ejected_without_consecutive_failures():
    det = detector(after=5, pools=[["a", "b", "c"]], min_requests=20)
    a, b, c = ups("a", "b", "c")
    for _ in range(30):
        det.success(a, time.monotonic())
        det.success(b, time.monotonic())
    for i in range(40):  # fails every other request: never 5 in a row, but half of everything
        if det.is_ejected(c, time.time()):
            break
        if i % 2:
            det.failure(c, time.monotonic())
        else:
            det.success(c, time.monotonic())
    assert det.is_ejected(c, time.time()) and det.ejections(c) == 1


def test_moderate_error_rate_is_not_ejected_but_lowers_success_probability():
    det = detector(after=5, pools=[["a", "b"]], min_requests=20)
    a, b = ups("a", "b")
    for _ in range(60):
        det.success(a, time.monotonic())
    for i in range(100):
        if i % 10 < 3:
            det.failure(b, time.monotonic())
        else:
            det.success(b, time.monotonic())
    assert not det.is_ejected(b, time.time())
    assert 0.65 < det.success_probability(b) < 0.78
    assert det.success_probability(a) == 1.0


def test_max_ejection_percent_caps_a_pool():
    det = detector(after=1, pools=[["a", "b", "c", "d"]], max_ejection_percent=50)
    a, b, c, d = ups("a", "b", "c", "d")
    for u in (a, b, c):
        sequential_failures(det, u, 1)
    assert [det.is_ejected(u, time.time()) for u in (a, b, c, d)] == [True, True, False, False]
    one = detector(after=1, pools=[["a", "b"]], max_ejection_percent=10)
    sequential_failures(one, a, 1)
    sequential_failures(one, b, 1)
    assert one.is_ejected(a, time.time()) and not one.is_ejected(b, time.time())  # at least one may always go


def test_active_probe_recovery_goes_half_open_and_failed_check_re_ejects():
    det = detector(after=1)
    (u,) = ups("u")
    sequential_failures(det, u, 1)
    det.check_failed(u)  # still down: an ejected upstream stays ejected, its backoff does not grow
    assert det.ejections(u) == 1
    det.check_recovered(u)  # it answers again: half-open now, not after the 5 s backoff
    assert not det.is_ejected(u, time.time()) and det.available(u, time.time())
    det.check_failed(u)  # down again before any request went: back out without sending one
    assert det.is_ejected(u, time.time()) and det.ejections(u) == 2


def test_suspect_means_worth_a_cheap_probe():
    det = detector(after=5)
    u, v = ups("u", "v")
    det.success(u, time.monotonic())
    assert not det.suspect(u) and not det.suspect(v)
    det.failure(u, time.monotonic())  # one failure: confirm with a GET rather than with more requests
    assert det.suspect(u)
    det.check_failed(u)  # the GET fails too: it is down
    assert det.is_ejected(u, time.time()) and det.suspect(u)
