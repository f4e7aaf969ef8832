"""The reference simulated fleet: fast GPU, slow GPU and a rate-limited hosted API (demo, tests, bench)."""

from __future__ import annotations

from dataclasses import replace

from gateway.config import FleetConfig, load_fleet
from gateway.settings import DEFAULT_FLEET
from gateway.sim import SimConfig

#: Upstream name in default_fleet.yaml -> simulator parameters. Ports 9101-9103 in the demo.
REFERENCE_SIMS: dict[str, SimConfig] = {
    "fast-gpu": SimConfig(name="sim-fast", mode="gpu", base_step=0.008, per_seq=0.0004, slots=64, prefill_per_token=0.00001),
    "slow-gpu": SimConfig(name="sim-slow", mode="gpu", base_step=0.02, per_seq=0.0015, slots=16, prefill_per_token=0.00003),
    "hosted": SimConfig(name="sim-hosted", mode="hosted", ttft=0.4, tok_s=60.0, rpm=120, tpm=100000, max_concurrency=32),
}
DEMO_PORTS = {"fast-gpu": 9101, "slow-gpu": 9102, "hosted": 9103}


def reference_fleet(ports: dict[str, int], sims: dict[str, SimConfig] | None = None) -> FleetConfig:
    """default_fleet.yaml with each upstream pointed at 127.0.0.1:<port> (and limits matching `sims`)."""
    cfg = load_fleet(DEFAULT_FLEET)
    for name, up in cfg.upstreams.items():
        up.base_url = f"http://127.0.0.1:{ports[name]}/v1"
        up.metrics_url = f"http://127.0.0.1:{ports[name]}/metrics" if up.metrics_url else None
        if sims and name in sims and sims[name].mode == "hosted":
            up.rpm, up.tpm = sims[name].rpm, sims[name].tpm
    return cfg


def sims_with(**overrides: dict) -> dict[str, SimConfig]:
    """REFERENCE_SIMS with per-upstream field overrides, e.g. sims_with(hosted={"rpm": 30})."""
    return {n: replace(c, **overrides.get(n, {})) for n, c in REFERENCE_SIMS.items()}
