"""Files API storage: metadata and owner indexes in Redis, contents in a ContentStore (content.py: Redis or a
shared directory). Uploads are streamed into ~1 MiB chunks of whole lines, never held whole.

Retention: a file's metadata expires `ttl` seconds after upload (settings.batch_retention, default 30 days);
output and error files of a batch expire with the same TTL from the batch's end; contents go with the metadata
(Redis TTL, or the directory sweep). A file belongs to the gateway API key that uploaded it (owner None = keys not
required) and is invisible (404) to any other key.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.batch.content import ContentStore
from gateway.batch.keys import ANON, BatchKeys
from gateway.batch.models import new_id
from gateway.batch.validate import split_lines
from gateway.errors import GatewayError

CHUNK_BYTES = 1 << 20
PURPOSES = ("batch", "batch_output")


@dataclass(frozen=True, slots=True)
class FileLimits:
    max_bytes: int
    max_lines: int
    ttl: int


class FileWriter:
    """Appends lines of one new file to the content store chunk by chunk; `close()` publishes the content and
    then writes the metadata (the file then exists)."""

    def __init__(self, store: FileStore, fid: str, limits: FileLimits | None) -> None:
        self.store, self.fid, self.limits = store, fid, limits
        self.content = store.content.writer(fid)
        self.bytes = self.stored = self.lines = self.chunks = 0
        self._buf = bytearray()
        self._rest = bytearray()

    async def feed(self, data: bytes) -> None:
        """Raw upload bytes: counted and checked against the limits as they arrive."""
        self.bytes += len(data)
        if self.limits and self.bytes > self.limits.max_bytes:
            raise GatewayError(413, f"File is larger than the limit of {self.limits.max_bytes} bytes.", code="file_too_large", param="file")
        lines, self._rest = split_lines(self._rest + data, final=False)
        await self.add_lines(lines)

    async def add_lines(self, lines: list[bytes]) -> None:
        for ln in lines:
            self.lines += 1
            if self.limits and self.lines > self.limits.max_lines:
                raise GatewayError(400, f"File has more than {self.limits.max_lines} lines (requests).", code="too_many_requests", param="file")
            self._buf += ln + b"\n"
            self.stored += len(ln) + 1
            if len(self._buf) >= CHUNK_BYTES:
                await self._push()

    async def _push(self) -> None:
        if self._buf:
            await self.content.append(bytes(self._buf))
            self.chunks += 1
            self._buf = bytearray()

    async def close(self, filename: str, purpose: str, owner: str | None, ttl: int) -> dict[str, Any]:
        lines, self._rest = split_lines(self._rest, final=True)
        await self.add_lines(lines)
        await self._push()
        now = time.time()
        meta = {
            "id": self.fid, "bytes": self.bytes if self.limits else self.stored, "created_at": int(now), "filename": filename, "purpose": purpose,
            "owner": owner or ANON, "lines": self.lines, "expires_at": int(now) + ttl,
        }
        await self.content.commit(ttl)  # a crash before the metadata below leaves an orphan the sweep removes
        k, p = self.store.k, self.store.redis.pipeline(transaction=True)
        p.hset(k.file(self.fid), mapping={a: str(b) for a, b in meta.items()})
        p.expire(k.file(self.fid), ttl)
        p.zadd(k.files_of(owner), {self.fid: int(now * 1000)})
        await p.execute()
        return public_file(meta)

    async def abort(self) -> None:
        """Drop this writer's unpublished content (a failed upload leaves nothing behind)."""
        await self.content.abort()


