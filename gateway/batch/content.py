"""Where file CONTENTS live: Redis (default) or a directory shared by every replica (GATEWAY_BATCH_FILES_DIR).

Metadata, owner indexes, batch records and the queue stay in Redis either way; only the bytes move, because they
are what makes Redis memory grow with the largest accepted batch. Both stores share one shape so the upload path,
finalization (output/error files), reads, deletes and the retention sweep never ask which one is configured:

- a writer appends chunks to a private place (a temporary Redis key, a hidden temporary file) and `commit`
  publishes them under the file id in one atomic step (RENAME / rename(2)), so no reader ever sees half a file
  and two replicas writing the same id (a finalization retried after a lost lease) replace, never interleave;
- `chunks` streams the content in bounded pieces (Redis: the stored ~1 MiB runs of lines; directory: 1 MiB reads,
  not aligned to lines: readers that want lines carry the remainder, see FileStore.lines);
- retention: Redis keys carry the TTL themselves; a file in the directory is removed by `sweep` once its Redis
  metadata (which carries the TTL) is gone, so both backends keep a file exactly as long as its metadata.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Protocol

from gateway.batch.keys import BatchKeys

log = logging.getLogger("gateway.batch")
READ_BYTES = 1 << 20
#: A temporary (uncommitted) content untouched this long belongs to a writer that died: removed by the sweep
#: (a live writer appends at least every ~1 MiB of upload or of results, far more often than this).
PART_TTL = 6 * 3600
#: ids -> the subset whose metadata still exists (the sweep's only question to Redis).
LiveIds = Callable[[list[str]], Awaitable[set[str]]]


class ContentWriter(Protocol):
    async def append(self, chunk: bytes) -> None: ...

    async def commit(self, ttl: int) -> None:
        """Publish what was appended under the file id (replacing any previous content), kept `ttl` seconds."""

    async def abort(self) -> None:
        """Drop what was appended; the file id is untouched."""


class ContentStore(Protocol):
    def writer(self, fid: str) -> ContentWriter: ...

    def chunks(self, fid: str) -> AsyncIterator[bytes]:
        """The committed content in bounded pieces; nothing when there is none."""

    async def delete(self, fid: str) -> None: ...

    async def size(self, fid: str) -> int:
        """Bytes stored for the file (0 when there is none)."""

    async def sweep(self, live: LiveIds) -> int:
        """Remove contents whose metadata is gone and temporaries of dead writers; -> how many were removed."""


# ---- Redis ------------------------------------------------------------------------------------------------------
# KEYS: chunks list. Sums the chunk lengths inside Redis (one chunk at a time, nothing crosses the network).
_SIZE = """
local n = 0
for i = 0, redis.call('LLEN', KEYS[1]) - 1 do n = n + #redis.call('LINDEX', KEYS[1], i) end
return n
"""


class RedisContentWriter:
    def __init__(self, redis, final: str, tmp: str) -> None:
        self.redis, self.final, self.tmp = redis, final, tmp
        self.n = 0

    async def append(self, chunk: bytes) -> None:
        p = self.redis.pipeline(transaction=False)
        p.rpush(self.tmp, chunk)
        p.expire(self.tmp, PART_TTL)  # a writer that dies leaves nothing forever
        await p.execute()
        self.n += 1

    async def commit(self, ttl: int) -> None:
        p = self.redis.pipeline(transaction=True)
        if self.n:
            p.rename(self.tmp, self.final)
            p.expire(self.final, ttl)
        else:
            p.delete(self.final)  # an empty file has no chunks
        await p.execute()

    async def abort(self) -> None:
        await self.redis.delete(self.tmp)


class RedisContentStore:
    """Contents as Redis lists of chunks ({p}:bf:{id}:c), expiring with the file's metadata."""

    def __init__(self, redis, keys: BatchKeys) -> None:
        self.redis, self.k = redis, keys
        self._size = redis.register_script(_SIZE)

    def writer(self, fid: str) -> RedisContentWriter:
        return RedisContentWriter(self.redis, self.k.chunks(fid), self.k.chunks_tmp(fid, secrets.token_hex(6)))

    async def chunks(self, fid: str) -> AsyncIterator[bytes]:
        n = await self.redis.llen(self.k.chunks(fid))
        for i in range(n):
            c = await self.redis.lindex(self.k.chunks(fid), i)
            if c is not None:
                yield bytes(c)

    async def delete(self, fid: str) -> None:
        await self.redis.delete(self.k.chunks(fid))

    async def size(self, fid: str) -> int:
        return int(await self._size(keys=[self.k.chunks(fid)]))

    async def sweep(self, live: LiveIds) -> int:
        return 0  # every key carries its TTL


