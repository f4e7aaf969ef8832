"""Setting up upstream state in tests the way the gateway changes it: through the owners' methods."""

from __future__ import annotations

from gateway.state.stats import UpstreamStats


def hold(u: UpstreamStats, n: int) -> None:
    """Make `n` requests in flight from this replica on `u`, as dispatches and releases do (in no service class,
    so class admission sees none of them; no KV tokens)."""
    while u.inflight_local < n:
        u.endpoint.credit("", 0)
    while u.inflight_local > n:
        u.endpoint.release("", 0)
