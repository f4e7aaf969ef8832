"""The offline affinity bound (gateway/tools/affinity_bound.py): the simulator's engines in virtual time. Pure."""

from __future__ import annotations

from gateway.tools.affinity_bound import Workload, bound


def test_placements_order_as_the_caches_predict_and_runs_are_reproducible() -> None:
    w = Workload(users=12, think=1.0, tenants=12, seed=3)
    r = bound(w, seconds=40.0, warmup=5.0)
    assert r == bound(w, seconds=40.0, warmup=5.0)  # virtual time: the same numbers every run
    assert r["no_cache"]["hit_rate"] == 0.0
    hit = {k: float(v["hit_rate"] or 0) for k, v in r.items()}
    tok = {k: float(v["tok_s"] or 0) for k, v in r.items()}
    # a tenant's conversations on one engine keep its prompt hot; prefix-blind placement finds part by chance
    assert hit["tenant"] > hit["sticky"] > hit["least"] > 0.2
    assert tok["tenant"] > tok["least"] > tok["no_cache"] > 0
    ttft = {k: float(v["ttft_p50_ms"] or 0) for k, v in r.items()}
    assert ttft["tenant"] < ttft["no_cache"]  # a hit skips most of a 1-4k-token prefill


def test_the_hosted_api_serves_requests_beside_the_engines() -> None:
    w = Workload(users=12, think=1.0, tenants=12, seed=3)
    gpu, both = bound(w, 40.0, 5.0), bound(Workload(users=12, think=1.0, tenants=12, seed=3, hosted=True), 40.0, 5.0)
    assert both["least"]["requests"] > gpu["least"]["requests"]  # type: ignore[operator]


def test_homes_derived_from_where_prefixes_are_partition_the_tenants_as_well_as_tenant_placement() -> None:
    # `holder` (the router's home rule: the first holder of the longest cached prefix in rendezvous order within
    # the bounded load) against the sticky oracle, on a pool whose users the engines' caches bound.
    w = Workload(users=40, think=1.0, tenants=24, seed=3, hosted=True)
    r = bound(w, seconds=60.0, warmup=20.0)
    hit = {k: float(v["hit_rate"] or 0) for k, v in r.items()}
    tok = {k: float(v["tok_s"] or 0) for k, v in r.items()}
    assert hit["holder"] > hit["sticky"] and tok["holder"] > tok["sticky"]
    assert tok["holder"] > 0.95 * tok["tenant"]
