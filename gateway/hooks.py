"""Signals along the request path, in the shape of aiohttp's TraceConfig: measurement, health verdicts, tracing,
metrics (and later cost, goodput) subscribe here instead of living inline in the proxy.

A subscriber is any object with methods named after the signals it wants (`attempt_end`, ...); `Hooks.subscribe`
collects them. Callbacks are plain functions, called in subscription order, synchronously: they run on the hot path,
so they must not block or await. Per-request state a subscriber needs goes in `ctx.extras[<its name>]` (requests) or
`attempt.extras` (attempts), like aiohttp's `trace_request_ctx`.

Signals, in order for one request:
    request_start(ctx)                       parsed and validated, before routing
    decision(ctx, attempt)                   the router chose `attempt.upstream` (after any queueing)
    attempt_start(ctx, attempt)              about to POST; `attempt.headers` may still be changed (traceparent)
    first_token(ctx, attempt)                the first content arrived
    progress(ctx, attempt)                   a long stream made progress (about once a second)
    attempt_end(ctx, attempt)                the attempt is over; `attempt.error` is None on success
    request_end(ctx, error)                  the client got its answer (`ctx.status`), or `error`
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.errors import GatewayError
    from gateway.routing.preempt import Running
    from gateway.routing.router import Decision
    from gateway.state.measure import Outcome
    from gateway.state.stats import UpstreamStats

SIGNALS = ("request_start", "decision", "attempt_start", "first_token", "progress", "attempt_end", "request_end")


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of a request on one upstream."""

    number: int  # 1 for the first try
    decision: Decision
    outcome: Outcome
    upstream_model: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # outgoing request headers
    t0: float = field(default_factory=time.monotonic)
    status: int = 0  # the upstream's HTTP status once it answered 2xx
    contacted: bool = False  # the request was sent (a failure before that says nothing about the upstream)
    streamed: bool = False  # bytes of this attempt reached the client
    error: GatewayError | None = None
    #: While the attempt may be preempted: its entry in the router's registry (routing/preempt.py Running).
    preempt: Running | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def upstream(self) -> UpstreamStats:
        return self.decision.upstream


class Hooks:
    __slots__ = SIGNALS

    def __init__(self) -> None:
        for s in SIGNALS:
            setattr(self, s, [])

    def subscribe(self, subscriber: object) -> None:
        """Register every method of `subscriber` named after a signal."""
        found = False
        for s in SIGNALS:
            fn = getattr(subscriber, s, None)
            if fn is not None:
                getattr(self, s).append(fn)
                found = True
        if not found:
            raise TypeError(f"{type(subscriber).__name__} has no method named after a signal ({', '.join(SIGNALS)})")

    def emit(self, signal: str, *args: Any) -> None:
        callbacks: list[Callable[..., None]] = getattr(self, signal)
        for fn in callbacks:
            fn(*args)
