"""Resuming a preempted request (gateway/routing/preempt.py) as a continuation the client cannot tell apart.

The continuation is the original request plus what was written so far as a final assistant message, with vLLM's
`continue_final_message: true` and `add_generation_prompt: false` (the chat template then renders that message
open-ended, and generation picks up where it stopped), and max_tokens reduced by the tokens already written. Only
GPU (vLLM-style) upstreams take it: a hosted API rejects the two fields, or would answer the partial message anew
as a next turn, so a continuation is never sent to one (the proxy excludes them).

The client sees one response. Streams: the continuation's chunks carry the first attempt's id, created and model,
its role chunk is dropped (the client already had one), and its usage is the whole answer's: completion tokens =
everything written, prompt tokens = the original prompt's (the continuation's prompt minus the written tokens it
contains; exact where the engine tokenizes the partial answer as the gateway counts it, within a token or two of
template joins otherwise). Non-streamed: a preemptible request is asked of the upstream as a stream (so what was
written survives a preemption), and its chunks are assembled here into one chat.completion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.context import Estimate
from gateway.tokens import count_text

if TYPE_CHECKING:
    from gateway.dialects.client_stream import ClientStream
    from gateway.state.measure import Outcome

_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")


@dataclass(slots=True)
class Resume:
    """A request preempted at least once: its original body and estimate, and what all its attempts wrote."""

    body: dict
    est: Estimate
    text: list[str] = field(default_factory=list)
    tokens: int = 0  # output tokens written so far
    preemptions: int = 0
    #: id, created and model of the response as the client first saw them.
    ident: dict[str, Any] = field(default_factory=dict)
    #: The client stream's encoder, kept across attempts (the Anthropic and Responses ones hold state).
    enc: ClientStream | None = None

    def absorb(self, out: Outcome) -> None:
        """Take in what a preempted attempt wrote."""
        if not self.ident and out.response_id is not None:
            self.ident = {"id": out.response_id, "created": out.response_created, "model": out.response_model}
        written = "".join(out.text)
        self.text.append(written)
        self.tokens += count_text(written)
        self.preemptions += 1

    def continuation(self) -> tuple[dict, Estimate]:
        """The body and estimate of the next attempt."""
        return continuation_body(self.body, "".join(self.text), self.tokens), continuation_estimate(self.est, self.tokens)


def continuation_body(body: dict, written: str, tokens: int) -> dict:
    """`body` continued after `written` (`tokens` long): see the module docstring. A request that itself ended
    on an assistant message to continue (a client's own prefill) gets `written` appended to that message."""
    messages = list(body["messages"])
    if body.get("continue_final_message") and messages and messages[-1].get("role") == "assistant":
        last = messages[-1]
        messages[-1] = {**last, "content": (last.get("content") or "") + written}
    else:
        messages.append({"role": "assistant", "content": written})
    out = {**body, "messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    for k in _LIMIT_FIELDS:
        if isinstance(out.get(k), int):
            out[k] = max(1, out[k] - tokens)
    return out


def continuation_estimate(est: Estimate, tokens: int) -> Estimate:
    """The continuation prefills the written tokens too, and has that many fewer to write."""
    left = max(1, est.output_tokens - tokens)
    cap = None if est.max_tokens is None else max(1, est.max_tokens - tokens)
    return Estimate(est.prompt_tokens + tokens, left, est.operation, cap)


def whole_usage(usage: dict, tokens: int) -> dict:
    """A continuation's usage as the whole answer's: its prompt held the `tokens` written before."""
    prompt = max(0, int(usage.get("prompt_tokens") or 0) - tokens)
    completion = int(usage.get("completion_tokens") or 0) + tokens
    return {**usage, "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stitch(c: dict, r: Resume) -> dict | None:
    """A continuation's stream chunk as part of the first response (None: nothing left to send)."""
    out = {**c, **r.ident}
    choices = []
    for ch in c.get("choices") or ():
        delta = ch.get("delta")
        if isinstance(delta, dict) and "role" in delta:
            delta = {k: v for k, v in delta.items() if k != "role"}
            ch = {**ch, "delta": delta}
            if not any(delta.values()) and ch.get("finish_reason") is None:
                continue  # the continuation's opening role chunk
        choices.append(ch)
    out["choices"] = choices
    if isinstance(c.get("usage"), dict):
        out["usage"] = whole_usage(c["usage"], r.tokens)
    return out if choices or "usage" in out else None


def whole_body(out: Outcome, r: Resume | None) -> dict:
    """A chat.completion assembled from a streamed attempt (and what earlier attempts wrote)."""
    ident = r.ident if r is not None and r.ident else {"id": out.response_id, "created": out.response_created, "model": out.response_model}
    before = "".join(r.text) if r is not None else ""
    finish = out.finish_reasons[-1] if out.finish_reasons else "stop"
    msg = {"role": "assistant", "content": before + "".join(out.text)}
    body: dict[str, Any] = {**ident, "object": "chat.completion",
                            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}]}
    if out.input_tokens is not None:
        usage: dict[str, Any] = {"prompt_tokens": out.input_tokens, "completion_tokens": out.output_tokens}
        if out.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": out.cached_tokens}
        body["usage"] = whole_usage(usage, r.tokens if r is not None else 0)
    return body
