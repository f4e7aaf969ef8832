"""Validation of inbound API bodies and the request context built from them. No HTTP server here: in-process
callers (the batch runner) validate and build contexts the same way as the HTTP endpoints."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from gateway.context import DEFAULT_OUTPUT_TOKENS, Estimate, RequestContext
from gateway.dialects.anthropic_wire import messages_request_to_chat, untranslated_fields
from gateway.errors import GatewayError
from gateway.routing.classes import requested_class
from gateway.tokens import max_output_tokens, prompt_tokens

_MAX_INT = 2**31 - 1
#: Above this body size the prompt is estimated as bytes/4 instead of tokenized: tiktoken costs ~0.4 us per
#: character on the event loop, so a 4 MB prompt would stall every other request for ~2 s.
_TOKENIZE_MAX_BYTES = 64 * 1024
_MAX_MODEL_NAME = 256
_MAX_KEY = 512  # prompt_cache_key, user, X-Session-Id


def _invalid(message: str, param: str) -> GatewayError:
    """The 400 naming a bad field. Raised as ``if not ok: raise _invalid(...)``: a message is formatted only for
    a field that is bad, not for every field of every valid request."""
    return GatewayError(400, message, param=param, code="invalid_value")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_common(body: dict) -> None:
    m = body.get("model")
    if not (isinstance(m, str) and m != ""):
        raise _invalid("'model' is required and must be a string", "model")
    if len(m) > _MAX_MODEL_NAME:
        raise _invalid(f"'model' is longer than {_MAX_MODEL_NAME} characters", "model")
    stream = body.get("stream", False)
    if not (isinstance(stream, bool) or stream is None):
        raise _invalid("'stream' must be a boolean", "stream")
    for k in ("max_tokens", "max_completion_tokens"):
        v = body.get(k)
        if not (v is None or (_is_int(v) and 1 <= v <= _MAX_INT)):
            raise _invalid(f"'{k}' must be an integer between 1 and {_MAX_INT}", k)
    for k in ("temperature", "top_p"):
        v = body.get(k)
        if not (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))):
            raise _invalid(f"'{k}' must be a number", k)
    for k in ("prompt_cache_key", "user"):
        v = body.get(k)
        if not (v is None or (isinstance(v, str) and len(v) <= _MAX_KEY)):
            raise _invalid(f"'{k}' must be a string of at most {_MAX_KEY} characters", k)
    so = body.get("stream_options")
    if not (so is None or isinstance(so, dict)):
        raise _invalid("'stream_options' must be an object", "stream_options")
    stop = body.get("stop")
    if not (stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(x, str) for x in stop))):
        raise _invalid("'stop' must be a string or an array of strings", "stop")
    tools = body.get("tools")
    if tools is not None:
        _validate_tools(tools)


def _validate_tools(tools) -> None:
    if not isinstance(tools, list):
        raise _invalid("'tools' must be an array", "tools")
    for i, t in enumerate(tools):
        if not (isinstance(t, dict) and isinstance(t.get("type", "function"), str) and isinstance(t.get("function", {}), dict)):
            raise _invalid(f"tools[{i}] must be an object with a 'type' and a 'function' object", f"tools[{i}]")


def _validate_messages(msgs) -> None:
    if not (isinstance(msgs, list) and len(msgs) > 0):
        raise _invalid("'messages' must be a non-empty array", "messages")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise _invalid(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        c = m.get("content")
        if not (c is None or isinstance(c, (str, list))):
            raise _invalid(f"messages[{i}].content must be a string or an array of content parts", f"messages[{i}].content")
        if isinstance(c, list):
            for j, part in enumerate(c):
                if not (isinstance(part, dict) and isinstance(part.get("type"), str)
                        and (part["type"] != "text" or isinstance(part.get("text"), str))):
                    raise _invalid(
                        f"messages[{i}].content[{j}] must be a content part object with a 'type' (text parts need a string 'text')",
                        f"messages[{i}].content[{j}]",
                    )


def _validate_tokens_input(v, param: str) -> None:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids (non-empty)."""
    ok = isinstance(v, str) or (
        isinstance(v, list)
        and len(v) > 0
        and (
            all(isinstance(x, str) for x in v)
            or all(_is_int(x) and 0 <= x <= _MAX_INT for x in v)
            or all(isinstance(x, list) and x and all(_is_int(t) and 0 <= t <= _MAX_INT for t in x) for x in v)
        )
    )
    if not ok:
        raise _invalid(f"'{param}' must be a string, an array of strings or an array of token arrays", param)
    if isinstance(v, str) and v == "" and param == "input":
        raise _invalid(f"'{param}' must not be empty", param)


