"""What the hot-path CPU work (cached period ids, cheap request ids, no span work without an exporter, GC tuning of
serving processes, bounded SLO rows) must keep doing exactly as before."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime

from multidict import CIMultiDict

from gateway.hooks import SIGNALS, Attempt, Hooks
from gateway.http.validation import build_context, request_id, validate
from gateway.observability.subscribers import Propagation, tracing
from gateway.observability.telemetry import Telemetry
from gateway.sim.reference import DEMO_PORTS, reference_fleet
from gateway.spend import day_id, month_id
from gateway.state.fleet import Fleet
from gateway.state.goodput import WINDOW_S, SloTracker
from gateway.state.measure import Outcome

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _body() -> dict:
    body = {"model": "fleet-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    validate("chat", body)
    return body


def test_period_ids_switch_exactly_at_utc_midnight_and_never_serve_a_stale_day() -> None:
    midnight = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert (day_id(midnight - 0.001), month_id(midnight - 0.001)) == ("20261231", "202612")
    assert (day_id(midnight), month_id(midnight)) == ("20270101", "202701")
    for t in (midnight - 40 * 86400, midnight + 59 * 86400 + 3600, 0.0, -1.0):  # back, forward, epoch, before it
        d = datetime.fromtimestamp(t, UTC)
        assert (day_id(t), month_id(t)) == (d.strftime("%Y%m%d"), d.strftime("%Y%m"))


def test_new_request_ids_are_distinct_32_hex_digits_and_a_clients_id_is_kept() -> None:
    ids = {request_id({}) for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert request_id({"x-request-id": "client-42"}) == "client-42"


def test_without_an_exporter_only_the_clients_trace_context_reaches_the_upstream() -> None:
    tel = Telemetry()
    assert not tel.tracing_enabled
    hooks = Hooks()
    hooks.subscribe(sub := tracing(tel))
    assert isinstance(sub, Propagation)
    assert [s for s in SIGNALS if getattr(hooks, s)] == ["attempt_start"]  # one callback per attempt, no spans
    cases = [
        (CIMultiDict({"Traceparent": TRACEPARENT}), TRACEPARENT),  # inbound HTTP headers
        ({"TRACEPARENT": TRACEPARENT}, TRACEPARENT),  # an in-process caller's plain dict, any case
        ({}, None),  # nothing to pass on: no header made up
    ]
    for headers, expected in cases:
        ctx = build_context("chat", _body(), headers=headers)
        a = Attempt(1, None, Outcome())  # type: ignore[arg-type]  # the no-exporter path never reads the decision
        hooks.emit("request_start", ctx)
        hooks.emit("attempt_start", ctx, a)
        hooks.emit("attempt_end", ctx, a)
        hooks.emit("request_end", ctx, None)
        assert a.headers.get("traceparent") == expected, headers


def _slo_request(tracker: SloTracker, fleet: Fleet, upstream: str, tokens: int | None) -> None:
    """One finished request through the hook: with an outcome of `tokens` output tokens (None: it failed)."""
    ctx = build_context("chat", _body())
    ctx.service_class = fleet.pool("fleet-model").cfg.default_class  # type: ignore[union-attr]
    ctx.status, ctx.upstream = 200, upstream
    if tokens is not None:
        ctx.outcome = Outcome(output_tokens=tokens)
    tracker.request_end(ctx, None if tokens is not None else RuntimeError("failed"))


def test_slo_rows_stay_within_the_window_without_snapshots() -> None:
    fleet = Fleet(reference_fleet(DEMO_PORTS), "throughput")
    tracker = SloTracker(fleet)
    _slo_request(tracker, fleet, "u", 1)
    tracker._rows[0].at = -1e9  # long out of the window
    _slo_request(tracker, fleet, "u", 1)
    assert len(tracker._rows) == 1 and tracker._rows[0].at > -1e9 + WINDOW_S


def test_slo_snapshot_sums_are_those_of_the_rows_in_the_window() -> None:
    fleet = Fleet(reference_fleet(DEMO_PORTS), "throughput")
    tracker = SloTracker(fleet)
    for i, (upstream, tokens) in enumerate([("a", 10), ("b", None), ("a", 30), ("", None), ("b", 5), ("a", 7)]):
        _slo_request(tracker, fleet, upstream, tokens)
        if i < 2:
            tracker._rows[-1].at -= 2 * WINDOW_S  # the first two have left the window by the snapshot
    snap = tracker.snapshot()
    assert len(tracker._rows) == 4
    cls = fleet.pool("fleet-model").cfg.default_class  # type: ignore[union-attr]
    by_up = {u: f[cls] for u, f in snap["upstreams"].items()}
    assert set(by_up) == {"a", "b"}  # a request no upstream answered counts for its pool only
    assert by_up["a"]["requests"] == 2 and by_up["a"]["tok_s"] == round(37 / WINDOW_S, 1)
    assert by_up["b"] == {"requests": 1, "attainment": by_up["b"]["attainment"], "tok_s": round(5 / WINDOW_S, 1),
                          "goodput_tok_s": by_up["b"]["goodput_tok_s"]}
    pool = snap["classes"]["fleet-model"][cls]
    met = [r for r in tracker._rows if r.met]
    assert pool["requests"] == 4 and pool["attainment"] == round(len(met) / 4, 4)
    assert pool["tok_s"] == round(42 / WINDOW_S, 1) and pool["goodput_tok_s"] == round(sum(r.tokens for r in met) / WINDOW_S, 1)
    for r in list(tracker._rows):
        r.at -= 2 * WINDOW_S
    assert tracker.snapshot()["classes"] == {} and tracker._window == {}  # all expired: nothing left over


def test_serving_processes_freeze_start_up_objects_and_collect_young_objects_less_often() -> None:
    code = (
        "import gc; from gateway.http.app import GC_THRESHOLDS, _freeze_startup_objects; "
        "before = gc.get_freeze_count(); _freeze_startup_objects(); "
        "print(gc.get_threshold() == GC_THRESHOLDS, GC_THRESHOLDS[0] > 700, gc.get_freeze_count() > before + 10000)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr
