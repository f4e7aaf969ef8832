"""Which upstreams a pick scores, so its cost does not grow with the pool.

Small pools (<= SAMPLE_ABOVE upstreams) are scored exactly: every upstream, every pick. For larger ones scoring
all N in Python costs O(N) per request (at 300 upstreams a pick cost ~5x a whole request at 3). Instead a pick
scores a constant number of candidates with live figures:
- the SHORTLIST best known upstreams, from an index ranked by the pool's own scoring at a typical request size.
  The index is re-ranked when upstreams' figures change (dispatch, release, a sync cycle that merged new
  figures: Fleet.changed), not per request: re-ranking touches only the changed upstreams' keys plus one
  nlargest over cached floats;
- the RECENT upstreams that last freed a slot (a release is the likeliest new best place, and the index only
  learns of it at the next re-rank);
- RANDOM_D upstreams drawn at random (power-of-d choices), which keeps the pick good between re-rankings
  (a burst that fills the shortlisted ones spreads to the sample) and lets an upstream the index under-rates be
  tried, so its figures are refreshed.
At most SHORTLIST + RECENT + RANDOM_D = SAMPLE_ABOVE upstreams are scored: never more than an exact pick on the
largest pool that is still scored exactly. The candidates are then filtered and scored by the router exactly as in the small-pool path; when none of them
can take the request the router falls back to the exact scan, so refusals (saturated, rate limited, cooldown,
too large) are the same as before.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable

from gateway.state.fleet import Pool
from gateway.state.stats import UpstreamStats

SAMPLE_ABOVE = 16
SHORTLIST = 6
RECENT = 4
RANDOM_D = 6


class CandidateIndex:
    """Ranked upstreams of one pool. `rank(u)` is the pool's score of u for a typical request (higher = better)."""

    def __init__(self, pool: Pool, rank: Callable[[UpstreamStats], float], rng: random.Random | None = None) -> None:
        self.pool = pool
        self.rank = rank
        self.rng = rng or random.Random()
        self._by_name = {u.name: u for u in pool.upstreams}
        self._key: dict[str, float] = {}
        self.shortlist: list[UpstreamStats] = []
        self.recent: deque[UpstreamStats] = deque(maxlen=RECENT)
        self.update(self._by_name)

    def freed(self, u: UpstreamStats) -> None:
        """`u` just freed a slot (request path: O(1))."""
        if not self.recent or self.recent[-1] is not u:
            self.recent.append(u)

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
        """The shortlist, the recently freed and RANDOM_D others: a constant number, whatever the pool size."""
        ups = self.pool.upstreams
        out = list(self.shortlist)
        seen = {u.name for u in out}
        for u in self.recent:
            if u.name not in seen:
                out.append(u)
                seen.add(u.name)
        want = len(out) + RANDOM_D
        for u in self.rng.sample(ups, min(want, len(ups))):
            if u.name not in seen:
                out.append(u)
                seen.add(u.name)
                if len(out) >= want:
                    break
        return out


def sampled(pool: Pool, sample_above: int) -> bool:
    """Does this pool take the sampled path? Only the throughput strategy scores; the others stay exact."""
    return pool.strategy == "throughput" and len(pool.upstreams) > sample_above
