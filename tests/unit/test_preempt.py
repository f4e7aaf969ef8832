"""Preemption and resumption, pure: the victim choice, where a request with targets preempts, how batch lends the
interactive room, the continuation's body and estimate, the stitched stream and the assembled body, and the
simulator's reading of a continuation."""

from __future__ import annotations

import pytest

from gateway.context import Estimate, RequestContext
from gateway.routing.classes import PREEMPT_ROOM
from gateway.routing.preempt import MAX_VICTIMS, Running, choose_victims, preemptible
from gateway.routing.router import Refusal
from gateway.sim import SimConfig
from gateway.sim.engine import GpuEngine
from gateway.sim.server import BadRequest, parse_job
from gateway.state.measure import Outcome
from gateway.upstream.resume import Resume, continuation_body, continuation_estimate, stitch, whole_body

from .test_classes import FLOOR40, fill, fleet_of, req

MSGS = [{"role": "user", "content": "hi"}]


def running(written: int, before: int = 0, prompt: int = 100, stopped: list | None = None) -> Running:
    """A registered-looking batch attempt; stopping it appends it to `stopped`."""
    r = Running(req("batch", prompt=prompt), Outcome(text=[" x"] * written), lambda: None, before)
    if stopped is not None:
        r.stop = lambda: stopped.append(r)
    return r


# ---- the victim --------------------------------------------------------------------------------------------
def test_victims_are_the_cheapest_to_resume() -> None:
    few, many, long_prompt = running(10), running(300), running(5, prompt=1000)
    assert choose_victims([many, long_prompt, few], 1) == [few], "fewest tokens to prefill again (prompt + written)"
    assert choose_victims([many, long_prompt, few], 2) == [few, many]
    again = running(10, before=1)
    assert choose_victims([again, few], 1) == [few], "on a tie, the one preempted fewer times"
    few.preempted = True
    assert choose_victims([few, many], 1) == [many], "one already being stopped is not chosen twice"
    assert choose_victims([few], 1) == [] and choose_victims([many], 0) == []


def test_preemptible_only_plain_chat_on_gpu_engines_and_within_max_preemptions() -> None:
    fleet, _ = fleet_of({"A": 64}, FLOOR40, preempt=2)
    cls, gpu = fleet.pools["m"].cfg.classes["batch"], fleet.upstreams["A"]
    ctx = req("batch")
    assert preemptible(ctx, cls, gpu)
    ctx.resume = Resume({}, ctx.est, preemptions=2)
    assert not preemptible(ctx, cls, gpu), "preempted max_preemptions times: it runs to its end"
    assert not preemptible(req("batch"), cls.model_copy(update={"max_preemptions": 0}), gpu)
    for body in ({"tools": [{}]}, {"n": 2}, {"logprobs": True}):
        assert not preemptible(RequestContext("chat", "m", body, True, False, "openai", Estimate(1, 1)), cls, gpu)
    gpu.cfg.kind = "hosted"
    assert not preemptible(req("batch"), cls, gpu), "a hosted API takes no continuation"


def register(router, name: str, n: int, stopped: list | None = None) -> list[Running]:
    out = [running(50 + i, stopped=stopped) for i in range(n)]
    for r in out:
        router.preemptions.add(name, r)
    return out


def test_interactive_preempts_one_batch_stream_per_waiting_request_where_it_then_fits() -> None:
    fleet, router = fleet_of({"A": 64}, FLOOR40, preempt=2)
    pool = fleet.pools["m"]
    fill(router, fleet, "A", 10, "interactive")
    fill(router, fleet, "A", 30, "batch")  # at the interactive limit (40)
    stopped: list[Running] = []
    victims = register(router, "A", 30, stopped)
    with pytest.raises(Refusal):
        router.pick(pool, req("interactive"))
    assert router.preemptions.make_room(pool, req("interactive"), router.classes, frozenset()) is fleet.upstreams["A"]
    assert victims[0].preempted and stopped == [victims[0]]  # the one that wrote least
    assert router.preemptions.make_room(pool, req("interactive"), router.classes, frozenset()) is fleet.upstreams["A"]
    assert victims[1].preempted, "a second waiting request needs its own victim"
    assert router.preemptions.make_room(pool, req("interactive"), router.classes, frozenset({"A"})) is None
    assert router.preemptions.make_room(pool, req("batch"), router.classes, frozenset()) is None, "only for a better class"
    assert router.preemptions.count == {"A": 2}


def test_as_many_victims_as_the_limit_needs_but_few() -> None:
    """A refit may lower the interactive limit below the load batch holds: then more than one stream must end."""
    fleet, router = fleet_of({"A": 64}, FLOOR40, preempt=2)
    fill(router, fleet, "A", 10, "interactive")
    fill(router, fleet, "A", 32, "batch")  # 42: two over the limit of 40
    victims = register(router, "A", 32)
    assert router.preemptions.make_room(fleet.pools["m"], req("interactive"), router.classes, frozenset()) is fleet.upstreams["A"]
    assert [v.preempted for v in victims[:4]] == [True, True, True, False] and router.preemptions.count == {"A": 3}
    fleet2, router2 = fleet_of({"A": 64}, FLOOR40, preempt=2)
    fill(router2, fleet2, "A", 10, "interactive")
    fill(router2, fleet2, "A", 30 + MAX_VICTIMS, "batch")  # one slot more than MAX_VICTIMS to free: wait instead
    register(router2, "A", 30 + MAX_VICTIMS)
    assert router2.preemptions.make_room(fleet2.pools["m"], req("interactive"), router2.classes, frozenset()) is None


