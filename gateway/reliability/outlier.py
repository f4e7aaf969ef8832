"""Outlier detection in the manner of Envoy: the detector owns every upstream's ejection state.

Passive, per attempt (the proxy reports each outcome with the attempt's start time):

- Consecutive failures are counted per *episode*. A failure only adds to the count when its attempt started after
  the first failure of the episode (or after the last ejection): requests that were already in flight when an
  upstream crashed all fail together, and that is one event, not N. So the backoff no longer grows with the
  number of requests that happened to be in flight, while attempts sent after the first failure still count.
- `after_failures` counted failures eject the upstream for base * 2^(streak-1) seconds (capped), where `streak`
  is the number of ejections since it last served a request successfully: a flapping upstream backs off, one
  that recovered starts again at `base`.
- Success-rate ejection: over a decaying window (`window` seconds) an upstream whose success rate is below
  `success_rate_ratio` times that of the other upstreams of its pools (each with at least `min_requests`) is an
  outlier even if its failures never come in a row.
- No more than `max_ejection_percent` of a pool is ejected at once (at least one upstream may always be):
  ejecting the whole pool turns partial failure into total failure.
- When the ejection time has passed the upstream is half-open: exactly one request (the probe) may go, and its
  outcome closes or re-opens the breaker.

The same decaying counts give the router each upstream's success probability (error-aware routing).

Active (HealthChecker): a cheap GET of the engine's metrics_url, or base_url + "/models". With `probe_interval`
(on by default) only suspect upstreams are checked (ejected, half-open, or failed recently): a failing check
ejects (it is unreachable: it crashed), and an upstream whose check failed and then passes again (it restarted)
goes half-open at once, without waiting for its backoff, so it is back within about one probe interval of
being healthy. With `interval` > 0 every upstream is
checked and a failing check ejects it without any traffic. A passing check alone never closes the breaker:
serving /models is not proof that completions work, so the half-open probe request decides.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from gateway.periodic import Periodic
from gateway.state.stats import UpstreamStats
from gateway.upstream import provider_for

log = logging.getLogger("gateway.reliability.outlier")

#: Pseudo-successes added to the observed counts: one failure of a quiet upstream is weak evidence.
PRIOR_SUCCESSES = 5.0


@dataclass(slots=True)
class OutlierState:
    """One upstream's breaker, as seen by this replica (ejection is local: every replica sees its own failures)."""

    consecutive: int = 0  # counted failures in the current episode
    mark: float = 0.0  # monotonic: attempts started before this (episode start, ejection) are part of that event
    ejected_until: float = 0.0  # wall clock
    half_open: bool = False  # ejected earlier and not yet proven healthy by a successful request
    probing: bool = False  # the half-open probe is in flight
    streak: int = 0  # ejections since the last successful request (backoff exponent)
    ejections: int = 0
    ok: float = 0.0  # decaying counts of attempt outcomes (success-rate ejection, error-aware routing)
    fail: float = 0.0
    at: float = 0.0  # monotonic time the counts were last decayed to
    fresh: float = 0.0  # monotonic: counts restarted here (ejection, recovery); older attempts are not counted
    capped_log_at: float = -1e9  # monotonic: last "not ejecting: cap reached" line (one per window)


