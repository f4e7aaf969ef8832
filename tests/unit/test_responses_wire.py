"""Pure translation of the Responses API to chat completions and back (gateway/dialects/responses.py), the
translation policy (gateway/upstream/policy.py) and header selection (gateway/upstream/headers.py)."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.context import Estimate, RequestContext
from gateway.dialects.responses import (
    ChatStreamToResponses,
    ResponsesRequestError,
    assistant_message,
    chat_to_response,
    responses_request_to_chat,
)
from gateway.errors import GatewayError
from gateway.upstream import provider_for
from gateway.upstream.headers import client_key, forwarded, relayed
from gateway.upstream.policy import DROPPED_HEADER, fit


def test_input_items_become_chat_messages():
    body = {
        "model": "m", "instructions": "be brief", "max_output_tokens": 9, "temperature": 0.2,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}, {"type": "input_image", "image_url": "https://x/i.png"}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
        "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "weather"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}},
    }
    chat, meta = responses_request_to_chat(body, history=[{"role": "user", "content": "earlier"}])
    msgs = chat["messages"]
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1] == {"role": "user", "content": "earlier"}
    assert msgs[2]["content"][1] == {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "auto"}}
    assert [c["id"] for c in msgs[3]["tool_calls"]] == ["c1", "c2"]  # consecutive calls share one assistant turn
    assert msgs[4] == {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
    assert chat["max_tokens"] == 9 and chat["temperature"] == 0.2
    assert chat["tools"][0]["function"]["name"] == "weather"
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"]["json_schema"]["name"] == "w"
    assert meta.turn == msgs[1:]  # instructions are not part of the stored conversation


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"model": "m", "input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
    ({"model": "m", "input": "x", "truncation": "auto"}, "truncation"),
    ({"model": "m"}, "input"),
])
def test_what_cannot_be_honoured_is_named(body, param):
    with pytest.raises(ResponsesRequestError) as e:
        responses_request_to_chat(body)
    assert e.value.param == param


def _chunk(delta=None, finish=None, usage=None):
    c = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "up-model", "choices": []}
    if delta is not None or finish:
        c["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage:
        c["usage"] = usage
    return c


def _events(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_stream_events_text_then_tool_call_validate_as_sdk_objects():
    _, meta = responses_request_to_chat({"model": "m", "input": "x"})
    enc = ChatStreamToResponses(meta)
    raw = enc.feed(_chunk({"role": "assistant", "content": "Hel"})) + enc.feed(_chunk({"content": "lo"}))
    raw += enc.feed(_chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}]}))
    raw += enc.feed(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}, finish="tool_calls"))
    raw += enc.feed(_chunk(usage={"prompt_tokens": 4, "completion_tokens": 6}))
    raw += enc.done()
    ev = _events(raw)
    assert [e["sequence_number"] for e in ev] == list(range(len(ev)))
    for e in ev:  # every event is valid by the SDK's own (strict) event models
        TypeAdapter(ResponseStreamEvent).validate_python(e)
    kinds = [e["type"] for e in ev]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    final = Response.model_validate(ev[-1]["response"])  # the SDK's own model accepts it
    assert final.status == "completed" and final.output_text == "Hello" and final.model == "up-model"
    assert final.output[1].type == "function_call" and final.output[1].arguments == '{"a":1}'
    assert final.usage is not None and final.usage.total_tokens == 10
    assert assistant_message(ev[-1]["response"])["tool_calls"][0]["id"] == "call_1"


def test_failed_stream_and_non_streamed_body():
    _, meta = responses_request_to_chat({"model": "m", "input": "x"})
    enc = ChatStreamToResponses(meta)
    ev = _events(enc.feed(_chunk({"content": "a"})) + enc.failed("server_error", "upstream timed out"))
    TypeAdapter(ResponseStreamEvent).validate_python(ev[-1])
    assert ev[-1]["type"] == "response.failed" and ev[-1]["response"]["error"]["code"] == "server_error"
    chat = {"model": "up", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}}}
    r = Response.model_validate(chat_to_response(chat, meta))
    assert r.status == "incomplete" and r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.input_tokens_details.cached_tokens == 1
    assert meta.final is not None and meta.final["id"] == r.id


def _ctx(body: dict, **kw) -> RequestContext:
    return RequestContext("chat", body["model"], body, False, False, "openai", Estimate(1, 1), **kw)


def test_policy_refuses_or_drops_and_lists():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1, "n": 1, "top_k": 3}
    ant, oa = provider_for("anthropic"), provider_for("openai")
    with pytest.raises(GatewayError) as e:
        fit(_ctx(body), ant, drop=False)
    assert e.value.status == 400 and e.value.param == "seed" and "seed" in e.value.message
    ctx = _ctx(body)
    out = fit(ctx, ant, drop=True)
    assert "seed" not in out and out["top_k"] == 3 and ctx.response_headers[DROPPED_HEADER] == "seed"
    assert fit(_ctx(body), oa, drop=False) is body  # OpenAI-compatible upstreams take the canonical body
    ctx = _ctx(body, extras={"foreign": ["thinking"]})
    with pytest.raises(GatewayError, match="thinking"):
        fit(ctx, oa, drop=False)


def test_header_selection():
    up = {"x-ratelimit-remaining-tokens": "5", "Anthropic-Ratelimit-Requests-Limit": "9", "request-id": "r1",
          "openai-processing-ms": "12", "x-request-id": "u1", "set-cookie": "s", "server": "x"}
    assert relayed(up) == {"x-ratelimit-remaining-tokens": "5", "anthropic-ratelimit-requests-limit": "9", "request-id": "r1",
                           "openai-processing-ms": "12", "x-upstream-request-id": "u1"}
    client = CIMultiDict({"anthropic-beta": "b", "x-other": "o", "authorization": "Bearer sk-c"})
    assert forwarded(client, ["anthropic-beta", "openai-project"]) == {"anthropic-beta": "b"}
    assert client_key(client, gateway_keys_required=False) == "sk-c"
    assert client_key(client, gateway_keys_required=True) is None
    client["X-Upstream-Api-Key"] = "sk-u"
    assert client_key(client, gateway_keys_required=True) == "sk-u"