def test_preemptible_batch_lends_the_room_up_to_the_interactive_limit() -> None:
    fleet, router = fleet_of({"A": 64}, FLOOR40, preempt=2)
    pool = fleet.pools["m"]
    fill(router, fleet, "A", 10, "interactive")
    router.classes.observe(pool)
    fill(router, fleet, "A", 29 - PREEMPT_ROOM, "batch")  # the Erlang C room would hold batch far below this
    assert router.pick(pool, req("batch")).upstream.name == "A"
    fill(router, fleet, "A", 1, "batch")  # at the limit less the slots kept free: no further
    with pytest.raises(Refusal):
        router.pick(pool, req("batch"))
    tools = RequestContext("chat", "m", {"tools": [{"type": "function"}]}, True, False, "openai", Estimate(100, 64),
                           service_class="batch")
    fleet2, router2 = fleet_of({"A": 64}, FLOOR40, preempt=2)
    fill(router2, fleet2, "A", 10, "interactive")
    router2.classes.observe(fleet2.pools["m"])
    fill(router2, fleet2, "A", 26, "batch")
    with pytest.raises(Refusal):  # a tool call cannot be continued: the room is kept for it as before
        router2.pick(fleet2.pools["m"], tools)


# ---- the continuation ----------------------------------------------------------------------------------------
def test_continuation_body_and_estimate() -> None:
    body = {"model": "m", "messages": MSGS, "max_tokens": 100, "stream": True}
    out = continuation_body(body, " the sea", 2)
    assert out["messages"] == [*MSGS, {"role": "assistant", "content": " the sea"}]
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False
    assert out["max_tokens"] == 98 and body["max_tokens"] == 100 and body["messages"] == MSGS
    own = {"messages": [*MSGS, {"role": "assistant", "content": "Once"}], "continue_final_message": True,
           "max_completion_tokens": 10}
    out = continuation_body(own, " upon", 1)
    assert out["messages"][-1] == {"role": "assistant", "content": "Once upon"} and out["max_completion_tokens"] == 9
    assert continuation_estimate(Estimate(200, 512, "chat", 512), 100) == Estimate(300, 412, "chat", 412)


def resumed(tokens: int = 3) -> Resume:
    r = Resume({"messages": MSGS}, Estimate(10, 8))
    r.absorb(Outcome(text=[" a", " b", " c"][:tokens], response_id="chatcmpl-1", response_created=7, response_model="m1"))
    return r


def test_stitched_chunks_continue_the_first_response() -> None:
    r = resumed()
    assert (r.tokens, r.preemptions, r.ident) == (3, 1, {"id": "chatcmpl-1", "created": 7, "model": "m1"})
    role = {"id": "chatcmpl-2", "created": 9, "model": "m2", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert stitch(role, r) is None, "the client already had its role chunk"
    tok = {"id": "chatcmpl-2", "created": 9, "model": "m2", "choices": [{"index": 0, "delta": {"content": " d"}, "finish_reason": None}]}
    assert stitch(tok, r) == {**tok, "id": "chatcmpl-1", "created": 7, "model": "m1"}
    usage = {"id": "chatcmpl-2", "choices": [], "usage": {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}}
    assert stitch(usage, r)["usage"] == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}


def test_whole_body_joins_the_attempts() -> None:
    out = Outcome(text=[" d", " e"], finish_reasons=["length"], input_tokens=13, output_tokens=2, response_id="chatcmpl-2")
    body = whole_body(out, resumed())
    assert body["id"] == "chatcmpl-1" and body["choices"][0]["message"]["content"] == " a b c d e"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    alone = whole_body(Outcome(text=[" z"], input_tokens=4, output_tokens=1, response_id="x", response_created=1), None)
    assert alone["usage"]["completion_tokens"] == 1 and alone["choices"][0]["finish_reason"] == "stop"


# ---- the simulator ------------------------------------------------------------------------------------------
def test_simulator_continues_the_final_assistant_message() -> None:
    sim = GpuEngine(SimConfig())
    msgs = [{"role": "user", "content": "x" * 40 + " STOP_AFTER_10"}]
    plain = parse_job("chat", {"messages": msgs, "max_tokens": 50}, sim, "m")
    cont = parse_job("chat", {"messages": [*msgs, {"role": "assistant", "content": " the of and"}], "max_tokens": 47,
                              "continue_final_message": True, "add_generation_prompt": False}, sim, "m")
    assert (plain.n, plain.finish) == (10, "stop")
    assert (cont.n, cont.finish) == (7, "stop"), "the 3 tokens written count toward STOP_AFTER_10"
    assert cont.prompt_tokens == plain.prompt_tokens + 3
    with pytest.raises(BadRequest):  # as vLLM: add_generation_prompt defaults to true
        parse_job("chat", {"messages": [*msgs, {"role": "assistant", "content": "a"}], "continue_final_message": True}, sim, "m")
    with pytest.raises(BadRequest):
        parse_job("chat", {"messages": msgs, "continue_final_message": True, "add_generation_prompt": False}, sim, "m")
