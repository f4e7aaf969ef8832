"""`gateway bench --scenarios scaling`: a small end-to-end run (real subprocesses, Redis, bounded) + its targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.tools.scenarios.scaling import hetero_sims, targets


def test_targets_from_rows() -> None:
    rows = [
        {"upstreams": 3, "replicas": 1, "cpu_ms_per_request": 0.5, "idle_cpu_pct": 1.0, "redis_cmds_s_per_replica": 50,
         "own_sync_cmds_s": 60.0},
        {"upstreams": 300, "replicas": 1, "cpu_ms_per_request": 0.6, "idle_cpu_pct": 1.5, "redis_cmds_s_per_replica": 52},
        {"upstreams": 300, "replicas": 16, "cpu_ms_per_request": 0.7, "idle_cpu_pct": 9.0, "redis_cmds_s_per_replica": 51,
         "redis_cpu_pct": 7.5},
    ]
    t = targets(rows, {"sampled_minus_exact_points": -0.4})
    assert t["cpu_per_request_300_over_3"] == 1.2 and t["idle_cpu_pct_at_300"] == 1.5
    assert t["idle_redis_cmds_s_per_replica_by_upstreams"] == {3: 50, 300: 52}
    assert t["idle_own_sync_cmds_s_by_upstreams"] == {3: 60.0, 300: None}
    assert t["redis_cpu_pct_16x300"] == 7.5 and t["quality_sampled_minus_exact_points"] == -0.4
    assert targets(rows[:1], None)["cpu_per_request_300_over_3"] is None


def test_quality_fleet_is_heterogeneous() -> None:
    sims = hetero_sims()
    assert len(sims) == 30 and len({(s.base_step, s.per_seq, s.slots) for s in sims.values()}) == 10


@pytest.mark.timeout(150)
def test_scaling_scenario_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "GATEWAY_BENCH_SCALING_UPSTREAMS": "3,40", "GATEWAY_BENCH_SCALING_REPLICAS": "1,2"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.tools.bench", "--quick", "--compare-duration", "2", "--scenarios", "scaling",
         "--out", str(out)],
        capture_output=True, text=True, timeout=140, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "### scaling" in proc.stdout and "Routing quality" in proc.stdout
    r = json.loads(out.read_text())["scenarios"]["scaling"]
    assert [(x["upstreams"], x["replicas"]) for x in r["rows"]] == [(3, 1), (40, 1), (3, 2), (40, 2)]
    for x in r["rows"]:
        assert x["rps"] > 0 and x["errors"] == 0 and x["cpu_ms_per_request"] > 0 and x["rss_mb"] > 20
        assert x["redis_cmds_s_per_replica"] > 0  # the replicas heartbeat through the real Redis
    for x in r["rows"][:2]:  # one replica: its own count of sync commands, independent of idle upstreams
        assert 20 < x["own_sync_cmds_s"] < 150, x
    q = r["quality"]
    assert q["exact"]["tok_s"] > 0 and q["sampled"]["tok_s"] > 0 and q["exact"]["errors"] == 0
    assert r["targets"]["idle_redis_cmds_s_per_replica_by_upstreams"].keys() == {"3", "40"}
