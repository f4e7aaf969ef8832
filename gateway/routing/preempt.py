"""Preemption of batch-class streams on GPU upstreams, so that an interactive request never waits for their end.

Why. A batch answer holds its slot for many seconds (512 tokens at the knee: ~12 s), so without preemption the
only way to meet an interactive TTFT target during a burst is to keep slots idle for it (the Erlang C room of
classes.py), and every idle slot is throughput lost. With preemption the room can be lent to batch work: when an
interactive request cannot be placed within its targets and a GPU upstream is at its interactive limit because of
batch streams, the gateway ends one of them there (closing its upstream connection frees the engine's slot at once)
and the interactive request takes the slot. The preempted request is not failed: the proxy resumes it as a
continuation (gateway/upstream/resume.py), so the engine's work so far is kept except for one prefill of what it
wrote.

Who can be preempted: requests of a class with `max_preemptions` > 0, on a `kind: gpu` upstream (the continuation
needs vLLM's `continue_final_message`: a hosted API would not take it), chat requests answered as plain text (no
tools, one choice, no logprobs: a partial tool call or logprob list cannot be continued seamlessly). Each request is
preempted at most `max_preemptions` times, so none starves. Who preempts: a request of a class with targets and a
better priority, after the router found no upstream meeting them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import ServiceClass
    from gateway.context import RequestContext
    from gateway.routing.classes import ClassPolicy
    from gateway.state.fleet import Pool
    from gateway.state.measure import Outcome
    from gateway.state.stats import UpstreamStats


@dataclass(slots=True, eq=False)
class Running:
    """A preemptible attempt in flight: what the victim choice reads, and how to end it."""

    ctx: RequestContext
    outcome: Outcome
    #: Ends the attempt's upstream request (closes its connection: the engine frees the sequence's slot).
    stop: Callable[[], None]
    #: Times this request was preempted before (its continuation's count).
    preempted_before: int
    limit: int  # max_preemptions of its class
    preempted: bool = False

    @property
    def written(self) -> int:
        """Tokens of output the attempt has relayed so far (one chunk per token on the engines it runs on)."""
        return len(self.outcome.text)

    @property
    def loss(self) -> int:
        """What preempting it costs the engine: its continuation prefills the prompt and everything written."""
        return self.ctx.est.prompt_tokens + self.written


def preemptible(ctx: RequestContext, cls: ServiceClass, u: UpstreamStats) -> bool:
    """Could this request be preempted on `u` and resumed seamlessly (see the module docstring)?"""
    b = ctx.body
    return (
        cls.max_preemptions > 0 and u.cfg.kind == "gpu" and ctx.operation == "chat" and ctx.native is None
        and not b.get("tools") and not b.get("functions") and (b.get("n") or 1) == 1 and not b.get("logprobs")
    )


def choose_victim(running: Iterable[Running]) -> Running | None:
    """The request whose preemption costs least: the fewest tokens to prefill again (prompt + written), then the
    fewest preemptions so far. Not one preempted `limit` times already, nor one already being stopped."""
    cands = [r for r in running if not r.preempted and r.preempted_before < r.limit]
    return min(cands, key=lambda r: (r.loss, r.preempted_before), default=None)


@dataclass(slots=True)
class Preemptions:
    """The preemptible attempts running on each upstream, and the one way to preempt one of them."""

    running: dict[str, set[Running]] = field(default_factory=dict)
    #: upstream -> preemptions decided there (gateway_preemptions_total is counted by the metrics subscriber).
    count: dict[str, int] = field(default_factory=dict)

    def add(self, upstream: str, r: Running) -> None:
        self.running.setdefault(upstream, set()).add(r)

    def discard(self, upstream: str, r: Running) -> None:
        s = self.running.get(upstream)
        if s is not None:
            s.discard(r)

    def make_room(self, pool: Pool, ctx: RequestContext, policy: ClassPolicy, exclude: frozenset[str]) -> UpstreamStats | None:
        """Preempt one batch stream on an upstream where `ctx` would then fit its class's targets; the upstream
        (whose slot comes back when the victim's attempt ends, waking the queue), or None when none would do."""
        cls = pool.cfg.classes[ctx.service_class]
        best: tuple[int, UpstreamStats, Running] | None = None
        for u in pool.upstreams:
            if u.name in exclude or not self._fits_after_one(u, cls, ctx, policy, pool):
                continue
            v = choose_victim(r for r in self.running.get(u.name, ()) if _lower(pool, r, cls))
            if v is not None and (best is None or v.loss < best[0]):
                best = (v.loss, u, v)
        if best is None:
            return None
        _, u, v = best
        v.preempted = True
        self.count[u.name] = self.count.get(u.name, 0) + 1
        v.stop()
        return u

    def _fits_after_one(self, u: UpstreamStats, cls: ServiceClass, ctx: RequestContext, policy: ClassPolicy, pool: Pool) -> bool:
        """Would `ctx` meet its targets on `u` with one more slot freed? Slots already being freed by preemptions
        there are counted as taken: each waiting request needs its own victim."""
        stopping = sum(1 for r in self.running.get(u.name, ()) if r.preempted)
        return policy.fits_once_freed(u, cls, ctx, stopping + 1)


def _lower(pool: Pool, r: Running, cls: ServiceClass) -> bool:
    """Only a class served after the preempting one's (a larger priority number) is preempted for it."""
    return pool.cfg.classes[r.ctx.service_class].priority > cls.priority
