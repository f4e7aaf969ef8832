"""The fleet: every upstream's live stats, and the pools (client model -> upstreams) built from config."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.config import FleetConfig, ModelConfig
from gateway.state.lengths import OutputLengths
from gateway.state.stats import UpstreamStats


@dataclass
class Pool:
    model: str
    cfg: ModelConfig
    upstreams: list[UpstreamStats]
    strategy: str
    rr: int = 0  # round-robin cursor
    lengths: OutputLengths = field(default_factory=OutputLengths)  # observed output lengths (expected output)


class Fleet:
    def __init__(self, config: FleetConfig, default_strategy: str) -> None:
        self.config = config
        self.upstreams: dict[str, UpstreamStats] = {n: UpstreamStats(c) for n, c in config.upstreams.items()}
        self.pools: dict[str, Pool] = {
            m: Pool(m, c, [self.upstreams[u] for u in c.upstreams], c.strategy or default_strategy)
            for m, c in config.models.items()
        }
        self._aliases = {a: m for m, c in config.models.items() for a in c.aliases}
        self.models_of: dict[str, list[str]] = {n: [] for n in self.upstreams}
        for m, c in config.models.items():
            for u in c.upstreams:
                self.models_of[u].append(m)

    def pool(self, model: str) -> Pool | None:
        p = self.pools.get(model)
        if p is None and model in self._aliases:
            p = self.pools[self._aliases[model]]
        return p

    def snapshot(self) -> list[dict]:
        now = time.time()
        return [u.snapshot(now, self.models_of[n]) for n, u in self.upstreams.items()]