def public_file(meta: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI FileObject."""
    return {
        "id": meta["id"], "object": "file", "bytes": int(meta["bytes"]), "created_at": int(meta["created_at"]),
        "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed",
        "expires_at": int(meta["expires_at"]), "status_details": None,
    }


def decode_hash(h: dict) -> dict[str, str]:
    """A Redis hash reply (bytes) as str -> str."""
    return {(a.decode() if isinstance(a, bytes) else a): (b.decode() if isinstance(b, bytes) else b) for a, b in h.items()}


class FileStore:
    def __init__(self, redis, keys: BatchKeys, limits: FileLimits, content: ContentStore) -> None:
        self.redis, self.k, self.limits, self.content = redis, keys, limits, content

    def writer(self, limited: bool = True, fid: str | None = None) -> FileWriter:
        return FileWriter(self, fid or new_id("file"), self.limits if limited else None)

    async def meta(self, fid: str, owner: str | None) -> dict[str, str]:
        """The file's metadata, or 404 when it does not exist or belongs to another key."""
        h = decode_hash(await self.redis.hgetall(self.k.file(fid))) if fid else {}
        if not h or h.get("owner") != (owner or ANON):
            raise GatewayError(404, f"No such File object: {fid}", code="file_not_found", param="file_id")
        return h

    def chunks(self, fid: str) -> AsyncIterator[bytes]:
        return self.content.chunks(fid)

    async def lines(self, fid: str) -> AsyncIterator[bytes]:
        """Non-blank lines; a line may span chunks (the directory store reads fixed-size blocks)."""
        rest = b""
        async for c in self.content.chunks(fid):
            *whole, rest = (rest + c).split(b"\n")
            for ln in whole:
                if ln.strip():
                    yield ln
        if rest.strip():
            yield rest

    async def delete(self, fid: str, owner: str | None) -> None:
        await self.meta(fid, owner)
        p = self.redis.pipeline(transaction=True)
        p.delete(self.k.file(fid))
        p.zrem(self.k.files_of(owner), fid)
        await p.execute()
        await self.content.delete(fid)  # after the metadata: nobody finds a file whose content is going

    async def sweep(self) -> int:
        """Retention of contents that do not expire by themselves (directory store): see ContentStore.sweep."""
        return await self.content.sweep(self._live)

    async def _live(self, ids: list[str]) -> set[str]:
        p = self.redis.pipeline(transaction=False)
        for fid in ids:
            p.exists(self.k.file(fid))
        return {fid for fid, n in zip(ids, await p.execute(), strict=True) if n}

    async def list_page(self, owner: str | None, after: str | None, limit: int, order: str, purpose: str | None) -> dict[str, Any]:
        return await page(self.redis, self.k.files_of(owner), after, limit, order, self._load_many, purpose)

    async def _load_many(self, ids: list[str], purpose: str | None) -> tuple[set[str], list[dict[str, Any]]]:
        p = self.redis.pipeline(transaction=False)
        for fid in ids:
            p.hgetall(self.k.file(fid))
        alive, out = set(), []
        for h in await p.execute():
            m = decode_hash(h)
            if m:
                alive.add(m["id"])
                if purpose is None or m.get("purpose") == purpose:
                    out.append(public_file(m))
        return alive, out


async def page(redis, index: str, after: str | None, limit: int, order: str, load, *extra) -> dict[str, Any]:
    """Cursor pagination over an owner's index (zset by creation time), OpenAI's list shape.

    Entries whose record expired are dropped from the index on the way."""
    desc = order != "asc"
    start = 0
    if after:
        rank = await (redis.zrevrank(index, after) if desc else redis.zrank(index, after))
        start = 0 if rank is None else rank + 1
    data: list[dict[str, Any]] = []
    more = False
    while len(data) <= limit:
        want = limit + 1 - len(data)
        raw = await (redis.zrevrange(index, start, start + want - 1) if desc else redis.zrange(index, start, start + want - 1))
        if not raw:
            break
        ids = [i.decode() if isinstance(i, bytes) else i for i in raw]
        alive, got = await load(ids, *extra)
        start += len(ids)
        gone = [i for i in ids if i not in alive]
        if gone:
            await redis.zrem(index, *gone)
            start -= len(gone)
        data.extend(got)
    if len(data) > limit:
        data, more = data[:limit], True
    return {
        "object": "list", "data": data, "has_more": more,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    }
