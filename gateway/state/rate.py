"""Per-second counters over a sliding minute, and RPM/TPM limits checked against them.

One implementation for both kinds of limit the gateway enforces: an upstream's RPM/TPM (state/upstream_rates.py,
where the window is shared with the other replicas through Redis) and a gateway API key's RPM/TPM (auth.py, this
replica's own window). Both count what *started* in a sliding 60 s window of 1-second buckets (the way hosted APIs
count), and both refuse a request when it would take the window past this replica's share of the limit; they
differ only in how the share is cut (see the two share functions below).
"""

from __future__ import annotations

from typing import Protocol

WINDOW_S = 60


class Window:
    """Per-second counters keyed by epoch second; `width` counters per second (the caller names the fields)."""

    __slots__ = ("buckets", "width")

    def __init__(self, width: int = 5) -> None:
        self.buckets: dict[int, list[int]] = {}
        self.width = width

    def add(self, sec: int, field: int, v: int) -> None:
        b = self.buckets.get(sec)
        if b is None:
            b = self.buckets[sec] = [0] * self.width
        b[field] += v

    def refund(self, sec: int, field: int, v: int) -> bool:
        """Take `v` back from the second it was charged in, never below 0; False when that second has aged out
        (a refund booked later would outlive the charge and lend tokens that were never there)."""
        b = self.buckets.get(sec)
        if b is None:
            return False
        b[field] = max(0, b[field] - v)
        return True

    def merge(self, other: Window) -> None:
        for sec, vals in other.buckets.items():
            b = self.buckets.get(sec)
            if b is None:
                self.buckets[sec] = list(vals)
            else:
                for i, v in enumerate(vals):
                    b[i] += v

    def sum(self, field: int, since: int) -> int:
        return sum(v[field] for s, v in self.buckets.items() if s >= since)

    def prune(self, before: int) -> None:
        for s in [s for s in self.buckets if s < before]:
            del self.buckets[s]

    def oldest(self) -> int | None:
        return min(self.buckets) if self.buckets else None

    def frees_in(self, field: int, used: int, fits: float, now: float) -> float:
        """Seconds until enough of the window ages out that `used` falls to `fits` (at least 1 s)."""
        freed = 0
        for sec in sorted(self.buckets):
            freed += self.buckets[sec][field]
            if used - freed <= fits:
                return max(1.0, sec + WINDOW_S - now)
        return float(WINDOW_S)

    def __bool__(self) -> bool:
        return bool(self.buckets)


def static_share(limit: int, replicas: int, rank: int) -> int:
    """This replica's fixed part of `limit`: an even split, the remainder to the lowest ranks (the parts add up to
    the limit exactly, so the fleet cannot overshoot however stale the other replicas' figures are)."""
    n = max(1, replicas)
    return limit // n + (1 if rank < limit % n else 0)


def headroom_share(limit: int, used: int, replicas: int, rank: int) -> int:
    """This replica's share of what is left of a limit (`used` seen at the last sync), split like static_share:
    the shares add up to the headroom exactly, whatever the flush lag, and a headroom smaller than the number of
    replicas is still usable."""
    headroom = limit - used
    return static_share(headroom, replicas, rank) if headroom > 0 else 0


def even_share(limit: int, replicas: int) -> float:
    """max(1, limit / N): a key's per-replica allowance. The load balancer, not the gateway, decides which replica
    sees a key's requests, so every replica must be able to serve at least one (a rank-based split would leave a
    small key unusable on most replicas)."""
    return max(1.0, limit / max(1, replicas))


class Limited(Protocol):
    """An RPM/TPM pair (None or 0: no limit): an upstream's config or a gateway key."""

    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...


def exceeded(limits: Limited, req_used: int, req_share: float, tok_used: int, tok_share: float, tokens: int) -> str | None:
    """Which limit one more request costing `tokens` would break ("requests" | "tokens"), or None: what started
    in the window plus this request must stay within this replica's share of each limit."""
    if limits.rpm and req_used + 1 > req_share:
        return "requests"
    if limits.tpm and tok_used + tokens > tok_share:
        return "tokens"
    return None
