"""An upstream's per-second traffic windows and its RPM/TPM limits: where tok/s is measured and windowed.

This replica's window (`mine`, exact and current) and the other replicas' (`others`, from Redis) are merged at
each refresh into the cached figures the request path reads (fleet tok/s, RPM/TPM used). Flushes write this
replica's absolute totals for the seconds that changed (`dirty`), so a retried flush cannot double count. The
window and limit check are state/rate.py's, shared with the gateway keys' limits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from gateway.config import UpstreamConfig
from gateway.context import Estimate
from gateway.state.load import EndpointLoad
from gateway.state.rate import WINDOW_S, Window, exceeded, headroom_share, static_share
from gateway.state.slidingmax import SlidingMax

# Per-second counter fields.
REQ, OUT, ADM, ERR, RL = range(5)
FIELDS = ("req", "out", "adm", "err", "rl")
RATE_WINDOW_S = 10  # tok/s and error rates are averaged over this many seconds
#: Rate limits are also paced by token buckets refilled at exactly the limit's rate (this replica's share), holding
#: BURST_S seconds of it, and at least PACE_BURST requests (so a small limit such as 6 RPM may start at once; in
#: tokens, PACE_BURST of the largest requests charged lately: see _tpm_burst).
#: Started no faster than the limit allows, the sliding window never fills early: the upstream is kept busy all
#: minute instead of the budget being burnt in a burst and the upstream then idling until the window slides.
BURST_S = 2.0
PACE_BURST = 8
#: Slack before a request's window slot is treated as expired at the provider (it arrived after the gateway counted it).
EXPIRY_MARGIN_S = 0.5


class UpstreamRates:
    """Traffic windows, the figures cached from them, and RPM/TPM admission (sliding window + pacing buckets)."""

    def __init__(self, cfg: UpstreamConfig, endpoint: EndpointLoad) -> None:
        self.cfg = cfg  # rpm, tpm, tpm_counts: read live (the config is their one source)
        #: Its in-flight count is snapshot at each refresh (has_slot shares the headroom seen then).
        self.endpoint = endpoint
        self.member = endpoint.member
        self.mine = Window()
        self.dirty: set[int] = set()
        self.others = Window()
        # Cached at refresh; the request path reads these.
        self.tok_s = 0.0
        self.rps = 0.0
        self.errors_per_min = 0.0
        self.rate_limited_per_min = 0.0
        self.used_req_60 = 0
        self.used_tok_60 = 0
        self.req_since_refresh = 0
        self.tok_since_refresh = 0
        # Pacing buckets (requests, tokens), full at start; may go negative (a request larger than the bucket).
        self._pace_req = math.inf
        self._pace_tok = math.inf
        self._pace_at = time.monotonic()
        self._largest = SlidingMax(WINDOW_S)  # TPM charges of the requests started (_tpm_burst)

    # ---- request path -----------------------------------------------------------------------------------------
    def credit(self, admitted_tokens: int) -> int:
        """Count a dispatch at once; returns the epoch second it was charged to (settle_tokens corrects it)."""
        self.req_since_refresh += 1
        self.tok_since_refresh += admitted_tokens
        sec = int(time.time())
        self.mine.add(sec, REQ, 1)
        self.mine.add(sec, ADM, admitted_tokens)
        self.dirty.add(sec)
        self._pace_req -= 1
        self._pace_tok -= admitted_tokens
        self._largest.add(admitted_tokens, time.monotonic())
        return sec

    def record(self, field: int, v: int) -> None:
        sec = int(time.time())
        self.mine.add(sec, field, v)
        self.dirty.add(sec)

    def tpm_charge(self, est: Estimate) -> int:
        """Tokens this upstream's TPM limit is charged for the request at admission.

        `reserved` providers (OpenAI-style) charge prompt + max_tokens up front, so that is what counts when the
        client gave max_tokens; `usage` providers count what is really used, so the gateway charges prompt + the
        expected output (est.output_tokens: from max_tokens and the pool's observed lengths) and settles the
        difference when the usage is known (settle_tokens). Either way the tokens started in the window include
        what the in-flight requests will still consume.
        """
        if self.cfg.tpm_counts == "usage" or est.max_tokens is None:
            return est.prompt_tokens + est.output_tokens
        return est.prompt_tokens + est.max_tokens

    def settle_tokens(self, sec: int, charged: int, used: int) -> None:
        """Correct a `usage` provider's TPM charge (made in epoch second `sec`) by the tokens really used."""
        if self.cfg.tpm_counts != "usage" or used <= 0 or sec not in self.mine.buckets:
            return
        delta = used - charged
        self.mine.add(sec, ADM, delta)
        self.dirty.add(sec)
        self.tok_since_refresh += delta
        self._pace_tok -= delta

    def fits_tpm(self, tokens: int) -> bool:
        """Could a request of this size ever be admitted here (by this replica's share of an idle TPM window)?"""
        tpm = self.cfg.tpm
        return not tpm or tokens <= static_share(tpm, self.member.replicas, self.member.rank)

    def rate_allows(self, tokens: int) -> bool:
        """RPM/TPM from the limits themselves: what started in the sliding 60 s window (plus this request) stays
        within this replica's share of the limit, and the pacing buckets have room (see BURST_S).

        Nothing here depends on the request's own duration: a short request is not held back by a small
        in-flight cap, so the queue behind it keeps moving and the budget is filled.
        """
        lim = self.cfg
        if not (lim.rpm or lim.tpm):
            return True
        self._refill()
        m = self.member
        req_share = headroom_share(lim.rpm, self.used_req_60, m.replicas, m.rank) if lim.rpm else 0
        tok_share = headroom_share(lim.tpm, self.used_tok_60, m.replicas, m.rank) if lim.tpm else 0
        if exceeded(lim, self.req_since_refresh, req_share, self.tok_since_refresh, tok_share, tokens):
            return False
        if lim.rpm and self._pace_req < 1.0:
            return False
        # A full bucket takes anything.
        return not (lim.tpm and self._pace_tok < tokens and self._pace_tok < self._tpm_burst(lim.tpm))

    def paced_in(self, tokens: int, ahead: int = 0) -> float:
        """Seconds until the pacing buckets let a request of `tokens` start after `ahead` others, when they are
        what refuses it (as of the last rate_allows); inf when the sliding window's share is used up (that frees
        only as old requests leave the window, which may take up to a minute)."""
        lim, m = self.cfg, self.member
        req_share = headroom_share(lim.rpm, self.used_req_60, m.replicas, m.rank) if lim.rpm else 0
        tok_share = headroom_share(lim.tpm, self.used_tok_60, m.replicas, m.rank) if lim.tpm else 0
        if exceeded(lim, self.req_since_refresh + ahead, req_share, self.tok_since_refresh, tok_share, tokens):
            return math.inf
        n, wait = max(1, m.replicas), 0.0
        if lim.rpm:
            wait = (1.0 + ahead - self._pace_req) * WINDOW_S * n / lim.rpm
        if lim.tpm:
            need = (1 + ahead) * min(tokens, self._tpm_burst(lim.tpm))
            wait = max(wait, (need - self._pace_tok) * WINDOW_S * n / lim.tpm)
        return max(0.0, wait)

    def pacing_low(self) -> bool:
        """Is a pacing bucket (RPM or TPM) less than half full, as of the last rate_allows? Then requests are being
        started at about the limit's pace: the budget is the scarce resource now, before the minute's count shows it
        (a backlog arriving at once empties the buckets in its first second)."""
        lim = self.cfg
        return self.requests_paced() or bool(lim.tpm and self._pace_tok < self._tpm_burst(lim.tpm) / 2)

    def requests_spare(self) -> bool:
        """Is the RPM pacing bucket within one request of full, as of the last rate_allows? Then nobody is taking
        its units as fast as they come: the next refill would be discarded, so a unit taken now costs no one."""
        lim = self.cfg
        return not lim.rpm or self._pace_req >= self._burst(lim.rpm, PACE_BURST) - 1.0

    def requests_paced(self) -> bool:
        """Is the RPM pacing bucket less than half full (pacing_low's request part), as of the last rate_allows?"""
        lim = self.cfg
        return bool(lim.rpm and self._pace_req < self._burst(lim.rpm, PACE_BURST) / 2)

    def _burst(self, limit: int, least: float) -> float:
        """Capacity of a pacing bucket: BURST_S seconds of this replica's share of the limit, at least `least`."""
        share = limit / max(1, self.member.replicas)
        return max(1.0, min(share, max(share * BURST_S / WINDOW_S, least)))

    def _tpm_burst(self, tpm: int) -> float:
        """Capacity of the TPM pacing bucket: BURST_S seconds of the limit, and at least PACE_BURST of the largest
        requests charged in the last minute (the RPM bucket's least, in tokens; 1 token before any).

        Two seconds of a limit sized for a mix hold only two or three long requests (100k TPM: 3.3k tokens,
        1224 per 1024-token answer), while long answers are what a rate-limited API is best used for and they
        come in groups (clients started together, answers of one length finishing together). The group was
        spread over seconds: the later ones went to a GPU for their whole length, and the bucket, below half
        full after two of them, told every shorter request the budget was scarce (pacing_low). Sized in
        requests, the group starts together; the sliding window still bounds the minute."""
        return self._burst(tpm, PACE_BURST * self._largest.max(time.monotonic(), 1))

    def _refill(self) -> None:
        now = time.monotonic()
        dt, self._pace_at = now - self._pace_at, now
        lim, n = self.cfg, max(1, self.member.replicas)
        if lim.rpm:
            self._pace_req = min(self._burst(lim.rpm, PACE_BURST), self._pace_req + dt * lim.rpm / WINDOW_S / n)
        if lim.tpm:
            self._pace_tok = min(self._tpm_burst(lim.tpm), self._pace_tok + dt * lim.tpm / WINDOW_S / n)

    def window_sum(self, field: int, since: int = 0) -> int:
        """Fleet-wide total of a per-second counter since an epoch second (this replica's part is current)."""
        return self.others.sum(field, since) + self.mine.sum(field, since)

    # ---- background (fleet_sync) ------------------------------------------------------------------------------
    def take_dirty(self) -> dict[int, list[int]]:
        """This replica's totals for the seconds changed since the last flush (absolute values: idempotent)."""
        out = {sec: list(self.mine.buckets[sec]) for sec in self.dirty if sec in self.mine.buckets}
        self.dirty.clear()
        return out

    def mark_dirty(self, secs: Iterable[int] | None = None) -> None:
        """Write these seconds again at the next flush (a failed or deferred one); None: this replica's whole
        window (Redis may have restarted empty)."""
        self.dirty.update(self.mine.buckets if secs is None else secs)

    def set_others(self, others: Window) -> None:
        """The other replicas' window, rebuilt by fleet_sync from Redis."""
        self.others = others

    def refresh(self, now: float) -> None:
        """Recompute the cached figures from the other replicas' windows plus this replica's own."""
        sec = int(now)
        self.mine.prune(sec - WINDOW_S - 10)
        self.others.prune(sec - WINDOW_S - 10)
        view = Window()
        view.merge(self.others)
        view.merge(self.mine)
        since10 = sec - RATE_WINDOW_S
        # The current second is partial: average over the complete ones plus the elapsed fraction.
        span = RATE_WINDOW_S + (now - sec)
        self.tok_s = view.sum(OUT, since10) / span
        self.rps = view.sum(REQ, since10) / span
        self.errors_per_min = view.sum(ERR, since10) * 60 / span
        self.rate_limited_per_min = view.sum(RL, since10) * 60 / span
        # A request counted in bucket s may have reached the provider up to a second later (the bucket's end)
        # plus network and clock skew: it leaves the provider's sliding window by s + 1 + 60 + EXPIRY_MARGIN_S.
        since60 = math.floor(now - WINDOW_S - 1 - EXPIRY_MARGIN_S) + 1
        self.used_req_60 = view.sum(REQ, since60)
        self.used_tok_60 = view.sum(ADM, since60)
        self.req_since_refresh = 0
        self.tok_since_refresh = 0
        self.endpoint.mark_refresh()

    def quiet(self) -> bool:
        """Would refresh() change nothing? True for an upstream with no traffic in its window and zeroed figures:
        the sync loop skips it, so an idle fleet costs nothing per upstream per cycle."""
        e = self.endpoint
        return not (
            self.mine.buckets or self.others.buckets or self.req_since_refresh or self.tok_since_refresh
            or self.tok_s or self.rps or self.errors_per_min or self.rate_limited_per_min
            or self.used_req_60 or self.used_tok_60 or e.inflight_at_refresh != e.inflight_local
        )
