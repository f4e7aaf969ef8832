"""An upstream without traffic is skipped by the sync loop: quiet() is True exactly when refresh() would change
nothing (pure, no sockets)."""

from __future__ import annotations

import time

from gateway.sim.scaled import scaled_fleet
from gateway.state.fleet import Fleet
from gateway.state.rate import WINDOW_S


def test_quiet_until_traffic_and_again_once_the_window_has_aged():
    u = Fleet(scaled_fleet(1, ["http://127.0.0.1:9/v1"]), "throughput").upstreams["up-0"]
    assert u.quiet()
    u.credit(50)
    u.record_tokens(10)
    assert not u.quiet()
    now = time.time()
    u.refresh(now)
    assert not u.quiet() and u.rates.used_req_60 == 1
    u.release()
    u.take_dirty()
    later = now + WINDOW_S + 20
    u.refresh(later)  # everything aged out of the window
    assert u.rates.used_req_60 == 0 and u.tok_s == 0
    assert u.quiet()
    before = (u.tok_s, u.rates.rps, u.rates.used_req_60, u.rates.used_tok_60, u.endpoint.inflight_at_refresh)
    u.refresh(later + 1)  # what the sync loop skips: it would change nothing
    assert (u.tok_s, u.rates.rps, u.rates.used_req_60, u.rates.used_tok_60, u.endpoint.inflight_at_refresh) == before