class OutlierDetector:
    def __init__(
        self,
        after_failures: int,
        base_seconds: float,
        max_seconds: float,
        on_eject: Callable[[str], None] | None = None,
        *,
        max_ejection_percent: float = 50.0,
        success_rate_ratio: float = 0.6,
        min_requests: int = 20,
        window: float = 10.0,
        pools: Iterable[Iterable[str]] = (),
    ) -> None:
        self.after = max(1, after_failures)
        self.base = base_seconds
        self.max = max_seconds
        self.on_eject = on_eject
        self.max_percent = max_ejection_percent
        self.ratio = success_rate_ratio
        self.min_requests = min_requests
        self.window = window
        self._states: dict[str, OutlierState] = {}
        self._peers: dict[str, list[list[str]]] = {}  # upstream -> the member lists of the pools it is in
        for members in pools:
            group = list(members)
            for n in group:
                self._peers.setdefault(n, []).append(group)

    def state(self, u: UpstreamStats) -> OutlierState:
        st = self._states.get(u.name)
        if st is None:
            st = self._states[u.name] = OutlierState()
        return st

    # ---- read by the router (request path: no I/O, O(1)) -------------------------------------------------------
    def ejected_until(self, u: UpstreamStats) -> float:
        st = self._states.get(u.name)
        return st.ejected_until if st is not None else 0.0

    def available(self, u: UpstreamStats, now: float) -> bool:
        st = self._states.get(u.name)
        if st is None:
            return True
        if st.ejected_until > now:
            return False
        return not (st.half_open and st.probing)  # half-open: one probe at a time

    def is_ejected(self, u: UpstreamStats, now: float) -> bool:
        return self.ejected_until(u) > now

    def ejections(self, u: UpstreamStats) -> int:
        st = self._states.get(u.name)
        return st.ejections if st is not None else 0

    def success_probability(self, u: UpstreamStats) -> float:
        """Recent share of successful attempts, with a prior of PRIOR_SUCCESSES (1.0 when nothing failed)."""
        st = self._states.get(u.name)
        if st is None or st.fail == 0.0:
            return 1.0
        ok, fail = self._decayed(st, time.monotonic())
        return (ok + PRIOR_SUCCESSES) / (ok + fail + PRIOR_SUCCESSES)

    # ---- outcomes (reported by the proxy and the router) -------------------------------------------------------
    def dispatched(self, u: UpstreamStats) -> None:
        st = self._states.get(u.name)
        if st is not None and st.half_open:
            st.probing = True

    def abandoned(self, u: UpstreamStats) -> None:
        """An attempt ended with no verdict (client left, gateway bug): let another probe go."""
        st = self._states.get(u.name)
        if st is not None:
            st.probing = False

    def success(self, u: UpstreamStats, started: float | None = None) -> None:
        st = self.state(u)
        self._count(st, True, started)
        if started is not None and started < st.mark:
            return  # began before the failure/ejection it overlaps: says nothing about the upstream now
        st.consecutive = 0
        if st.half_open:
            log.info("upstream %s healthy again after probe", u.name)
            st.half_open = st.probing = False
            self._restart_counts(st)
        st.streak = 0

    def failure(self, u: UpstreamStats, started: float | None = None) -> None:
        """A failed attempt; `started` = time.monotonic() when the attempt began."""
        st = self.state(u)
        now = time.monotonic()
        self._count(st, False, started)
        if started is not None and started < st.mark:
            return  # in flight when an earlier failure was counted: the same event
        if st.half_open and time.time() >= st.ejected_until:
            self._eject(u, st, "its half-open probe failed")  # the probe failed: back out, longer
            return
        st.consecutive += 1
        if st.consecutive == 1:
            st.mark = now  # the episode starts: what was already in flight now is part of this event
        if st.consecutive >= self.after:
            self._eject(u, st, f"{st.consecutive} consecutive failures")
        elif self._success_rate_outlier(u, st):
            self._eject(u, st, "its success rate is far below its pool's")

    def check_failed(self, u: UpstreamStats) -> None:
        """An active health check failed: eject now (an ejected upstream stays ejected; no backoff growth)."""
        st = self.state(u)
        if st.ejected_until > time.time() or (st.half_open and st.probing):
            return
        self._eject(u, st, "it failed its health check")

    def check_recovered(self, u: UpstreamStats) -> None:
        """A health check passes again after failing: half-open at once (one request decides), not after backoff.

        Its failure counts restart too, so the router does not keep avoiding a server that was merely restarting
        (an upstream the ejection cap kept in rotation while it was down included).
        """
        st = self.state(u)
        log.info("upstream %s passes its health check again", u.name)
        if st.ejected_until > time.time():
            st.ejected_until = time.time()
        st.mark = time.monotonic()
        self._restart_counts(st)

    def suspect(self, u: UpstreamStats) -> bool:
        """Worth an active probe: ejected, half-open, or failed recently (a crash is confirmed by a cheap GET
        instead of by more failed requests)."""
        st = self._states.get(u.name)
        if st is None:
            return False
        if st.half_open or st.ejected_until > time.time():
            return True
        return st.fail > 0.0 and self._decayed(st, time.monotonic())[1] >= 0.5

    # ---- internals -----------------------------------------------------------------------------------------------
    def _decayed(self, st: OutlierState, now: float) -> tuple[float, float]:
        f = math.exp(-(now - st.at) / self.window) if now > st.at else 1.0
        return st.ok * f, st.fail * f

    @staticmethod
    def _restart_counts(st: OutlierState) -> None:
        """Ejected or recovered: the outcomes before no longer describe the upstream (and a half-open upstream
        must not look so bad to the router that its probe never goes)."""
        st.ok = st.fail = 0.0
        st.fresh = time.monotonic()

    def _count(self, st: OutlierState, ok: bool, started: float | None) -> None:
        if started is not None and started < st.fresh:
            return
        now = time.monotonic()
        st.ok, st.fail = self._decayed(st, now)
        st.at = now
        if ok:
            st.ok += 1.0
        else:
            st.fail += 1.0

    def _success_rate_outlier(self, u: UpstreamStats, st: OutlierState) -> bool:
        """Below `ratio` x the success rate of the other upstreams of its pools (those with enough volume)."""
        now = time.monotonic()
        ok, fail = self._decayed(st, now)
        if ok + fail < self.min_requests:
            return False
        p_ok = p_all = 0.0
        for group in self._peers.get(u.name, ()):
            for n in group:
                other = self._states.get(n)
                if n == u.name or other is None:
                    continue
                o_ok, o_fail = self._decayed(other, now)
                if o_ok + o_fail >= self.min_requests:
                    p_ok, p_all = p_ok + o_ok, p_all + o_ok + o_fail
        return p_all > 0 and ok / (ok + fail) < self.ratio * (p_ok / p_all)

    def _cap_allows(self, u: UpstreamStats) -> bool:
        """max_ejection_percent: would ejecting `u` take any of its pools past the cap (at least 1 may go)?"""
        wall = time.time()
        for group in self._peers.get(u.name, ()):
            out = sum(1 for n in group if n != u.name and (s := self._states.get(n)) and s.ejected_until > wall)
            if out + 1 > max(1, math.floor(len(group) * self.max_percent / 100)):
                return False
        return True

    def _eject(self, u: UpstreamStats, st: OutlierState, why: str) -> None:
        if not self._cap_allows(u):
            st.consecutive = 0  # try again after another run of failures, not on every one
            now = time.monotonic()
            if now - st.capped_log_at >= self.window:
                st.capped_log_at = now
                log.warning("not ejecting upstream %s (%s): max_ejection_percent of its pool is ejected", u.name, why)
            return
        st.streak += 1
        backoff = min(self.max, self.base * 2 ** (st.streak - 1))
        st.ejected_until = time.time() + backoff
        st.mark = time.monotonic()
        st.consecutive = 0
        st.half_open = True
        st.probing = False
        st.ejections += 1
        self._restart_counts(st)
        log.warning("ejecting upstream %s for %.1fs: %s", u.name, backoff, why)
        if self.on_eject:
            self.on_eject(u.name)


