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

#: Most streams preempted for one request (more than one only when the interactive limit fell below the load).
MAX_VICTIMS = 4

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
    preempted: bool = False
    #: The request it was preempted for (several victims may be stopped for one request).
    claimant: RequestContext | None = None

    @property
    def written(self) -> int:
        """Tokens of output the attempt has relayed so far (one chunk per token on the engines it runs on)."""
        return len(self.outcome.text)

    @property
    def loss(self) -> int:
        """What preempting it costs the engine: its continuation prefills the prompt and everything written."""
        return self.ctx.est.prompt_tokens + self.written


def continues(u: UpstreamStats) -> bool:
    """Does `u` take a continuation (vLLM's continue_final_message)? GPU engines behind the OpenAI protocol."""
    return u.cfg.kind == "gpu" and u.cfg.provider == "openai"


def preemptible(ctx: RequestContext, cls: ServiceClass, u: UpstreamStats) -> bool:
    """Could this request be preempted on `u` and resumed seamlessly (see the module docstring), and not yet
    `max_preemptions` times? The one test: for registering the attempt, and for letting it use the room."""
    b, r = ctx.body, ctx.resume
    return (
        (r.preemptions if r is not None else 0) < cls.max_preemptions and continues(u) and ctx.operation == "chat" and ctx.native is None
        and not b.get("tools") and not b.get("functions") and (b.get("n") or 1) == 1 and not b.get("logprobs")
    )


def choose_victims(running: Iterable[Running], k: int) -> list[Running]:
    """The `k` requests whose preemption costs least: the fewest tokens to prefill again (prompt + written), then
    the fewest preemptions so far. Not one already being stopped."""
    cands = [r for r in running if not r.preempted]
    return sorted(cands, key=lambda r: (r.loss, r.preempted_before))[:k] if k > 0 else []


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
        """Preempt lower-class streams on the upstream where `ctx` would then fit its class's targets at the least
        cost: the upstream (whose slots come back as the victims' attempts end, waking the queue), or None when
        none would do.

        Usually one stream: batch fills an upstream only up to its interactive limit. But the limit follows the
        fitted curve, and a refit may lower it below the load batch already holds: then the request needs that many
        more slots, and waiting for batch answers to end (~12 s) would miss its TTFT target (at most MAX_VICTIMS)."""
        cls = pool.cfg.classes[ctx.service_class]
        best: tuple[int, UpstreamStats, list[Running]] | None = None
        for u in pool.upstreams:
            if u.name in exclude:
                continue
            mine = self.running.get(u.name, ())
            need = policy.slots_short(u, cls, ctx, _pending(mine))
            if not need or need > MAX_VICTIMS:  # 0: its load is not what keeps the request off it
                continue
            victims = choose_victims((r for r in mine if _lower(pool, r, cls)), need)
            cost = sum(v.loss for v in victims)
            if len(victims) == need and (best is None or cost < best[0]):
                best = (cost, u, victims)
        if best is None:
            return None
        _, u, victims = best
        for v in victims:
            v.preempted, v.claimant = True, ctx
            v.stop()
        self.count[u.name] = self.count.get(u.name, 0) + len(victims)
        return u


def _pending(mine: Iterable[Running]) -> int:
    """Slots on an upstream that are already spoken for: each request that preempted there takes one of the slots
    being freed, the others (when it needed several) only bring the load down; so the load as it will be once the
    victims are gone and those requests placed is load - stopping + claimants, and this is stopping - claimants."""
    stopping = [r for r in mine if r.preempted]
    return len(stopping) - len({id(r.claimant) for r in stopping})


def _lower(pool: Pool, r: Running, cls: ServiceClass) -> bool:
    """Only a class served after the preempting one's (a larger priority number) is preempted for it."""
    return pool.cfg.classes[r.ctx.service_class].priority > cls.priority
