"""Pure translation between OpenAI Chat Completions and Anthropic Messages wire formats.

OpenAI chat is the gateway's canonical format. Two directions are supported:

* OpenAI client -> Anthropic upstream: :func:`chat_request_to_messages`,
  :func:`messages_response_to_chat`, :class:`MessagesStreamToChat`.
* Anthropic client -> any upstream: :func:`messages_request_to_chat`,
  :func:`chat_response_to_messages`, :class:`ChatStreamToMessages`, :func:`sse_event`.

Everything here operates on already-decoded JSON dicts; there is no I/O.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

__all__ = [
    "UpstreamStreamError",
    "chat_request_to_messages",
    "messages_response_to_chat",
    "MessagesStreamToChat",
    "messages_request_to_chat",
    "chat_response_to_messages",
    "ChatStreamToMessages",
    "sse_event",
]

DEFAULT_MAX_TOKENS = 4096

_STOP_TO_FINISH: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_FINISH_TO_STOP: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class UpstreamStreamError(Exception):
    """An ``error`` event received in an Anthropic SSE stream."""

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


# --------------------------------------------------------------------------- shared helpers


def _text_of(content: Any, sep: str = "") -> str:
    """Flatten str / list-of-text-parts / None content into a string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(
            p.get("text") or p.get("refusal") or ""
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "refusal")
        )
    raise ValueError(f"unsupported content type {type(content).__name__}")


def _loads_object(arguments: Any) -> dict[str, Any]:
    """Parse tool-call arguments JSON; anything but a JSON object becomes ``{}``."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if arguments else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _message_id(chat_id: str | None) -> str:
    """OpenAI completion id -> Anthropic message id (``chatcmpl-msg_X`` -> ``msg_X``)."""
    if not chat_id:
        return "msg_" + uuid.uuid4().hex
    if chat_id.startswith("chatcmpl-"):
        chat_id = chat_id[9:]
    return chat_id if chat_id.startswith("msg_") else "msg_" + chat_id


def _finish_to_stop(finish_reason: str | None, has_tool_calls: bool) -> str:
    """OpenAI finish_reason -> Anthropic stop_reason (``stop`` + tool calls -> ``tool_use``)."""
    stop = _FINISH_TO_STOP.get(finish_reason or "stop", "end_turn")
    return "tool_use" if has_tool_calls and stop == "end_turn" else stop


def _anthropic_prompt_tokens(usage: dict[str, Any]) -> int:
    """Total input tokens of an Anthropic usage dict, including cache reads/writes."""
    return (
        (usage.get("input_tokens") or 0)
        + (usage.get("cache_read_input_tokens") or 0)
        + (usage.get("cache_creation_input_tokens") or 0)
    )


def _empty_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


def _chat_usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --------------------------------------------------------------------------- direction 1: request


def _image_block(url: str) -> dict[str, Any]:
    """OpenAI image URL (data: or http[s]:) -> Anthropic image block."""
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        media_type, *params = header.split(";")
        if not sep or "base64" not in params or not media_type:
            raise ValueError("image data URL must be of the form data:<media-type>;base64,<data>")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": payload}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise ValueError("image_url must be a data: URL or an http(s) URL")


def _user_blocks(content: Any) -> str | list[dict[str, Any]]:
    """OpenAI user content -> Anthropic content (string kept as-is, empty parts dropped)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError("message content must be a string or a list of content parts")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise ValueError("image_url part is missing its url")
            blocks.append(_image_block(url))
        else:
            raise ValueError(f"unsupported content part type {kind!r}")
    return blocks