# ---- directory --------------------------------------------------------------------------------------------------
class DirContentWriter:
    """Appends to a hidden temporary file named after this writer alone; `commit` fsyncs and renames it."""

    def __init__(self, store: DirContentStore, fid: str) -> None:
        self.store, self.fid = store, fid
        self.tmp = store.root / f".{fid}.{secrets.token_hex(6)}.part"
        self._f: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        if self._f is None:
            self._f = open(self.tmp, "xb")  # noqa: SIM115 - closed by commit/abort
        return self._f

    async def append(self, chunk: bytes) -> None:
        await asyncio.to_thread(lambda: self._open().write(chunk))

    async def commit(self, ttl: int) -> None:
        await asyncio.to_thread(self._commit)

    def _commit(self) -> None:
        f = self._open()  # an empty file is a file
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self.tmp, self.store.path(self.fid))  # atomic: readers see the old content or the new, whole
        self.store.sync_dir()

    async def abort(self) -> None:
        await asyncio.to_thread(self._abort)

    def _abort(self) -> None:
        if self._f is not None:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


class DirContentStore:
    """Contents as files {dir}/{redis_prefix}/{file id}, for installs whose batches outgrow Redis memory.

    Safe for many replicas on one shared directory (NFS, a shared volume): temporaries carry a random suffix,
    publication is rename(2), deletes tolerate a file already gone, and any replica may sweep."""

    def __init__(self, root: Path, orphan_grace: float = 60.0) -> None:
        self.root = root
        #: A committed file whose metadata is missing is only removed once older than this: its writer publishes
        #: the content a moment before it writes the metadata.
        self.orphan_grace = orphan_grace
        root.mkdir(parents=True, exist_ok=True)

    def path(self, fid: str) -> Path:
        if not fid or "/" in fid or fid.startswith("."):
            raise ValueError(f"not a file id: {fid!r}")
        return self.root / fid

    def writer(self, fid: str) -> DirContentWriter:
        self.path(fid)
        return DirContentWriter(self, fid)

    async def chunks(self, fid: str) -> AsyncIterator[bytes]:
        try:
            f = await asyncio.to_thread(open, self.path(fid), "rb")
        except FileNotFoundError:
            return
        try:
            while data := await asyncio.to_thread(f.read, READ_BYTES):
                yield data
        finally:
            f.close()

    async def delete(self, fid: str) -> None:
        await asyncio.to_thread(self.path(fid).unlink, missing_ok=True)

    async def size(self, fid: str) -> int:
        try:
            return (await asyncio.to_thread(self.path(fid).stat)).st_size
        except FileNotFoundError:
            return 0

    def sync_dir(self) -> None:
        """Make a rename durable; some shared filesystems cannot fsync a directory (the rename still happened)."""
        try:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    async def sweep(self, live: LiveIds) -> int:
        now = time.time()
        committed, removed = await asyncio.to_thread(self._scan, now)
        for i in range(0, len(committed), 500):
            ids = committed[i:i + 500]
            alive = await live(ids)
            for fid in ids:
                if fid not in alive:
                    await self.delete(fid)
                    removed += 1
        if removed:
            log.info("batch files: removed %d contents past retention or left by dead writers", removed)
        return removed

    def _scan(self, now: float) -> tuple[list[str], int]:
        """Committed ids old enough to judge, and the count of dead writers' temporaries removed on the way."""
        ids, removed = [], 0
        with os.scandir(self.root) as it:
            for e in it:
                try:
                    age = now - e.stat().st_mtime
                except FileNotFoundError:
                    continue  # deleted or renamed meanwhile
                if e.name.startswith("."):
                    if e.name.endswith(".part") and age > PART_TTL:
                        Path(e.path).unlink(missing_ok=True)
                        removed += 1
                elif age > self.orphan_grace:
                    ids.append(e.name)
        return ids, removed


def content_store(files_dir: str, prefix: str, redis, keys: BatchKeys, retention: int) -> ContentStore:
    """The configured store: a directory when `files_dir` is set (one subdirectory per Redis prefix, so gateways
    with different prefixes on one directory never judge each other's files), else Redis."""
    if files_dir:
        return DirContentStore(Path(files_dir) / prefix, orphan_grace=min(60.0, float(retention)))
    return RedisContentStore(redis, keys)
