"""Which upstreams a pick scores, so its cost does not grow with the pool.

Small pools (<= SAMPLE_ABOVE upstreams) are scored exactly: every upstream, every pick. For larger ones scoring
all N in Python costs O(N) per request (at 300 upstreams a pick cost ~5x a whole request at 3). Instead a pick
scores a constant number of candidates with live figures:
- the SHORTLIST best known upstreams, from an index ranked by the pool's own scoring at a typical request size.
  The index is re-ranked when upstreams' figures change (dispatch, release, a sync cycle that merged new
  figures: Fleet.changed), not per request: re-ranking touches only the changed upstreams' keys plus one
  nlargest over cached floats;
- RANDOM_D upstreams drawn at random (power-of-d choices), which keeps the pick good between re-rankings
  (a burst that fills the shortlisted ones spreads to the sample) and lets an upstream the index under-rates be
  tried, so its figures are refreshed.
The candidates are then filtered and scored by the router exactly as in the small-pool path; when none of them
can take the request the router falls back to the exact scan, so refusals (saturated, rate limited, cooldown,
too large) are the same as before.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable

from gateway.state.fleet import Pool
from gateway.state.stats import UpstreamStats

SAMPLE_ABOVE = 16
SHORTLIST = 6
RANDOM_D = 4


class CandidateIndex:
    """Ranked upstreams of one pool. `rank(u)` is the pool's score of u for a typical request (higher = better)."""

    def __init__(self, pool: Pool, rank: Callable[[UpstreamStats], float], rng: random.Random | None = None) -> None:
        self.pool = pool
        self.rank = rank
        self.rng = rng or random.Random()
        self._by_name = {u.name: u for u in pool.upstreams}
        self._key: dict[str, float] = {}
        self.shortlist: list[UpstreamStats] = []
        self.update(self._by_name)

    def update(self, names: Iterable[str]) -> None:
        """Re-rank the named upstreams (those of other pools are ignored) and rebuild the shortlist."""
        hit = False
        for n in names:
            u = self._by_name.get(n)
            if u is not None:
                k = self.rank(u) if u.weight > 0 else -math.inf
                self._key[n] = k if not math.isnan(k) else -math.inf
                hit = True
        if hit or not self.shortlist:
            best = heapq.nlargest(SHORTLIST, self._key, key=self._key.__getitem__)
            self.shortlist = [self._by_name[n] for n in best]

    def candidates(self) -> list[UpstreamStats]:
        """The shortlist plus RANDOM_D others: a constant number, whatever the pool size."""
        ups = self.pool.upstreams
        out = list(self.shortlist)
        seen = {u.name for u in out}
        for u in self.rng.sample(ups, min(RANDOM_D + len(out), len(ups))):
            if u.name not in seen:
                out.append(u)
                seen.add(u.name)
                if len(out) >= len(self.shortlist) + RANDOM_D:
                    break
        return out


def sampled(pool: Pool, sample_above: int) -> bool:
    """Does this pool take the sampled path? Only the throughput strategy scores; the others stay exact."""
    return pool.strategy == "throughput" and len(pool.upstreams) > sample_above
