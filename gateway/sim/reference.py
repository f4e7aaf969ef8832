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


# ------------------------------------------------------------------------------- calibrated fleets (issues 11, 16)
def calibrated_sims(kv_scale: float = 1.0, prompt_cache_min_tokens: int = 1024) -> dict[str, SimConfig]:
    """The reference fleet's three upstreams (same names, concurrency caps and hosted limits) on the KV
    engine's calibrated presets, each with a prefix cache: fast-gpu = H100 / Llama-3-8B, slow-gpu = A10G /
    Llama-3-8B, hosted = the reference hosted API with provider prompt caching.

    `kv_scale` multiplies the presets' KV capacities (~427k and ~42k tokens): at 1.0 only very long contexts
    fill an H100; e.g. 0.25 makes a short multi-turn bench with 2-6k-token contexts reach KV pressure.
    """
    from gateway.sim.profile import PRESETS

    def kv(preset: str) -> int:
        return max(1024, int(PRESETS[preset].kv_cache_tokens * kv_scale))

    return {
        "fast-gpu": SimConfig(name="sim-fast", mode="gpu", preset="h100-llama8b", slots=64,
                              kv_cache_tokens=kv("h100-llama8b")),
        "slow-gpu": SimConfig(name="sim-slow", mode="gpu", preset="a10g-llama8b", slots=16,
                              kv_cache_tokens=kv("a10g-llama8b")),
        "hosted": replace(REFERENCE_SIMS["hosted"], prompt_cache_min_tokens=prompt_cache_min_tokens),
    }


def spec_decode_sims(spec_k: int = 4, spec_accept: float = 0.7, kv_scale: float = 1.0) -> dict[str, SimConfig]:
    """calibrated_sims with speculative decoding on fast-gpu: ~1.9x per-sequence speed alone, ~1.6x at 32
    concurrent, a loss at 256 (see tests/unit/test_sim_kv.py): its capacity curve is not a straight line."""
    sims = calibrated_sims(kv_scale)
    sims["fast-gpu"] = replace(sims["fast-gpu"], spec_k=spec_k, spec_accept=spec_accept)
    return sims


def calibrated_fleet(ports: dict[str, int], sims: dict[str, SimConfig]) -> FleetConfig:
    """reference_fleet for `sims`, with each KV-engine upstream's capacity seed (a, b, ttft) and
    max_concurrency taken from its simulated profile instead of the reference sims' numbers."""
    from gateway.config import CapacityHint
    from gateway.sim.virtual import capacity_hint

    cfg = reference_fleet(ports, sims)
    for name, up in cfg.upstreams.items():
        sim = sims.get(name)
        if sim is not None and sim.kv_engine:
            up.capacity = CapacityHint(**capacity_hint(sim))
            up.max_concurrency = sim.slots
    return cfg