def _assistant_blocks(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI assistant message -> Anthropic text + tool_use blocks."""
    blocks: list[dict[str, Any]] = []
    content = msg.get("content")
    if isinstance(content, list):
        for part in content:
            text = _text_of([part])
            if text:
                blocks.append({"type": "text", "text": text})
    else:
        text = _text_of(content)
        if text:
            blocks.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": fn.get("name") or "",
                "input": _loads_object(fn.get("arguments")),
            }
        )
    return blocks


def _tool_result_block(msg: dict[str, Any]) -> dict[str, Any]:
    """OpenAI ``tool`` message -> Anthropic tool_result block."""
    tool_use_id = msg.get("tool_call_id")
    if not tool_use_id:
        raise ValueError("tool message is missing tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id}
    content = msg.get("content")
    if isinstance(content, list):
        content = _user_blocks(content)
    if content:
        block["content"] = content
    return block


def _append_merged(out: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Append a message, merging into the previous one when roles repeat."""
    if not content:
        return
    if out and out[-1]["role"] == role:
        prev = out[-1]
        if isinstance(prev["content"], str):
            prev["content"] = [{"type": "text", "text": prev["content"]}]
        if isinstance(content, str):
            prev["content"].append({"type": "text", "text": content})
        else:
            prev["content"].extend(content)
    else:
        out.append({"role": role, "content": content})


def _tool_choice_to_anthropic(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        mapped = {"auto": "auto", "required": "any", "none": "none"}.get(choice)
        if mapped is None:
            raise ValueError(f"unsupported tool_choice {choice!r}")
        return {"type": mapped}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not name:
            raise ValueError("tool_choice function is missing its name")
        return {"type": "tool", "name": name}
    raise ValueError(f"unsupported tool_choice {choice!r}")


def _tools_to_anthropic(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools:
        if tool.get("type", "function") != "function":
            continue
        fn = tool.get("function") or {}
        if not fn.get("name"):
            raise ValueError("function tool is missing its name")
        converted: dict[str, Any] = {"name": fn["name"], "input_schema": fn.get("parameters") or _empty_schema()}
        if fn.get("description"):
            converted["description"] = fn["description"]
        out.append(converted)
    return out


def chat_request_to_messages(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """Translate an OpenAI chat request into an Anthropic Messages request.

    Unknown OpenAI fields are dropped; ``temperature`` is clamped to Anthropic's [0, 1].
    Raises ``ValueError`` for unusable input.
    """
    system, out = _chat_messages_to_anthropic(body.get("messages"))
    req: dict[str, Any] = {"model": upstream_model, "messages": out}
    if system:
        req["system"] = system
    req.update(_sampling_to_anthropic(body))
    if "stream" in body:
        req["stream"] = bool(body["stream"])
    req.update(_tooling_to_anthropic(body))
    if body.get("user"):
        req["metadata"] = {"user_id": body["user"]}
    return req


def _chat_messages_to_anthropic(messages: Any) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, messages): system and developer messages are lifted into Anthropic's one `system`
    string; consecutive same-role turns are merged, since Anthropic requires the roles to alternate."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for msg in messages:
        if not isinstance(msg, dict):
            raise ValueError("each message must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            text = _text_of(msg.get("content"), "\n\n")
            if text:
                system.append(text)
        elif role == "user":
            _append_merged(out, "user", _user_blocks(msg.get("content")))
        elif role == "assistant":
            _append_merged(out, "assistant", _assistant_blocks(msg))
        elif role == "tool":
            _append_merged(out, "user", [_tool_result_block(msg)])
        else:
            raise ValueError(f"unsupported message role {role!r}")
    if not out:
        raise ValueError("request has no non-empty user or assistant messages")
    return "\n\n".join(system), out


def _sampling_to_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    """max_tokens (required by Anthropic: DEFAULT_MAX_TOKENS when the client gave none), temperature clamped to
    [0, 1], top_p, top_k and stop sequences."""
    req: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    req["max_tokens"] = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if body.get("temperature") is not None:
        req["temperature"] = min(body["temperature"], 1.0)
    if body.get("top_p") is not None:
        req["top_p"] = body["top_p"]
    if body.get("top_k") is not None:
        req["top_k"] = body["top_k"]
    stop = body.get("stop")
    if stop:
        if isinstance(stop, str):
            req["stop_sequences"] = [stop]
        elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
            req["stop_sequences"] = stop
        else:
            raise ValueError("'stop' must be a string or an array of strings")
    return req


def _tooling_to_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    """tools and tool_choice; `parallel_tool_calls: false` becomes disable_parallel_tool_use on the choice."""
    tools = _tools_to_anthropic(body.get("tools") or [])
    if not tools:
        return {}
    req: dict[str, Any] = {"tools": tools}
    choice = _tool_choice_to_anthropic(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
        choice = choice or {"type": "auto"}
        choice["disable_parallel_tool_use"] = True
    if choice is not None:
        req["tool_choice"] = choice
    return req


# --------------------------------------------------------------------------- direction 1: response


def messages_response_to_chat(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """Translate a non-streaming Anthropic message into an OpenAI ``chat.completion``."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in resp.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": json.dumps(block.get("input") or {})},
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage = resp.get("usage") or {}
    return {
        "id": "chatcmpl-" + (resp.get("id") or uuid.uuid4().hex),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": resp.get("model") or model,  # the serving model's own name (README: the response `model` field)
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _STOP_TO_FINISH.get(resp.get("stop_reason") or "end_turn", "stop"),
            }
        ],
        "usage": _chat_usage(_anthropic_prompt_tokens(usage), usage.get("output_tokens") or 0),
    }


class MessagesStreamToChat:
    """Feeds Anthropic SSE events; yields OpenAI chat.completion.chunk dicts.

    ``finish_reason`` stays ``None`` if the upstream stream ended without a
    ``message_delta`` (i.e. it was truncated); no finish chunk is fabricated.
    """

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.usage: dict[str, int] | None = None
        self.finish_reason: str | None = None
        self._anthropic_usage: dict[str, Any] = {}
        self._role_sent = False
        self._usage_sent = False
        self._tool_index: dict[int, int] = {}  # content block index -> tool call ordinal

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    def _emit_role(self, out: list[dict[str, Any]]) -> None:
        if not self._role_sent:
            self._role_sent = True
            out.append(self._chunk({"role": "assistant", "content": ""}))

    def _emit(self, out: list[dict[str, Any]], delta: dict[str, Any], finish_reason: str | None = None) -> None:
        self._emit_role(out)
        out.append(self._chunk(delta, finish_reason))

    def _update_usage(self, usage: dict[str, Any]) -> None:
        """Merge cumulative Anthropic usage counts (None = unchanged) and refresh ``usage``."""
        merged = self._anthropic_usage
        for key, value in usage.items():
            if value is not None:
                merged[key] = value
        prompt = _anthropic_prompt_tokens(merged)
        self.usage = _chat_usage(prompt, merged.get("output_tokens") or 0)

    def _usage_chunks(self) -> list[dict[str, Any]]:
        if not self.include_usage or self._usage_sent or self.usage is None:
            return []
        self._usage_sent = True
        return [
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": dict(self.usage),
            }
        ]

    def feed(self, event: str, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Consume one SSE event; return the chunks it produces (possibly none)."""
        kind = event or data.get("type")
        out: list[dict[str, Any]] = []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                if delta.get("text"):
                    self._emit(out, {"content": delta["text"]})
            elif dtype == "input_json_delta":
                ordinal = self._tool_index.get(data.get("index", -1))
                if ordinal is not None and delta.get("partial_json"):
                    call = {"index": ordinal, "function": {"arguments": delta["partial_json"]}}
                    self._emit(out, {"tool_calls": [call]})
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            btype = block.get("type")
            if btype == "text" and block.get("text"):
                self._emit(out, {"content": block["text"]})
            elif btype == "tool_use":
                ordinal = len(self._tool_index)
                self._tool_index[data.get("index", ordinal)] = ordinal
                call = {
                    "index": ordinal,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                self._emit(out, {"tool_calls": [call]})
        elif kind == "message_start":
            message = data.get("message") or {}
            if message.get("id"):
                self.id = "chatcmpl-" + message["id"]
            if isinstance(message.get("model"), str) and message["model"]:
                self.model = message["model"]  # the serving model's own name
            self._update_usage(message.get("usage") or {})
            self._emit_role(out)
        elif kind == "message_delta":
            self._update_usage(data.get("usage") or {})
            stop = (data.get("delta") or {}).get("stop_reason")
            self.finish_reason = _STOP_TO_FINISH.get(stop or "end_turn", "stop")
            self._emit(out, {}, self.finish_reason)
        elif kind == "message_stop":
            out.extend(self._usage_chunks())
        elif kind == "error":
            err = data.get("error") or {}
            raise UpstreamStreamError(err.get("message") or "upstream stream error", err.get("type"))
        # ping, content_block_stop, thinking/signature/citation deltas: nothing to emit
        return out

    def finish(self) -> list[dict[str, Any]]:
        """Chunks still owed at end of stream (the usage chunk if not yet sent). Idempotent."""
        return self._usage_chunks()


# --------------------------------------------------------------------------- direction 2: request


def _image_part(source: dict[str, Any]) -> dict[str, Any]:
    """Anthropic image source -> OpenAI image_url part."""
    stype = source.get("type")
    if stype == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif stype == "url":
        if not isinstance(source.get("url"), str):
            raise ValueError("an image source of type 'url' needs a string 'url'")
        url = source["url"]
    else:
        raise ValueError(f"unsupported image source type {stype!r}")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_content(content: Any, images: list[dict[str, Any]]) -> str:
    """tool_result content -> text for an OpenAI tool message; images go to ``images``."""
    if content is None or isinstance(content, str):
        return content or ""
    texts: list[str] = []
    for block in content:
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "image":
            images.append(_image_part(block.get("source") or {}))
        else:
            raise ValueError(f"unsupported tool_result content block {kind!r}")
    return "\n".join(texts)


def _user_to_chat(content: Any, out: list[dict[str, Any]]) -> None:
    """Anthropic user message -> OpenAI tool messages (first) plus a user message."""
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "image":
            parts.append(_image_part(block.get("source") or {}))
        elif kind == "tool_result":
            text = _tool_result_content(block.get("content"), parts)
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise ValueError(f"unsupported content block type {kind!r}")
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})


def _assistant_to_chat(content: Any) -> dict[str, Any]:
    """Anthropic assistant message -> OpenAI assistant message."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise ValueError(f"unsupported assistant content block type {kind!r}")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tool_choice_to_chat(choice: dict[str, Any]) -> str | dict[str, Any]:
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ValueError(f"unsupported tool_choice {choice!r}")


def _tools_to_chat(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools:
        if tool.get("type") not in (None, "custom"):
            raise ValueError(f"unsupported tool type {tool.get('type')!r}")
        if not tool.get("name"):
            raise ValueError("tool is missing its name")
        fn: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or _empty_schema()}
        if tool.get("description"):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def messages_request_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """Translate an Anthropic Messages request into the canonical OpenAI chat request.

    Raises ``ValueError`` on invalid input (missing ``max_tokens``, bad messages/roles).
    """
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError("'max_tokens' is required and must be a positive integer")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _text_of(system, "\n\n")})
    for msg in messages:
        if not isinstance(msg, dict):
            raise ValueError("each message must be an object")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(content, (str, list)):
            raise ValueError("message content must be a string or a list of content blocks")
        if role == "user":
            _user_to_chat(content, out)
        elif role == "assistant":
            out.append(_assistant_to_chat(content))
        else:
            raise ValueError(f"invalid message role {role!r}; expected 'user' or 'assistant'")

    req: dict[str, Any] = {"messages": out, "max_tokens": max_tokens}
    if body.get("model"):
        req["model"] = body["model"]
    for key in ("temperature", "top_p", "top_k"):  # top_k: vLLM/SGLang honour it; OpenAI itself refuses it (400)
        if body.get(key) is not None:
            req[key] = body[key]
    if body.get("stop_sequences"):
        seqs = body["stop_sequences"]
        if not isinstance(seqs, list) or not all(isinstance(x, str) for x in seqs):
            raise ValueError("stop_sequences: must be an array of strings")
        req["stop"] = list(seqs)
    if body.get("stream"):
        req["stream"] = True
        req["stream_options"] = {"include_usage": True}
    elif "stream" in body:
        req["stream"] = False
    if body.get("tools"):
        req["tools"] = _tools_to_chat(body["tools"])
        choice = body.get("tool_choice")
        if choice:
            req["tool_choice"] = _tool_choice_to_chat(choice)
            if choice.get("disable_parallel_tool_use"):
                req["parallel_tool_calls"] = False
    user_id = (body.get("metadata") or {}).get("user_id")
    if user_id:
        req["user"] = user_id
    return req


#: Messages request fields messages_request_to_chat translates; see untranslated_fields.
_MESSAGES_TRANSLATED = frozenset({
    "model", "messages", "max_tokens", "system", "temperature", "top_p", "top_k", "stop_sequences", "stream", "tools",
    "tool_choice", "metadata",
})
_MESSAGES_DEFAULTS: dict[str, tuple] = {"thinking": ({"type": "disabled"},), "service_tier": ("auto",)}


def untranslated_fields(body: dict[str, Any]) -> list[str]:
    """Fields of a Messages request with no chat equivalent (thinking, container, mcp_servers ...): honoured only
    by Anthropic upstreams (which get the body as is); elsewhere the translation policy applies (upstream/policy)."""
    return [
        k for k, v in body.items()
        if k not in _MESSAGES_TRANSLATED and v is not None and v not in _MESSAGES_DEFAULTS.get(k, ())
    ]


# --------------------------------------------------------------------------- direction 2: response


def chat_response_to_messages(resp: dict[str, Any], model: str) -> dict[str, Any]:
    """Translate an OpenAI ``chat.completion`` into an Anthropic message."""
    choices = resp.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = _text_of(message.get("content")) or message.get("refusal") or ""
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or ()
    for call in calls:
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": fn.get("name") or "",
                "input": _loads_object(fn.get("arguments")),
            }
        )
    usage = resp.get("usage") or {}
    return {
        "id": _message_id(resp.get("id")),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model") or model,  # the serving model's own name
        "content": content,
        "stop_reason": _finish_to_stop(choice.get("finish_reason"), bool(calls)),
        "stop_sequence": None,
        "usage": {
            "input_tokens": usage.get("prompt_tokens") or 0,
            "output_tokens": usage.get("completion_tokens") or 0,
        },
    }


class ChatStreamToMessages:
    """Feeds OpenAI chunk dicts; yields (event_name, data) Anthropic SSE events.

    Call :meth:`finish` once the upstream stream ends (``[DONE]`` or EOF): the
    final ``message_delta`` is deferred until then because the usage chunk
    follows the finish_reason chunk.
    """

    def __init__(self, model: str, input_tokens: int = 0) -> None:
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.stop_reason: str | None = None
        self.id: str | None = None
        self._finished = False
        self._next_block = 0
        self._open: int | None = None  # index of the open content block
        self._open_kind: str | None = None
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool_call index -> content block index

    def _start(self, chunk_id: str | None, out: list[tuple[str, dict[str, Any]]]) -> None:
        self.id = _message_id(chunk_id)
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }
        out.append(("message_start", {"type": "message_start", "message": message}))

    def _open_block(self, kind: str, block: dict[str, Any], out: list[tuple[str, dict[str, Any]]]) -> int:
        self._close(out)
        index = self._open = self._next_block
        self._next_block += 1
        self._open_kind = kind
        out.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return index

    def _close(self, out: list[tuple[str, dict[str, Any]]]) -> None:
        if self._open is not None:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self._open}))
            self._open = self._open_kind = None

    def _tool_delta(self, call: dict[str, Any], out: list[tuple[str, dict[str, Any]]]) -> None:
        position = call.get("index", 0)
        fn = call.get("function") or {}
        index = self._tool_blocks.get(position)
        if index is None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{self.id}_{position}",
                "name": fn.get("name") or "",
                "input": {},
            }
            index = self._tool_blocks[position] = self._open_block("tool_use", block, out)
        if fn.get("arguments"):
            delta = {"type": "input_json_delta", "partial_json": fn["arguments"]}
            out.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))

    def feed(self, chunk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Consume one OpenAI chunk; return the Anthropic events it produces."""
        if self._finished:
            return []
        out: list[tuple[str, dict[str, Any]]] = []
        usage = chunk.get("usage")
        if usage:
            self.input_tokens = usage.get("prompt_tokens") or self.input_tokens
            self.output_tokens = usage.get("completion_tokens") or self.output_tokens
        if self.id is None:
            self.model = chunk.get("model") or self.model  # the serving model's own name
            self._start(chunk.get("id"), out)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._open_kind != "text":
                    self._open_block("text", {"type": "text", "text": ""}, out)
                delta_event = {"type": "text_delta", "text": text}
                out.append(
                    ("content_block_delta", {"type": "content_block_delta", "index": self._open, "delta": delta_event})
                )
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call, out)
            finish = choice.get("finish_reason")
            if finish:
                self.stop_reason = _finish_to_stop(finish, bool(self._tool_blocks))
                self._close(out)
        return out

    def finish(self) -> list[tuple[str, dict[str, Any]]]:
        """Close open blocks and emit message_delta + message_stop. Idempotent."""
        if self._finished:
            return []
        self._finished = True
        out: list[tuple[str, dict[str, Any]]] = []
        if self.id is None:
            self._start(None, out)
        self._close(out)
        stop = self.stop_reason or ("tool_use" if self._tool_blocks else "end_turn")
        out.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
                },
            )
        )
        out.append(("message_stop", {"type": "message_stop"}))
        return out


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """Encode one named SSE event with compact JSON data."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()
