"""Batch records and results in Redis; every state change is one Lua script, so replicas never race.

Record (hash {p}:bb:{id}): the OpenAI Batch fields (timestamps, file ids, `errors` as JSON, `metadata` as JSON)
plus owner, total, completed, failed, tokens (output tokens so far), expired ("1" once a line hit the window).
Results (hash {p}:bb:{id}:res): custom_id -> "o"/"e" + the output/error line. HSETNX makes a result final the
first time it is stored: a line executed twice (a replica died after running it, before XACK) is counted once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from gateway.batch.files import decode_hash, page
from gateway.batch.keys import ANON, BatchKeys
from gateway.batch.models import FINAL, new_id
from gateway.errors import GatewayError

# KEYS: results, record. ARGV: custom_id, value, counter field, tokens, extra counter ('' = none). -> {stored, done, total}
_STORE = """
local ok = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end  -- results never outlive their batch record
if ok == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[5], 1) end
  if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', KEYS[2], 'tokens', ARGV[4]) end
end
local c = tonumber(redis.call('HGET', KEYS[2], 'completed') or '0')
local f = tonumber(redis.call('HGET', KEYS[2], 'failed') or '0')
local t = tonumber(redis.call('HGET', KEYS[2], 'total') or '-1')
return {ok, c + f, t}
"""

# KEYS: record. ARGV: new status, n, n allowed current statuses, then field/value pairs to set. -> 1 if moved
_MOVE = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local n = tonumber(ARGV[2])
for i = 3, 2 + n do
  if ARGV[i] == cur then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    for j = 3 + n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1]) end
    return 1
  end
end
return 0
"""

_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def _int(h: dict[str, str], name: str) -> int:
    return int(h.get(name) or 0)


def done_counts(h: dict[str, str]) -> dict[str, int]:
    """Completed and failed lines; a native batch (native.py) shows the provider's progress until its results are
    stored here."""
    return {"completed": max(_int(h, "completed"), _int(h, "up_completed")), "failed": max(_int(h, "failed"), _int(h, "up_failed"))}


def public_batch(h: dict[str, str]) -> dict[str, Any]:
    """The OpenAI Batch object from a stored record."""
    def ts(name: str) -> int | None:
        v = h.get(name)
        return int(float(v)) if v else None

    errors = json.loads(h["errors"]) if h.get("errors") else None
    total = int(h.get("total") or 0)
    return {
        "id": h["id"], "object": "batch", "endpoint": h["endpoint"], "errors": errors,
        "input_file_id": h["input_file_id"], "completion_window": h["completion_window"], "status": h["status"],
        "output_file_id": h.get("output_file_id") or None, "error_file_id": h.get("error_file_id") or None,
        "created_at": ts("created_at"), "expires_at": ts("expires_at"),
        **{t: ts(t) for t in _TIMES},
        "request_counts": {"total": max(total, 0), **done_counts(h)},
        "metadata": json.loads(h["metadata"]) if h.get("metadata") else None,
    }


class BatchStore:
    def __init__(self, redis, keys: BatchKeys, retention: int) -> None:
        self.redis, self.k, self.retention = redis, keys, retention
        self._store = redis.register_script(_STORE)
        self._move = redis.register_script(_MOVE)

    async def create(self, owner: str | None, input_file_id: str, endpoint: str, window: int, window_name: str,
                     metadata: dict | None, anthropic: bool = False, total: int = -1) -> dict[str, Any]:
        bid, now = new_id("batch"), time.time()
        rec = {
            "id": bid, "owner": owner or ANON, "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": window_name, "status": "validating", "created_at": str(int(now)),
            "expires_at": str(int(now) + window), "total": str(total), "completed": "0", "failed": "0", "tokens": "0",
        }
        if metadata is not None:
            rec["metadata"] = json.dumps(metadata)
        ttl = window + self.retention
        p = self.redis.pipeline(transaction=True)
        p.hset(self.k.batch(bid), mapping=rec)
        p.expire(self.k.batch(bid), ttl)
        p.zadd(self.k.msg_batches_of(owner) if anthropic else self.k.batches_of(owner), {bid: int(now * 1000)})
        p.sadd(self.k.active, bid)
        await p.execute()
        return public_batch(rec)

    async def record(self, bid: str) -> dict[str, str]:
        return decode_hash(await self.redis.hgetall(self.k.batch(bid))) if bid else {}

    async def owned(self, bid: str, owner: str | None) -> dict[str, str]:
        h = await self.record(bid)
        if not h or h.get("owner") != (owner or ANON):
            raise GatewayError(404, f"No batch found with id '{bid}'.", code="batch_not_found", param="batch_id")
        return h

    async def move(self, bid: str, to: str, frm: tuple[str, ...], **fields: Any) -> bool:
        args: list[Any] = [to, len(frm), *frm]
        for a, b in fields.items():
            args += [a, b if isinstance(b, str) else json.dumps(b) if isinstance(b, (dict, list)) else str(b)]
        moved = bool(await self._move(keys=[self.k.batch(bid)], args=args))
        if moved and to in FINAL:
            p = self.redis.pipeline(transaction=False)
            p.srem(self.k.active, bid)
            p.expire(self.k.batch(bid), self.retention)
            await p.execute()
        return moved

    async def store_result(self, bid: str, custom_id: str, ok: bool, line: dict[str, Any], tokens: int = 0,
                           extra: str = "") -> tuple[bool, int, int]:
        """Store a line's result unless one is stored already. -> (stored now, done, total).

        `extra`: a counter also bumped (n_canceled, n_expired: the Anthropic view counts those apart)."""
        value = ("o" if ok else "e") + json.dumps(line, separators=(",", ":"))
        field = "completed" if ok else "failed"
        r = await self._store(keys=[self.k.results(bid), self.k.batch(bid)], args=[custom_id, value, field, tokens, extra])
        return bool(r[0]), int(r[1]), int(r[2])

    async def has_result(self, bid: str, custom_id: str) -> bool:
        return bool(await self.redis.hexists(self.k.results(bid), custom_id))

    async def list_page(self, owner: str | None, after: str | None, limit: int, anthropic: bool = False,
                        render: Callable[[dict[str, str]], dict[str, Any]] = public_batch) -> dict[str, Any]:
        index = self.k.msg_batches_of(owner) if anthropic else self.k.batches_of(owner)
        return await page(self.redis, index, after, limit, "desc", self._load_many, render)

    async def _load_many(self, ids: list[str], render) -> tuple[set[str], list[dict[str, Any]]]:
        p = self.redis.pipeline(transaction=False)
        for bid in ids:
            p.hgetall(self.k.batch(bid))
        recs = [decode_hash(h) for h in await p.execute()]
        return {h["id"] for h in recs if h}, [render(h) for h in recs if h]

    async def results(self, bid: str):
        """(kind "o"/"e", line bytes) for every stored result, streamed with HSCAN."""
        async for _, v in self.redis.hscan_iter(self.k.results(bid), count=500):
            v = bytes(v)
            yield v[:1].decode(), v[1:]