def build_context(
    operation: str, body: dict, *, dialect: str = "openai", headers: Mapping[str, str] | None = None, size: int = 0, path: str = ""
) -> RequestContext:
    """The request context of a validated body (`size`: its length in bytes, 0 when unknown)."""
    stream = bool(body.get("stream")) and operation != "embeddings"
    so = body.get("stream_options") or {}
    # Count only the field this operation reads (validated above): junk in other fields cannot break or skew it.
    field = {"chat": "messages", "text_completion": "prompt", "embeddings": "input"}[operation]
    pt = prompt_tokens({field: body[field]}) if size <= _TOKENIZE_MAX_BYTES else size // 4
    limit = max_output_tokens(body)
    est = Estimate(pt, limit or DEFAULT_OUTPUT_TOKENS, operation, limit or None)
    if operation == "embeddings":
        est.output_tokens = 1
    hdrs = headers if headers is not None else {}
    service_class, source = requested_class(hdrs, body)
    rid = request_id(hdrs)
    return RequestContext(
        operation=operation,
        model=body["model"],
        body=body,
        stream=stream,
        include_usage=bool(so.get("include_usage")),
        dialect=dialect,
        est=est,
        headers=hdrs,
        path=path,
        service_class=service_class or "",
        class_source=source,
        cache_key=cache_key(hdrs, body),
        request_id=rid,
        response_headers={"x-request-id": rid},
    )


def cache_key(headers: Mapping[str, str], body: dict) -> str | None:
    """The client's name for the conversation, for KV-cache stickiness (routing/affinity.py): OpenAI's
    `prompt_cache_key` (made for exactly this), an `X-Session-Id` header, else `user` (OpenAI's end-user id;
    Anthropic's `metadata.user_id` arrives as `user`). Namespaced by source, so equal strings of different
    meanings do not collide. None: the prompt's prefix hashes alone decide."""
    if isinstance(body.get("prompt_cache_key"), str) and body["prompt_cache_key"]:
        return "k:" + body["prompt_cache_key"]
    sid = headers.get("x-session-id") or headers.get("X-Session-Id")
    if sid and len(sid) <= _MAX_KEY:
        return "s:" + sid
    if isinstance(body.get("user"), str) and body["user"]:
        return "u:" + body["user"]
    return None


def request_id(headers: Mapping[str, str]) -> str:
    """The client's x-request-id when it sent a sane one (echoed back and put on spans), else a new one."""
    given = headers.get("x-request-id")
    if given and len(given) <= 128 and given.isprintable():
        return given
    # 128 random bits as 32 hex digits, like uuid4().hex but without its getrandom syscall and UUID object on
    # every request: an id to correlate logs and spans, not a secret (random reseeds itself in forked workers).
    return f"{random.getrandbits(128):032x}"


#: Which body field holds the input of each operation, and its validator.
def validate(operation: str, body: dict) -> None:
    """Raise a 400 GatewayError naming the first bad field of an OpenAI-dialect body."""
    _validate_common(body)
    if operation == "chat":
        _validate_messages(body.get("messages"))
        return
    field = "prompt" if operation == "text_completion" else "input"
    v = body.get(field)
    if not (isinstance(v, (str, list)) and len(v) > 0):
        raise _invalid(f"'{field}' is required (string or array)", field)
    _validate_tokens_input(v, field)


def messages_context(
    body: dict, *, headers: Mapping[str, str] | None = None, size: int = 0, path: str = "/v1/messages"
) -> RequestContext:
    """The request context of an Anthropic Messages body: translated to the canonical chat format (validated as
    such), the client's own body kept for Anthropic upstreams, fields with no translation noted for the policy."""
    try:
        chat = messages_request_to_chat(body)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise GatewayError(400, str(e) or "invalid Messages request") from None
    except Exception:  # any other shape the translator cannot read is still the request's fault
        raise GatewayError(400, "invalid Messages request") from None
    validate("chat", chat)
    ctx = build_context("chat", chat, dialect="anthropic", headers=headers, size=size, path=path)
    ctx.native = body  # sent as is to Anthropic upstreams
    foreign = untranslated_fields(body)
    if foreign:
        ctx.extras["foreign"] = foreign  # the translation policy decides for other upstreams
    return ctx
