"""The two content stores behind the Files API (gateway/batch/content.py), against real Redis and a real directory:
nothing is visible before commit, a commit replaces whole, abort and delete leave nothing, and the directory sweep
removes exactly the contents whose metadata is gone and the temporaries of dead writers."""

from __future__ import annotations

import os
import time

import pytest

from gateway.batch import content as cs
from gateway.batch.keys import BatchKeys


@pytest.fixture(params=["redis", "dir"])
def store(request, redis_client, redis_prefix, tmp_path) -> cs.ContentStore:
    if request.param == "redis":
        return cs.RedisContentStore(redis_client, BatchKeys(redis_prefix))
    return cs.DirContentStore(tmp_path / redis_prefix, orphan_grace=60.0)


async def read(store: cs.ContentStore, fid: str) -> bytes:
    return b"".join([c async for c in store.chunks(fid)])


async def residue(store: cs.ContentStore, redis_client, redis_prefix: str) -> list:
    if isinstance(store, cs.DirContentStore):
        return sorted(p.name for p in store.root.iterdir())
    return sorted([k async for k in redis_client.scan_iter(f"{redis_prefix}:*")])


async def test_content_is_invisible_until_commit_then_whole(store):
    w = store.writer("file-a")
    await w.append(b'{"x": 1}\n')
    await w.append(b'{"x": 2}\n')
    assert await read(store, "file-a") == b"" and await store.size("file-a") == 0
    await w.commit(60)
    assert await read(store, "file-a") == b'{"x": 1}\n{"x": 2}\n' and await store.size("file-a") == 18


async def test_two_writers_of_one_id_replace_never_interleave(store, redis_client, redis_prefix):
    """A finalization retried on another replica writes the same output id: the last commit wins, whole."""
    first, second = store.writer("file-o"), store.writer("file-o")
    for i in range(3):
        await first.append(b"first %d\n" % i)
        await second.append(b"second %d\n" % i)
    await first.commit(60)
    assert await read(store, "file-o") == b"first 0\nfirst 1\nfirst 2\n"
    await second.commit(60)
    assert await read(store, "file-o") == b"second 0\nsecond 1\nsecond 2\n"
    assert len(await residue(store, redis_client, redis_prefix)) == 1  # no temporaries left


async def test_abort_and_delete_leave_nothing(store, redis_client, redis_prefix):
    w = store.writer("file-b")
    await w.append(b"partial\n")
    await w.abort()
    assert await residue(store, redis_client, redis_prefix) == []
    w = store.writer("file-c")
    await w.append(b"kept\n")
    await w.commit(60)
    await store.delete("file-c")
    await store.delete("file-c")  # another replica deleting too is fine
    assert await store.size("file-c") == 0 and await residue(store, redis_client, redis_prefix) == []


async def test_redis_contents_expire_with_the_commit_ttl(redis_client, redis_prefix):
    store = cs.RedisContentStore(redis_client, BatchKeys(redis_prefix))
    w = store.writer("file-t")
    await w.append(b"x\n")
    assert 0 < await redis_client.ttl(w.tmp) <= cs.PART_TTL  # a dead writer's temporary expires too
    await w.commit(77)
    assert 0 < await redis_client.ttl(f"{redis_prefix}:bf:file-t:c") <= 77


async def test_directory_sweep_removes_only_orphans_and_dead_temporaries(tmp_path):
    store = cs.DirContentStore(tmp_path, orphan_grace=60.0)
    for fid in ("file-live", "file-orphan", "file-young-orphan"):
        w = store.writer(fid)
        await w.append(b"data\n")
        await w.commit(60)
    dead, live_tmp = store.writer("file-dead"), store.writer("file-writing")
    await dead.append(b"half")
    await live_tmp.append(b"half")
    old = time.time() - cs.PART_TTL - 10
    for p in (tmp_path / "file-live", tmp_path / "file-orphan", dead.tmp):
        os.utime(p, (old, old))
    asked: list[str] = []

    async def live(ids: list[str]) -> set[str]:
        asked.extend(ids)
        return {"file-live"}

    assert await store.sweep(live) == 2
    assert sorted(asked) == ["file-live", "file-orphan"]  # the young orphan is not judged yet (metadata may follow)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file-live", "file-young-orphan", live_tmp.tmp.name])
    await live_tmp.commit(60)
    assert (tmp_path / "file-writing").read_bytes() == b"half"


def test_directory_store_refuses_paths_as_ids(tmp_path):
    store = cs.DirContentStore(tmp_path)
    for bad in ("../etc/passwd", ".hidden", ""):
        with pytest.raises(ValueError):
            store.writer(bad)
