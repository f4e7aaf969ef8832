"""Fleets of many upstreams for scaling tests and the `scaling` bench scenario.

Many upstreams can point at one simulator (distinguished by name only): what is measured then is the gateway's
cost per upstream, not the simulators'.
"""

from __future__ import annotations

from gateway.config import CapacityHint, FleetConfig
from gateway.sim import SimConfig

SCALE_MODEL = "scale-model"
#: A hosted-mode simulator that answers at once: zero TTFT, a million tokens/s, no limits.
ZERO_LATENCY = SimConfig(name="sim-zero", mode="hosted", ttft=0.0, tok_s=1e6)


def scaled_fleet(n: int, urls: list[str], *, model: str = SCALE_MODEL, strategy: str | None = None,
                 max_concurrency: int = 64, hints: list[CapacityHint] | None = None) -> FleetConfig:
    """`n` upstreams `up-0..n-1` over the simulator base URLs (round-robin), one pool `model` holding them all.

    `hints` (cycled like the URLs) gives each upstream the capacity curve of the simulator it points at.
    """
    ups: dict[str, dict] = {}
    for i in range(n):
        hint = hints[i % len(hints)] if hints else None
        ups[f"up-{i}"] = {
            "name": f"up-{i}", "provider": "openai", "kind": "gpu", "base_url": urls[i % len(urls)], "model": model,
            "max_concurrency": max_concurrency, **({"capacity": hint.model_dump()} if hint else {}),
        }
    return FleetConfig.model_validate({"upstreams": ups, "models": {model: {"upstreams": list(ups), "strategy": strategy}}})