class HealthChecker:
    """Active checks feeding the detector (see the module docstring).

    Every `probe_interval` seconds the suspect upstreams are checked; every `interval` seconds (0 = never) all of
    them. `down` remembers the upstreams whose last check failed, so a pass after a failure is a recovery.
    """

    def __init__(
        self,
        upstreams: dict[str, UpstreamStats],
        detector: OutlierDetector,
        interval: float,
        timeout: float,
        probe_interval: float = 0.0,
    ) -> None:
        self.upstreams = upstreams
        self.detector = detector
        self.interval = interval
        self.probe_interval = probe_interval
        self.timeout = timeout
        self.down: dict[str, bool] = {}
        self._session: aiohttp.ClientSession | None = None
        self._last_all = 0.0
        tick = min(x for x in (interval, probe_interval) if x > 0) if max(interval, probe_interval) > 0 else 1.0
        self._loop = Periodic("health-checks", tick, self.check_all, immediate=True)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._session:
            await self._session.close()

    async def check_all(self) -> None:
        now = time.monotonic()
        every = self.interval > 0 and now - self._last_all >= self.interval - 1e-3
        if every:
            self._last_all = now
        due = [u for u in self.upstreams.values() if every or self._wants_probe(u)]
        await asyncio.gather(*(self._check(u) for u in due))

    def _wants_probe(self, u: UpstreamStats) -> bool:
        return self.probe_interval > 0 and (self.down.get(u.name, False) or self.detector.suspect(u))

    async def _check(self, u: UpstreamStats) -> None:
        ok = await self.probe(u)
        if ok:
            if self.down.pop(u.name, False):
                self.detector.check_recovered(u)
        else:
            if not self.down.get(u.name):
                log.warning("upstream %s failed its health check", u.name)
            self.down[u.name] = True
            self.detector.check_failed(u)

    async def probe(self, u: UpstreamStats) -> bool:
        cfg = u.cfg
        prov = provider_for(cfg.provider)
        url = cfg.metrics_url or prov.health_url(cfg)
        headers = prov.headers(cfg)
        headers.pop("Content-Type", None)
        assert self._session is not None
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                await resp.content.read(64 * 1024)  # only the status matters; never buffer a huge body
                return resp.status < 500
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False
