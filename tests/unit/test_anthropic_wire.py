"""Tests for gateway.dialects.anthropic_wire (OpenAI chat <-> Anthropic Messages)."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from anthropic.types import Message
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.dialects.anthropic_wire import (
    ChatStreamToMessages,
    MessagesStreamToChat,
    UpstreamStreamError,
    chat_request_to_messages,
    chat_response_to_messages,
    messages_request_to_chat,
    messages_response_to_chat,
    sse_event,
    untranslated_fields,
)

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


# ============================================================ helpers


@asynccontextmanager
async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """Run a throwaway aiohttp server on 127.0.0.1:0 answering every POST with ``handler``."""
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def write_sse(request: web.Request, payloads: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for payload in payloads:
        await resp.write(payload)
    await resp.write_eof()
    return resp


def openai_sse(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def anthropic_events_text_and_tools() -> list[tuple[str, dict[str, Any]]]:
    """A realistic Anthropic stream: thinking, text, two tool_use blocks, with pings."""
    return [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01ABC",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 20,
                        "cache_read_input_tokens": 5,
                        "cache_creation_input_tokens": 0,
                        "output_tokens": 1,
                    },
                },
            },
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("ping", {"type": "ping"}),
        ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Let me "}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "check."}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
        ),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": 'ris"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}}},
        ),
        ("content_block_delta", {"type": "content_block_delta", "index": 3, "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 3}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 42}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-xyz",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "up-model",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    body.update(extra)
    return body


def openai_chunks_text_and_tools() -> list[dict[str, Any]]:
    """A realistic OpenAI stream: role, text, two parallel tool calls, finish, usage chunk."""
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking "}),
        chunk({"content": "weather."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}),
        chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 31, "completion_tokens": 17, "total_tokens": 48}),
    ]


# ============================================================ direction 1: request


def test_chat_request_basic_fields_and_system() -> None:
    body = {
        "model": "gw-model",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "Hi"},
        ],
        "max_completion_tokens": 100,
        "max_tokens": 5,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop": "END",
        "stream": True,
        "user": "u-42",
        "n": 1,
        "frequency_penalty": 0.5,
        "response_format": {"type": "text"},
        "logit_bias": {"1": 2},
    }
    original = copy.deepcopy(body)
    req = chat_request_to_messages(body, "claude-sonnet-4-5")
    assert req == {
        "model": "claude-sonnet-4-5",
        "system": "You are terse.\n\nAnswer in French.",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 100,
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "u-42"},
    }
    assert body == original, "input must not be mutated"


def test_chat_request_defaults() -> None:
    req = chat_request_to_messages({"messages": [{"role": "user", "content": "Hi"}]}, "m")
    assert req == {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4096}
    req = chat_request_to_messages({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "stop": ["a", "b"], "stream": False}, "m")
    assert req["max_tokens"] == 7 and req["stop_sequences"] == ["a", "b"] and req["stream"] is False


def test_chat_request_temperature_clamped() -> None:
    req = chat_request_to_messages({"messages": [{"role": "user", "content": "x"}], "temperature": 1.7}, "m")
    assert req["temperature"] == 1.0


def test_chat_request_merges_consecutive_roles() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "a1"},
            {"role": "assistant", "content": "a2"},
            {"role": "user", "content": "three"},
        ]
    }
    req = chat_request_to_messages(body, "m")
    assert req["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}, {"type": "text", "text": "a2"}]},
        {"role": "user", "content": "three"},
    ]
    # Merging must not leak into the caller's content lists.
    assert body["messages"][1]["content"] == [{"type": "text", "text": "two"}]


def test_chat_request_system_in_middle_keeps_alternation() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "b"},
        ]
    }
    req = chat_request_to_messages(body, "m")
    assert req["system"] == "sys"
    assert req["messages"] == [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


def test_chat_request_drops_empty_messages() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "q2"},
        ]
    }
    req = chat_request_to_messages(body, "m")
    assert req["messages"] == [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "text", "text": "q2"}]}]


def test_chat_request_image_parts() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ]
    }
    req = chat_request_to_messages(body, "m")
    assert req["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}},
        {"type": "image_url", "image_url": {"url": "ftp://example.com/x.png"}},
        {"type": "image_url", "image_url": {}},
        {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
    ],
)
def test_chat_request_bad_parts(part: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        chat_request_to_messages({"messages": [{"role": "user", "content": [part]}]}, "m")


def test_chat_request_tool_calls_and_results() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "22C"}]},
            {"role": "user", "content": "Thanks, which is warmer?"},
        ],
        "tools": [WEATHER_TOOL],
    }
    req = chat_request_to_messages(body, "m")
    assert req["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "22C"}]},
                {"type": "text", "text": "Thanks, which is warmer?"},
            ],
        },
    ]
    assert req["tools"] == [
        {
            "name": "get_weather",
            "description": "Get the weather",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert "tool_choice" not in req


def test_chat_request_assistant_only_tool_calls_and_null_content() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "c", "content": ""},
        ]
    }
    req = chat_request_to_messages(body, "m")
    assert req["messages"][1] == {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]}
    assert req["messages"][2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c"}]}


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ({"type": "function", "function": {"name": "g"}}, False, {"type": "tool", "name": "g", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
        (None, None, None),
    ],
)
def test_chat_request_tool_choice(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    req = chat_request_to_messages(body, "m")
    assert req.get("tool_choice") == expected


def test_chat_request_tool_without_parameters_and_non_function_tools() -> None:
    body = {
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "ping"}}, {"type": "custom", "custom": {"name": "grammar"}}],
        "tool_choice": "auto",
    }
    req = chat_request_to_messages(body, "m")
    assert req["tools"] == [{"name": "ping", "input_schema": {"type": "object", "properties": {}}}]
    assert req["tool_choice"] == {"type": "auto"}


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"role": "system", "content": "only system"}]},
        {"messages": [{"role": "user", "content": ""}]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": ["not a dict"]},
        {"messages": [{"role": "tool", "content": "no id"}]},
        {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL], "tool_choice": "sometimes"},
    ],
)
def test_chat_request_invalid(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        chat_request_to_messages(body, "m")


def test_chat_request_only_system_error_message_is_clear() -> None:
    with pytest.raises(ValueError, match="no non-empty user or assistant messages"):
        chat_request_to_messages({"messages": [{"role": "system", "content": "s"}]}, "m")


# ============================================================ direction 1: response


def anthropic_message(content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int) -> dict[str, Any]:
    return {
        "id": "msg_01XYZ",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


def test_messages_response_text() -> None:
    resp = anthropic_message(
        [{"type": "thinking", "thinking": "...", "signature": "s"}, {"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    )
    out = messages_response_to_chat(resp, "gw-model")
    assert out["id"] == "chatcmpl-msg_01XYZ"
    assert out["object"] == "chat.completion"
    assert out["model"] == "claude-sonnet-4-5"  # the serving model's own name (README: response model field)
    assert isinstance(out["created"], int)
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "logprobs": None, "finish_reason": "stop"}
    ]
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    ChatCompletion.model_validate(out)


def test_messages_response_tool_use_only() -> None:
    resp = anthropic_message(
        [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        "tool_use",
        cache_read_input_tokens=100,
        cache_creation_input_tokens=7,
    )
    out = messages_response_to_chat(resp, "m")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert out["usage"] == {"prompt_tokens": 117, "completion_tokens": 5, "total_tokens": 122}
    parsed = ChatCompletion.model_validate(out)
    assert json.loads(parsed.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[index,union-attr]


def test_messages_response_empty_content() -> None:
    out = messages_response_to_chat(anthropic_message([], "max_tokens"), "m")
    assert out["choices"][0]["message"]["content"] == ""
    assert out["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
        (None, "stop"),
    ],
)
def test_messages_response_stop_map(stop: str | None, finish: str) -> None:
    resp = anthropic_message([{"type": "text", "text": "x"}])
    resp["stop_reason"] = stop
    assert messages_response_to_chat(resp, "m")["choices"][0]["finish_reason"] == finish


# ============================================================ direction 1: stream


def test_messages_stream_to_chat_sequence() -> None:
    conv = MessagesStreamToChat("gw-model", include_usage=True)
    chunks: list[dict[str, Any]] = []
    for name, data in anthropic_events_text_and_tools():
        chunks.extend(conv.feed(name, data))
    assert conv.finish() == []  # usage already emitted on message_stop
    assert conv.finish() == []

    assert all(c["id"] == "chatcmpl-msg_01ABC" and c["model"] == "claude-sonnet-4-5" for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Let me "},
        {"content": "check."},
        {"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"city": "Rome"}'}}]},
        {},
        None,
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 8 + ["tool_calls"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 25, "completion_tokens": 42, "total_tokens": 67}
    assert conv.usage == {"prompt_tokens": 25, "completion_tokens": 42, "total_tokens": 67}
    assert conv.finish_reason == "tool_calls"
    for c in chunks:
        ChatCompletionChunk.model_validate(c)


def test_messages_stream_to_chat_without_usage_and_without_message_stop() -> None:
    conv = MessagesStreamToChat("m", include_usage=False)
    events = [e for e in anthropic_events_text_and_tools() if e[0] != "message_stop"]
    chunks = [c for name, data in events for c in conv.feed(name, data)]
    assert all(c["choices"] for c in chunks)
    assert conv.finish() == []
    assert conv.usage is not None and conv.usage["completion_tokens"] == 42

    conv = MessagesStreamToChat("m", include_usage=True)
    for name, data in events:
        conv.feed(name, data)
    owed = conv.finish()
    assert len(owed) == 1 and owed[0]["choices"] == [] and owed[0]["usage"]["total_tokens"] == 67
    assert conv.finish() == []


def test_messages_stream_to_chat_message_delta_input_tokens_update() -> None:
    conv = MessagesStreamToChat("m", include_usage=True)
    conv.feed("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 3, "output_tokens": 0}}})
    conv.feed(
        "message_delta",
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9, "input_tokens": 11}},
    )
    assert conv.usage == {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}
    assert conv.finish_reason == "stop"


def test_messages_stream_to_chat_event_name_from_data() -> None:
    conv = MessagesStreamToChat("m", include_usage=False)
    out = conv.feed("", {"type": "message_start", "message": {"id": "msg_9", "usage": {"input_tokens": 1, "output_tokens": 1}}})
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_messages_stream_to_chat_role_chunk_only_once() -> None:
    conv = MessagesStreamToChat("m", include_usage=False)
    out = conv.feed("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}})
    assert [c["choices"][0]["delta"] for c in out] == [{"role": "assistant", "content": ""}, {"content": "hi"}]
    assert conv.feed("message_start", {"type": "message_start", "message": {"id": "msg_2", "usage": {"input_tokens": 1, "output_tokens": 0}}}) == []
    assert conv.feed("ping", {"type": "ping"}) == []


@pytest.mark.parametrize("stop", ["end_turn", "max_tokens", "refusal", "stop_sequence"])
def test_messages_stream_to_chat_finish_reason_map(stop: str) -> None:
    conv = MessagesStreamToChat("m", include_usage=False)
    out = conv.feed("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 1}})
    expected = {"end_turn": "stop", "max_tokens": "length", "refusal": "content_filter", "stop_sequence": "stop"}[stop]
    assert out[-1]["choices"][0]["finish_reason"] == expected == conv.finish_reason


def test_messages_stream_to_chat_error_event() -> None:
    conv = MessagesStreamToChat("m", include_usage=True)
    conv.feed(*anthropic_events_text_and_tools()[0])
    with pytest.raises(UpstreamStreamError, match="Overloaded") as info:
        conv.feed("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert info.value.error_type == "overloaded_error"
    assert info.value.message == "Overloaded"


async def test_messages_stream_to_chat_parsed_by_openai_sdk() -> None:
    """OpenAI SDK client -> (chat_request_to_messages) -> canned Anthropic stream -> chunks -> SDK."""
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen["anthropic_request"] = chat_request_to_messages(body, "claude-sonnet-4-5")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        conv = MessagesStreamToChat(body["model"], include_usage)
        chunks = [c for name, data in anthropic_events_text_and_tools() for c in conv.feed(name, data)]
        chunks += conv.finish()
        return await write_sse(request, openai_sse(chunks))

    async with serve(handler) as base:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"}]

        # Low level: create(stream=True) and accumulate by hand.
        stream = await client.chat.completions.create(
            model="gw-model", messages=messages, stream=True, stream_options={"include_usage": True}, tools=[WEATHER_TOOL]  # type: ignore[arg-type,list-item]
        )
        text, args, names, finish, usage = "", {}, {}, None, None
        async for ch in stream:
            if ch.usage:
                usage = ch.usage
            for choice in ch.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
                for tc in choice.delta.tool_calls or ():
                    args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")  # type: ignore[union-attr]
                    if tc.function and tc.function.name:
                        names[tc.index] = tc.function.name
        assert text == "Let me check."
        assert {i: json.loads(a) for i, a in args.items()} == {0: {"city": "Paris"}, 1: {"city": "Rome"}}
        assert names == {0: "get_weather", 1: "get_weather"}
        assert finish == "tool_calls"
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (25, 42, 67)

        # High level: the SDK's own accumulator.
        async with client.chat.completions.stream(
            model="gw-model", messages=messages, stream_options={"include_usage": True}, tools=[WEATHER_TOOL]  # type: ignore[arg-type,list-item]
        ) as s:
            final = await s.get_final_completion()
        msg = final.choices[0].message
        assert msg.content == "Let me check."
        assert [tc.id for tc in msg.tool_calls or ()] == ["toolu_1", "toolu_2"]
        assert [json.loads(tc.function.arguments) for tc in msg.tool_calls or ()] == [{"city": "Paris"}, {"city": "Rome"}]  # type: ignore[union-attr]
        assert final.choices[0].finish_reason == "tool_calls"
        assert final.usage is not None and final.usage.total_tokens == 67
        await client.close()

    req = seen["anthropic_request"]
    assert req["system"] == "sys" and req["stream"] is True and req["tools"][0]["name"] == "get_weather"


# ============================================================ direction 2: request


def test_messages_request_basic() -> None:
    body = {
        "model": "claude-x",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be nice.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 40,
        "stop_sequences": ["STOP"],
        "stream": True,
        "metadata": {"user_id": "u1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    original = copy.deepcopy(body)
    req = messages_request_to_chat(body)
    assert req == {
        "model": "claude-x",
        "messages": [{"role": "system", "content": "Be nice.\n\nBe brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.8,
        "top_k": 40,  # translated: vLLM/SGLang honour it, OpenAI refuses it loudly
        "stop": ["STOP"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u1",
    }
    assert untranslated_fields(body) == ["thinking"]  # no chat equivalent: the translation policy decides
    assert body == original


def test_messages_request_non_stream_and_string_system() -> None:
    req = messages_request_to_chat({"max_tokens": 1, "system": "S", "messages": [{"role": "user", "content": "q"}], "stream": False})
    assert req == {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], "max_tokens": 1, "stream": False}


def test_messages_request_content_blocks_and_images() -> None:
    body = {
        "max_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        ],
    }
    req = messages_request_to_chat(body)
    assert req["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]


def test_messages_request_tool_use_and_results() -> None:
    body = {
        "max_tokens": 100,
        "tools": [
            {"name": "get_weather", "description": "Get the weather", "input_schema": WEATHER_TOOL["function"]["parameters"]},
            {"name": "noargs", "input_schema": {"type": "object"}, "type": "custom"},
        ],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "...", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "noargs", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "line1"},
                            {"type": "text", "text": "line2"},
                            {"type": "image", "source": {"type": "url", "url": "https://example.com/chart.png"}},
                        ],
                    },
                    {"type": "text", "text": "Summarize."},
                ],
            },
        ],
    }
    req = messages_request_to_chat(body)
    assert req["messages"] == [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "toolu_2", "type": "function", "function": {"name": "noargs", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "line1\nline2"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/chart.png"}},
                {"type": "text", "text": "Summarize."},
            ],
        },
    ]
    assert req["tools"] == [
        WEATHER_TOOL,
        {"type": "function", "function": {"name": "noargs", "parameters": {"type": "object"}}},
    ]
    assert req["tool_choice"] == "auto"
    assert req["parallel_tool_calls"] is False


def test_messages_request_tool_results_only_and_tool_only_assistant() -> None:
    body = {
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
        ],
    }
    msgs = messages_request_to_chat(body)["messages"]
    assert msgs[1]["content"] is None
    assert msgs[2:] == [{"role": "tool", "tool_call_id": "t", "content": ""}]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_messages_request_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    body = {
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": choice,
    }
    req = messages_request_to_chat(body)
    assert req["tool_choice"] == expected
    assert "parallel_tool_calls" not in req


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}]},
        {"max_tokens": "10", "messages": [{"role": "user", "content": "x"}]},
        {"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
        {"max_tokens": True, "messages": [{"role": "user", "content": "x"}]},
        {"max_tokens": 10},
        {"max_tokens": 10, "messages": []},
        {"max_tokens": 10, "messages": {"role": "user"}},
        {"max_tokens": 10, "messages": [{"role": "system", "content": "x"}]},
        {"max_tokens": 10, "messages": [{"role": "user"}]},
        {"max_tokens": 10, "messages": ["x"]},
        {"max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
        {"max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
        {"max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}], "tool_choice": {"type": "tool"}},
    ],
)
def test_messages_request_invalid(body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        messages_request_to_chat(body)


def test_messages_request_missing_max_tokens_message() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        messages_request_to_chat({"messages": [{"role": "user", "content": "x"}]})


# ============================================================ direction 2: response


def chat_completion(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc123",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "up-model",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    }


def test_chat_response_to_messages_text_and_tools() -> None:
    resp = chat_completion(
        {
            "role": "assistant",
            "content": "Sure.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "oops"}},
            ],
        },
        "tool_calls",
    )
    out = chat_response_to_messages(resp, "claude-x")
    assert out == {
        "id": "msg_abc123",
        "type": "message",
        "role": "assistant",
        "model": "up-model",
        "content": [
            {"type": "text", "text": "Sure."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 8},
    }
    Message.model_validate(out)


@pytest.mark.parametrize(
    ("finish", "stop"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal"), (None, "end_turn")],
)
def test_chat_response_stop_map(finish: str | None, stop: str) -> None:
    resp = chat_completion({"role": "assistant", "content": "x"})
    resp["choices"][0]["finish_reason"] = finish
    assert chat_response_to_messages(resp, "m")["stop_reason"] == stop


def test_chat_response_stop_with_tool_calls_becomes_tool_use() -> None:
    resp = chat_completion(
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    )
    out = chat_response_to_messages(resp, "m")
    assert out["stop_reason"] == "tool_use"
    assert out["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]


def test_chat_response_empty_and_refusal() -> None:
    out = chat_response_to_messages(chat_completion({"role": "assistant", "content": ""}, "length"), "m")
    assert out["content"] == [] and out["stop_reason"] == "max_tokens"
    Message.model_validate(out)
    out = chat_response_to_messages(
        chat_completion({"role": "assistant", "content": None, "refusal": "I can't."}, "content_filter"), "m"
    )
    assert out["content"] == [{"type": "text", "text": "I can't."}] and out["stop_reason"] == "refusal"


# ============================================================ direction 2: stream


def collect(conv: ChatStreamToMessages, chunks: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    events = [e for c in chunks for e in conv.feed(c)]
    return events + conv.finish()


def test_chat_stream_to_messages_sequence() -> None:
    conv = ChatStreamToMessages("claude-x", input_tokens=3)
    events = collect(conv, openai_chunks_text_and_tools())
    assert conv.finish() == []
    assert conv.feed(chunk({"content": "late"})) == []

    for name, data in events:
        assert data["type"] == name
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start == {
        "id": "msg_xyz",
        "type": "message",
        "role": "assistant",
        "model": "up-model",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 0},
    }
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [e[1]["delta"] for e in events[2:4]] == [{"type": "text_delta", "text": "Checking "}, {"type": "text_delta", "text": "weather."}]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}
    assert events[5][1]["index"] == 1
    assert [e[1]["delta"]["partial_json"] for e in events[6:8]] == ['{"city":', ' "Paris"}']
    assert events[9][1]["index"] == 2 and events[9][1]["content_block"]["id"] == "call_b"
    assert events[10][1] == {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": "Rome"}'},
    }
    assert [e[1]["index"] for e in events if e[0] == "content_block_stop"] == [0, 1, 2]
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 31, "output_tokens": 17},
    }
    assert conv.stop_reason == "tool_use" and conv.input_tokens == 31 and conv.output_tokens == 17


def test_chat_stream_to_messages_no_role_chunk_and_text_after_tool() -> None:
    conv = ChatStreamToMessages("m")
    events = collect(
        conv,
        [
            chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}),
            chunk({"content": "done"}),
            chunk({}, "stop"),
        ],
    )
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[4][1]["content_block"] == {"type": "text", "text": ""} and events[4][1]["index"] == 1
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_chat_stream_to_messages_empty_and_truncated() -> None:
    events = ChatStreamToMessages("m", input_tokens=5).finish()
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[1][1]["delta"]["stop_reason"] == "end_turn"

    conv = ChatStreamToMessages("m")
    events = collect(conv, [chunk({"role": "assistant"}), chunk({"content": "partial"})])
    assert [n for n, _ in events][-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")])
def test_chat_stream_to_messages_stop_map(finish: str, stop: str) -> None:
    events = collect(ChatStreamToMessages("m"), [chunk({"content": "x"}), chunk({}, finish)])
    assert events[-2][1]["delta"]["stop_reason"] == stop


def test_chat_stream_to_messages_ignores_other_choices() -> None:
    other = chunk({"content": "nope"})
    other["choices"][0]["index"] = 1
    events = collect(ChatStreamToMessages("m"), [other])
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]


def test_sse_event_format() -> None:
    assert sse_event("message_stop", {"type": "message_stop"}) == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    raw = sse_event("content_block_delta", {"type": "x", "text": "caf\u00e9\nline"})
    assert raw.startswith(b"event: content_block_delta\ndata: {") and raw.endswith(b"}\n\n")
    assert raw.count(b"\n") == 3  # newline inside the JSON string stays escaped
    assert json.loads(raw.split(b"data: ", 1)[1]) == {"type": "x", "text": "caf\u00e9\nline"}


async def test_chat_stream_to_messages_parsed_by_anthropic_sdk() -> None:
    """Anthropic SDK -> (messages_request_to_chat) -> canned OpenAI stream -> events -> SDK."""
    seen: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        chat_req = messages_request_to_chat(await request.json())
        seen.append(chat_req)
        conv = ChatStreamToMessages(chat_req["model"], input_tokens=0)
        events = collect(conv, openai_chunks_text_and_tools())
        return await write_sse(request, [sse_event(name, data) for name, data in events])

    async with serve(handler) as base:
        client = anthropic.AsyncAnthropic(base_url=base, api_key="x", max_retries=0)
        kwargs: dict[str, Any] = {
            "model": "claude-x",
            "max_tokens": 128,
            "system": "sys",
            "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
            "tools": [{"name": "get_weather", "description": "Get the weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}],
        }

        async with client.messages.stream(**kwargs) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "Checking weather."
        assert final.id == "msg_xyz"
        assert final.stop_reason == "tool_use"
        assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
        assert final.content[0].text == "Checking weather."  # type: ignore[union-attr]
        assert [(b.id, b.name, b.input) for b in final.content[1:]] == [  # type: ignore[union-attr]
            ("call_a", "get_weather", {"city": "Paris"}),
            ("call_b", "get_weather", {"city": "Rome"}),
        ]
        assert (final.usage.input_tokens, final.usage.output_tokens) == (31, 17)

        raw = await client.messages.create(stream=True, **kwargs)
        types = [event.type async for event in raw]
        assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
        await client.close()

    assert seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}
    assert seen[0]["messages"][0] == {"role": "system", "content": "sys"}
    assert seen[0]["tools"][0]["function"]["name"] == "get_weather"


async def test_chat_response_to_messages_parsed_by_anthropic_sdk() -> None:
    async def handler(request: web.Request) -> web.Response:
        chat_req = messages_request_to_chat(await request.json())
        resp = chat_completion(
            {
                "role": "assistant",
                "content": "Here.",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}],
            },
            "tool_calls",
        )
        return web.json_response(chat_response_to_messages(resp, chat_req["model"]))

    async with serve(handler) as base:
        client = anthropic.AsyncAnthropic(base_url=base, api_key="x", max_retries=0)
        msg = await client.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        await client.close()
    assert msg.model == "up-model" and msg.stop_reason == "tool_use"
    assert msg.content[1].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert msg.usage.output_tokens == 8


async def test_anthropic_error_event_surfaces_in_sdk_and_converter() -> None:
    """An Anthropic ``error`` event raises in both our converter and (as reference) the SDK."""
    err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    events = anthropic_events_text_and_tools()[:3] + [("error", err)]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await write_sse(request, [sse_event(n, d) for n, d in events])

    async with serve(handler) as base:
        client = anthropic.AsyncAnthropic(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
            async with client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
                await s.get_final_message()
        await client.close()

    conv = MessagesStreamToChat("m", include_usage=True)
    with pytest.raises(UpstreamStreamError):
        for name, data in events:
            conv.feed(name, data)


# ============================================================ round trips


def test_round_trip_openai_request_via_anthropic() -> None:
    """OpenAI request -> Anthropic -> OpenAI preserves semantics (modulo merging/defaults)."""
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["X"],
        "max_tokens": 50,
        "temperature": 0.5,
        "user": "u",
    }
    back = messages_request_to_chat(chat_request_to_messages(body, "m"))
    assert back["messages"] == body["messages"]
    assert back["tools"] == body["tools"]
    for key in ("tool_choice", "parallel_tool_calls", "stop", "max_tokens", "temperature", "user", "model"):
        assert back[key] == body[key], key


def test_round_trip_anthropic_request_via_openai() -> None:
    body = {
        "model": "claude-x",
        "max_tokens": 64,
        "system": "sys",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Ok"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "res"}]},
        ],
        "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}],
        "tool_choice": {"type": "tool", "name": "f"},
        "stop_sequences": ["Z"],
        "stream": True,
    }
    back = chat_request_to_messages(messages_request_to_chat(body), "claude-x")
    for key in ("model", "max_tokens", "system", "messages", "tools", "tool_choice", "stop_sequences", "stream"):
        assert back[key] == body[key], key


def test_round_trip_responses() -> None:
    anth = anthropic_message(
        [{"type": "text", "text": "Hi"}, {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"x": [1, 2]}}], "tool_use"
    )
    back = chat_response_to_messages(messages_response_to_chat(anth, "m"), "claude-sonnet-4-5")
    for key in ("id", "type", "role", "model", "content", "stop_reason", "usage"):
        assert back[key] == anth[key], key


def test_round_trip_streams() -> None:
    """Anthropic events -> OpenAI chunks -> Anthropic events reproduces text/tool blocks."""
    to_chat = MessagesStreamToChat("m", include_usage=True)
    chunks = [c for n, d in anthropic_events_text_and_tools() for c in to_chat.feed(n, d)] + to_chat.finish()
    to_anth = ChatStreamToMessages("claude-sonnet-4-5")
    events = collect(to_anth, chunks)
    blocks = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert blocks == [
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
    ]
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "text_delta")
    assert text == "Let me check."
    assert events[0][1]["message"]["id"] == "msg_01ABC"
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == {"input_tokens": 25, "output_tokens": 42}


def test_stop_of_wrong_type_is_a_clear_value_error():
    with pytest.raises(ValueError, match="stop"):
        chat_request_to_messages({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "m")
