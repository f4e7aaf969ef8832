"""Prompt prefixes as chained token-block hashes: the one definition shared by the simulator's KV cache
and (later) the router's prefix index. Pure: no I/O.

An engine with automatic prefix caching (vLLM, SGLang) keeps the KV state of fixed-size token blocks and
reuses a block when a new prompt starts with exactly the same tokens. The KV values of a token depend on
*every* token before it (attention), so a block is only reusable after the same whole prefix. vLLM therefore
names a block by a *chained* hash: hash(previous block's hash, this block's tokens). Two consequences we rely on:

- equal hash at position i implies the whole prefix up to block i is equal, so "how much of this prompt is
  cached" is the length of the leading run of hashes a cache holds, and a lookup never needs the tokens;
- the same 16 tokens after different prefixes get different hashes, as their KV values differ.

Only full blocks get a hash (a partial last block is never shared, as in vLLM). Hashes are stable across
processes (blake2b, not Python's salted hash()) so gateway replicas can share an index through Redis.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections.abc import Sequence
from typing import Any

from gateway import tokens

#: Tokens per KV block, vLLM's default.
BLOCK_SIZE = 16
#: Parent of the first block: a fixed seed so every process computes the same chain.
ROOT_HASH = 0


def block_hashes(token_ids: Sequence[int], block_size: int = BLOCK_SIZE, parent: int = ROOT_HASH) -> list[int]:
    """Chained hashes of the full `block_size`-token blocks of `token_ids` (a partial tail is ignored).

    hash_i = blake2b-64(hash_{i-1} || tokens of block i); hash_{-1} = `parent`.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    buf = (token_ids if isinstance(token_ids, array) and token_ids.typecode == "I" else array("I", token_ids)).tobytes()
    step = 4 * block_size
    digests: list[bytes] = []
    h = parent.to_bytes(8, "little")
    for start in range(0, len(buf) - step + 1, step):
        h = hashlib.blake2b(h + buf[start:start + step], digest_size=8).digest()
        digests.append(h)
    return [int.from_bytes(d, "little") for d in digests]


@functools.lru_cache(maxsize=64)
def _marker(role: str) -> tuple[int, ...]:
    return tuple(tokens.encoding().encode_ordinary(f"<|{role}|>\n"))


_NEWLINE = tuple(tokens.encoding().encode_ordinary("\n"))


def _message_ids(role: str, text: str) -> list[int]:
    """A message as `<|role|>\n`, its content, `\n`, each encoded on its own: the content's ids are the ones
    tokens.prompt_tokens counted (tokens.encode remembers long contents), so a prompt is tokenized once."""
    return [*_marker(role), *tokens.encode(text), *_NEWLINE]


#: Characters encoded per token wanted when a limit applies (tokens of English text average ~4 characters).
_CHARS_PER_TOKEN_BOUND = 8
#: Tokens dropped at a cut: the tokenizer's merges at the cut may differ from the full text's (one word's worth).
_CUT_MARGIN = 8


def _encode_bounded(role: str, text: str, want: int) -> tuple[list[int], bool]:
    """A message's ids (_message_ids), at most ~`want` of them; (ids, cut). A cut drops the last few tokens, which
    may differ from the full text's tokenization, so the ids returned are always a prefix of the full list's."""
    chars = want * _CHARS_PER_TOKEN_BOUND + 16 * _CUT_MARGIN
    if len(text) <= chars:
        return _message_ids(role, text), False
    ids = [*_marker(role), *tokens.encoding().encode_ordinary(text[:chars])]
    return ids[: max(0, min(want, len(ids) - _CUT_MARGIN))], True


def prompt_token_ids(body: dict[str, Any], limit: int | None = None) -> list[int]:
    """Token ids of a request's prompt (OpenAI chat / completions body; a top-level Anthropic `system` too).

    Chat messages are rendered as `<|role|>\\n content \\n` and encoded *one message at a time*, then
    concatenated: appending a turn never changes the tokens of earlier messages, so a conversation's
    next request shares the previous one's blocks (tokenizing the joined text could merge tokens across a
    message boundary). The exact ids differ from the served model's chat template; what matters is that
    the gateway and the simulator agree and that prefixes stay prefixes.

    `limit`: return only (about) the first `limit` tokens, a prefix of the full list, encoding no more text than
    that needs (the router hashes long prompts at bounded cost); None: all of them.
    """
    if limit is not None:
        return _bounded_ids(body, limit)
    ids: list[int] = []
    for role, text in _messages(body):
        ids += _message_ids(role, text)
    if isinstance(body.get("messages"), list):
        return ids
    prompt = body.get("prompt", body.get("input", ""))
    if isinstance(prompt, str):
        return ids + list(tokens.encode(prompt))
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return ids + [t for t in prompt if 0 <= t < 2**32]
        if isinstance(prompt[0], str):
            return ids + list(tokens.encode(prompt[0]))  # a batch of prompts: the first one's prefix
        if isinstance(prompt[0], list):
            return ids + [t for t in prompt[0] if isinstance(t, int) and 0 <= t < 2**32]
    return ids


def _bounded_ids(body: dict[str, Any], limit: int) -> list[int]:
    """prompt_token_ids(body)[:~limit] for chat bodies without encoding past the limit (other shapes: their
    first `limit` ids, as prompt strings are encoded in one piece anyway and token arrays cost nothing)."""
    if not isinstance(body.get("messages"), list):
        return prompt_token_ids(body)[:limit]
    ids: list[int] = []
    for role, text in _messages(body):
        more, cut = _encode_bounded(role, text, limit - len(ids))
        ids += more
        if cut or len(ids) >= limit:
            break
    return ids[:limit]


def _messages(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, content text) of a body's messages, a top-level (Anthropic) `system` first."""
    out = []
    system = body.get("system")
    if system is not None:
        out.append(("system", tokens.content_text(system)))
    msgs = body.get("messages")
    if isinstance(msgs, list):
        out += [(str(m.get("role", "user")), tokens.content_text(m.get("content"))) for m in msgs if isinstance(m, dict)]
    return out


def prompt_block_hashes(body: dict[str, Any], block_size: int = BLOCK_SIZE) -> tuple[int, list[int]]:
    """(prompt token count, chained block hashes) of a request body."""
    ids = prompt_token_ids(body)
    return len(ids), block_hashes(ids, block_size)
