"""What each service class's tokens cost: live USD per 1M output tokens and spend per (pool, class).

Why. A class may prefer the cheapest upstream (`prefer: cost`, routing/router.py) so that batch work flows to
the cheapest tokens while interactive work keeps its speed; operators need to see that in money, per class,
next to each class's SLO attainment. The pool and fleet figures (state/fleet.py cost_view) cannot show it: they
blend every class, and they charge idle hourly servers to nobody in particular.

What is counted. Exactly what spend.py charges each finished request (once, on the upstream that answered it:
per-token prices, batch rates for the batch class, an hourly server's output at its live billing rate), with the
output tokens charged. So a class's $/1M is what its own requests cost per output token; an hourly server's idle
time belongs to no class (it shows in the pool and fleet figures only). Live = the last WINDOW_S seconds; totals
= since this replica started (like each upstream's `spend_usd`). This replica's requests only: Prometheus sums
the `_total` counters across replicas, and their rates' quotient is the fleet's live $/1M per class.

Bounded: one bucket per second of the window per (pool, class), whatever the request rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.cost import spent_usd_per_1m, usd

WINDOW_S = 60


@dataclass(slots=True)
class _Sums:
    requests: int = 0
    usd_micros: int = 0
    output_tokens: int = 0

    def add(self, micros: int, output_tokens: int) -> None:
        self.requests += 1
        self.usd_micros += micros
        self.output_tokens += output_tokens


def usd_per_1m(micros: int, output_tokens: int) -> float | None:
    """USD per 1M output tokens, rounded for the views (cost.spent_usd_per_1m)."""
    v = spent_usd_per_1m(micros, output_tokens)
    return None if v is None else round(v, 6)


class ClassCost:
    """Charges per (pool, class): cumulative sums and per-second buckets of the last `window_s` seconds."""

    def __init__(self, window_s: int = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.totals: dict[tuple[str, str], _Sums] = {}
        self._recent: dict[tuple[str, str], deque[tuple[int, _Sums]]] = {}

    def add(self, model: str, service_class: str, micros: int, output_tokens: int) -> None:
        """One charged request (micros >= 0) of `service_class` in pool `model`."""
        key = (model, service_class)
        self.totals.setdefault(key, _Sums()).add(micros, output_tokens)
        sec = int(self.clock())
        q = self._recent.setdefault(key, deque())
        if not q or q[-1][0] != sec:
            q.append((sec, _Sums()))
        q[-1][1].add(micros, output_tokens)
        self._prune(q, sec)

    def _prune(self, q: deque[tuple[int, _Sums]], now: int) -> None:
        while q and q[0][0] <= now - self.window_s:
            q.popleft()

    def view(self) -> dict[str, dict[str, dict]]:
        """{pool: {class: figures}}: live $/1M and its window's spend, plus totals since start."""
        now = int(self.clock())
        out: dict[str, dict[str, dict]] = {}
        for (model, cls), tot in sorted(self.totals.items()):
            q = self._recent.get((model, cls), deque())
            self._prune(q, now)
            live = _Sums()
            for _, s in q:
                live.requests += s.requests
                live.usd_micros += s.usd_micros
                live.output_tokens += s.output_tokens
            out.setdefault(model, {})[cls] = {
                "usd_per_1m_output": usd_per_1m(live.usd_micros, live.output_tokens),
                "window_spend_usd": usd(live.usd_micros),
                "window_output_tokens": live.output_tokens,
                "usd_per_1m_output_total": usd_per_1m(tot.usd_micros, tot.output_tokens),
                "spend_usd": usd(tot.usd_micros),
                "spend_micros": tot.usd_micros,
                "output_tokens": tot.output_tokens,
                "requests": tot.requests,
            }
        return out

