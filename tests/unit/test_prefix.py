"""gateway.routing.prefix: chained block hashes and prompt token ids (pure)."""

from __future__ import annotations

import pytest

from gateway.routing.prefix import BLOCK_SIZE, block_hashes, prompt_block_hashes, prompt_token_ids


def test_only_full_blocks_are_hashed() -> None:
    assert block_hashes(list(range(15))) == []
    assert len(block_hashes(list(range(16)))) == 1
    assert len(block_hashes(list(range(47)))) == 2
    assert len(block_hashes(list(range(100)), block_size=10)) == 10
    with pytest.raises(ValueError):
        block_hashes([1, 2], block_size=0)


def test_hashes_are_chained_and_deterministic() -> None:
    a = list(range(64))
    ha = block_hashes(a)
    assert ha == block_hashes(list(a))  # stable (no per-process salt)
    assert len(set(ha)) == 4
    # Same tokens in block 2, different block 0: every later hash differs (the KV depends on the prefix).
    b = [999, *a[1:]]
    hb = block_hashes(b)
    assert all(x != y for x, y in zip(ha, hb))
    # A change in block 2 keeps blocks 0-1 and changes 2-3.
    c = a[:40] + [7] + a[41:]
    hc = block_hashes(c)
    assert hc[:2] == ha[:2] and hc[2] != ha[2] and hc[3] != ha[3]
    # Same block content at a different position is a different block.
    assert block_hashes(a[16:32])[0] != ha[1]
    # The chain continues from a parent: hashing the tail after the head's last hash gives the same chain.
    assert block_hashes(a[32:], parent=ha[1]) == ha[2:]


def test_extending_a_prompt_keeps_its_blocks() -> None:
    turn1 = [{"role": "system", "content": "You are a careful assistant. " * 40},
             {"role": "user", "content": "What is the capital of France?"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    ids1, ids2 = prompt_token_ids({"messages": turn1}), prompt_token_ids({"messages": turn2})
    assert ids2[:len(ids1)] == ids1 and len(ids2) > len(ids1)
    n1, h1 = prompt_block_hashes({"messages": turn1})
    n2, h2 = prompt_block_hashes({"messages": turn2})
    assert n1 == len(ids1) and len(h1) == n1 // BLOCK_SIZE
    assert h2[:len(h1)] == h1
    # A different system prompt shares nothing.
    other = [{"role": "system", "content": "You are terse. " * 40}, turn1[1]]
    assert not set(prompt_block_hashes({"messages": other})[1]) & set(h1)


def test_prompt_token_ids_shapes() -> None:
    text = "hello world " * 20
    assert prompt_token_ids({"prompt": text}) == prompt_token_ids({"prompt": [text, "other"]})
    assert prompt_token_ids({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_token_ids({"prompt": [[5, 6], [7]]}) == [5, 6]
    assert prompt_token_ids({"prompt": [-1, 5]}) == [5]
    assert prompt_token_ids({}) == [] and prompt_token_ids({"messages": "x"}) == []
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}]}
    assert prompt_token_ids(parts) == prompt_token_ids({"messages": [{"role": "user", "content": "hi"}]})
    # Anthropic: the top-level system prompt comes first and counts towards the prefix.
    ant = prompt_token_ids({"system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]})
    assert ant[-len(prompt_token_ids(parts)):] == prompt_token_ids(parts) and len(ant) > len(prompt_token_ids(parts))


def test_block_hashes_follow_the_documented_chain_for_lists_and_arrays() -> None:
    import hashlib
    from array import array

    ids = list(range(1000, 1000 + 3 * BLOCK_SIZE + 5))
    h, want = 0, []
    for i in range(3):  # hash_i = blake2b-64(hash_{i-1} || the block's tokens as uint32), partial tail ignored
        data = h.to_bytes(8, "little") + array("I", ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]).tobytes()
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
        want.append(h)
    assert block_hashes(ids) == block_hashes(array("I", ids)) == want


def test_the_estimate_and_the_prefix_tokenize_each_message_content_the_same_way() -> None:
    from gateway import tokens

    long = "You are a careful assistant. " * 60  # long enough to be remembered (tokens.encode's cache)
    msgs = [{"role": "system", "content": long}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    content = [list(tokens.encode(tokens.content_text(m["content"]))) for m in msgs]
    ids = prompt_token_ids({"messages": msgs})
    assert all(any(ids[i:i + len(c)] == c for i in range(len(ids))) for c in content)
    assert tokens.prompt_tokens({"messages": msgs}) == sum(map(len, content)) + 4 * len(msgs)
    assert tokens.encode(long) is tokens.encode(long)  # tokenized once, shared by both
