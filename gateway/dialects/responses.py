"""Pure translation between OpenAI's Responses API and the canonical chat completions format.

A `POST /v1/responses` request becomes a canonical chat request (`responses_request_to_chat`), so it is routed,
measured and traced like any chat call and can be served by any upstream (OpenAI-compatible or Anthropic). The
canonical answer is turned back into a Response object (`chat_to_response`) or, streamed, into the Responses event
stream (`ChatStreamToResponses`: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta ..., response.function_call_arguments.delta ...,
response.completed / response.incomplete, or response.failed when the stream breaks).

`ResponseMeta` carries what the Response object echoes from the request (instructions, tools, metadata ...) and the
conversation so far (`turn`), which the handler stores for `previous_response_id`. No I/O here.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.dialects.anthropic_wire import sse_event

#: Request fields translated to (or kept beside) the chat request. Anything else is refused with a 400 naming it:
#: a client must never get a different behaviour than it asked for without a sign.
_ACCEPTED = frozenset({
    "model", "input", "instructions", "stream", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
    "temperature", "top_p", "user", "metadata", "store", "previous_response_id", "text", "reasoning",
    "service_tier", "prompt_cache_key", "safety_identifier", "truncation", "stream_options",
})
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
#: Canonical chat field -> the Responses field it came from (errors name what the client sent).
PARAM_NAMES = {"reasoning_effort": "reasoning.effort", "response_format": "text.format", "max_tokens": "max_output_tokens"}


class ResponsesRequestError(ValueError):
    """The request cannot be translated; `param` names the field (for the 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class ResponseMeta:
    """What the Response object echoes from its request, and the conversation to store for the next turn."""

    request: dict[str, Any]
    turn: list[dict[str, Any]]  # chat messages of the conversation (history + this input), without instructions
    id: str = field(default_factory=lambda: "resp_" + uuid.uuid4().hex)
    created_at: int = field(default_factory=lambda: int(time.time()))
    final: dict[str, Any] | None = None  # the completed Response object, once known

    @property
    def store(self) -> bool:
        return self.request.get("store") is not False


# --------------------------------------------------------------------------- request


def _text_parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """Responses content (a string or input_text/output_text/input_image parts) -> chat message content."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ResponsesRequestError(f"{where}.content must be a string or an array of content parts", where)
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            parts.append({"type": "text", "text": p["text"]})
        elif kind == "refusal" and isinstance(p.get("refusal"), str):
            parts.append({"type": "text", "text": p["refusal"]})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"], "detail": p.get("detail") or "auto"}})
        else:
            raise ResponsesRequestError(f"{where}.content[{j}]: content part type {kind!r} is not supported", f"{where}.content")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tool_call_message(out: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message function_call items attach to (consecutive calls share one, as in chat)."""
    if out and out[-1]["role"] == "assistant" and ("tool_calls" in out[-1] or not out[-1].get("content")):
        return out[-1]
    msg: dict[str, Any] = {"role": "assistant", "content": None}
    out.append(msg)
    return msg


def _input_item(item: Any, i: int, out: list[dict[str, Any]]) -> None:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise ResponsesRequestError(f"{where} must be an object", where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ResponsesRequestError(f"{where}.role must be one of user, assistant, system, developer", where)
        out.append({"role": role, "content": _text_parts(item.get("content"), where)})
    elif kind == "function_call":
        if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str):
            raise ResponsesRequestError(f"{where}: a function_call needs a string call_id and name", where)
        call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
        _tool_call_message(out).setdefault("tool_calls", []).append(call)
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise ResponsesRequestError(f"{where}: a function_call_output needs a string call_id", where)
        output = item.get("output")
        text = output if isinstance(output, str) else _text_parts(output, where)
        out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
    else:
        raise ResponsesRequestError(f"{where}: input item type {kind!r} is not supported by this gateway", where)


def _input_messages(inp: Any) -> list[dict[str, Any]]:
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise ResponsesRequestError("'input' is required: a string or a non-empty array of input items", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(inp):
        _input_item(item, i, out)
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise ResponsesRequestError("'tools' must be an array", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
            kind = t.get("type") if isinstance(t, dict) else None
            raise ResponsesRequestError(f"tools[{i}]: only function tools are supported (got {kind!r})", f"tools[{i}]")
        fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
        if t.get("description"):
            fn["description"] = t["description"]
        if t.get("strict") is not None:
            fn["strict"] = t["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ResponsesRequestError("'tool_choice' must be auto, none, required or {type: function, name}", "tool_choice")


def _text_format(text: Any) -> dict[str, Any] | None:
    """Responses `text.format` -> chat `response_format` (None for plain text)."""
    fmt = (text or {}).get("format") if isinstance(text, dict) else None
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        js = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": js}
    raise ResponsesRequestError(f"text.format type {fmt.get('type')!r} is not supported", "text.format")


def _options(body: dict[str, Any], chat: dict[str, Any]) -> None:
    """Sampling and tool options, translated one by one."""
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for k in ("temperature", "top_p", "parallel_tool_calls", "service_tier", "prompt_cache_key"):
        if body.get(k) is not None:
            chat[k] = body[k]
    user = body.get("user") or body.get("safety_identifier")
    if user:
        chat["user"] = user
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _text_format(body.get("text"))
    if fmt:
        chat["response_format"] = fmt
    effort = (body.get("reasoning") or {}).get("effort") if isinstance(body.get("reasoning"), dict) else None
    if effort:
        chat["reasoning_effort"] = effort
    if body.get("truncation") not in (None, "disabled"):
        raise ResponsesRequestError("truncation 'auto' is not supported by this gateway; use 'disabled'", "truncation")
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}


def responses_request_to_chat(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], ResponseMeta]:
    """The canonical chat request of a Responses request, and its ResponseMeta. `history`: the chat messages of
    the response named by previous_response_id (instructions are not carried over, as on OpenAI)."""
    unknown = sorted(k for k in body if k not in _ACCEPTED)
    if unknown:
        raise ResponsesRequestError(f"unsupported parameter(s) for /v1/responses on this gateway: {', '.join(unknown)}", unknown[0])
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ResponsesRequestError("'model' is required and must be a string", "model")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ResponsesRequestError("'instructions' must be a string", "instructions")
    turn = [*(history or ()), *_input_messages(body.get("input"))]
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + turn
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    _options(body, chat)
    return chat, ResponseMeta(body, turn)


def native_only_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A stand-in chat request for a Responses request only native upstreams can serve: enough for the gateway's
    estimate (prompt size, max tokens, stream) and routing; it is never sent."""
    inp = body.get("input")
    text = inp if isinstance(inp, str) else json.dumps(inp, ensure_ascii=False)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": [{"role": "user", "content": text or " "}]}
    if isinstance(body.get("max_output_tokens"), int):
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("stream"):
        chat["stream"] = True
    return chat


# --------------------------------------------------------------------------- response


def _usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    if not u:
        return None
    inp, out = u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": inp, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": out, "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": inp + out,
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def response_object(meta: ResponseMeta, model: str, output: list[dict[str, Any]], status: str, *,
                    usage: dict[str, Any] | None = None, finish: str | None = None, error: dict | None = None) -> dict[str, Any]:
    """A Response object echoing its request (`status`: in_progress, completed, incomplete or failed)."""
    r = meta.request
    incomplete = None
    if status == "completed" and finish in _INCOMPLETE:
        status, incomplete = "incomplete", {"reason": _INCOMPLETE[finish]}
    return {
        "id": meta.id, "object": "response", "created_at": meta.created_at, "status": status, "model": model,
        "output": output, "error": error, "incomplete_details": incomplete,
        "instructions": r.get("instructions"), "max_output_tokens": r.get("max_output_tokens"),
        "metadata": r.get("metadata") or {}, "parallel_tool_calls": r.get("parallel_tool_calls", True),
        "previous_response_id": r.get("previous_response_id"), "temperature": r.get("temperature"),
        "top_p": r.get("top_p"), "tool_choice": r.get("tool_choice", "auto"), "tools": r.get("tools") or [],
        "text": r.get("text") or {"format": {"type": "text"}}, "truncation": r.get("truncation") or "disabled",
        "store": meta.store, "user": r.get("user"), "usage": usage,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
    }


def chat_to_response(chat: dict[str, Any], meta: ResponseMeta) -> dict[str, Any]:
    """A canonical chat.completion -> the Response object (also kept in `meta.final`)."""
    choice = (chat.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    text = msg.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
    if text:
        output.append(_message_item("msg_" + uuid.uuid4().hex, text))
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        output.append(_call_item("fc_" + uuid.uuid4().hex, call.get("id") or "call_" + uuid.uuid4().hex,
                                 fn.get("name") or "", fn.get("arguments") or ""))
    resp = response_object(meta, chat.get("model") or meta.request["model"], output, "completed",
                           usage=_usage(chat.get("usage")), finish=choice.get("finish_reason"))
    meta.final = resp
    return resp


def assistant_message(resp: dict[str, Any]) -> dict[str, Any]:
    """The chat message a Response's output adds to the conversation (for previous_response_id)."""
    text = "".join(c.get("text", "") for it in resp["output"] if it["type"] == "message" for c in it["content"])
    calls = [
        {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
        for it in resp["output"] if it["type"] == "function_call"
    ]
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


# --------------------------------------------------------------------------- stream


class ChatStreamToResponses:
    """Canonical chat.completion.chunk dicts -> Responses API SSE events (with sequence numbers)."""

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self.model = meta.request["model"]
        self.seq = 0
        self.started = False
        self.output: list[dict[str, Any]] = []  # finished items, in output order
        self._text: dict[str, Any] | None = None  # the open message item: {"id", "index", "parts"}
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool_call index -> open function_call item
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    def _ev(self, kind: str, **data: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse_event(kind, data)

    def _start(self, model: str | None) -> list[bytes]:
        self.started = True
        self.model = model or self.model
        resp = response_object(self.meta, self.model, [], "in_progress")
        return [self._ev("response.created", response=resp), self._ev("response.in_progress", response=resp)]

    def _text_delta(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        if self._text is None:
            out += self._close_calls()
            self._text = {"id": "msg_" + uuid.uuid4().hex, "index": self._next_index(), "parts": []}
            item_id, index = self._text["id"], self._text["index"]
            out.append(self._ev("response.output_item.added", output_index=index, item=_message_item(item_id, "", "in_progress")))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self._ev("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=part))
        self._text["parts"].append(text)
        out.append(self._ev("response.output_text.delta", item_id=self._text["id"], output_index=self._text["index"],
                            content_index=0, delta=text, logprobs=[]))
        return out

    def _next_index(self) -> int:
        return len(self.output) + (self._text is not None) + len(self._calls)

    def _close_text(self) -> list[bytes]:
        t = self._text
        if t is None:
            return []
        self._text = None
        text = "".join(t["parts"])
        item = _message_item(t["id"], text)
        part = item["content"][0]
        self.output.append(item)
        kw = {"item_id": t["id"], "output_index": t["index"], "content_index": 0}
        return [
            self._ev("response.output_text.done", **kw, text=text, logprobs=[]),
            self._ev("response.content_part.done", **kw, part=part),
            self._ev("response.output_item.done", output_index=t["index"], item=item),
        ]

    def _tool_delta(self, call: dict[str, Any]) -> list[bytes]:
        pos = call.get("index", 0)
        fn = call.get("function") or {}
        out: list[bytes] = []
        c = self._calls.get(pos)
        if c is None:
            out += self._close_text()
            c = self._calls[pos] = {
                "id": "fc_" + uuid.uuid4().hex, "index": self._next_index(), "call_id": call.get("id") or "call_" + uuid.uuid4().hex,
                "name": fn.get("name") or "", "args": [],
            }
            item = _call_item(c["id"], c["call_id"], c["name"], "", "in_progress")
            out.append(self._ev("response.output_item.added", output_index=c["index"], item=item))
        if fn.get("arguments"):
            c["args"].append(fn["arguments"])
            out.append(self._ev("response.function_call_arguments.delta", item_id=c["id"], output_index=c["index"], delta=fn["arguments"]))
        return out

    def _close_calls(self) -> list[bytes]:
        out: list[bytes] = []
        for c in self._calls.values():
            args = "".join(c["args"])
            item = _call_item(c["id"], c["call_id"], c["name"], args)
            self.output.append(item)
            out.append(self._ev("response.function_call_arguments.done", item_id=c["id"], output_index=c["index"], arguments=args))
            out.append(self._ev("response.output_item.done", output_index=c["index"], item=item))
        self._calls.clear()
        return out

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out: list[bytes] = [] if self.started else self._start(chunk.get("model"))
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text_delta(delta["content"])
            for call in delta.get("tool_calls") or ():
                out += self._tool_delta(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return b"".join(out)

    def done(self) -> bytes:
        out: list[bytes] = [] if self.started else self._start(None)
        out += self._close_text() + self._close_calls()
        resp = response_object(self.meta, self.model, self.output, "completed", usage=self.usage, finish=self.finish)
        self.meta.final = resp
        kind = "response.completed" if resp["status"] == "completed" else "response.incomplete"
        out.append(self._ev(kind, response=resp))
        return b"".join(out)

    def failed(self, code: str, message: str) -> bytes:
        """The stream broke after it started: the Response ends as failed (no retry is possible any more)."""
        out: list[bytes] = [] if self.started else self._start(None)
        resp = response_object(self.meta, self.model, self.output, "failed", error={"code": code, "message": message})
        out.append(self._ev("response.failed", response=resp))
        return b"".join(out)


def dumps_compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
