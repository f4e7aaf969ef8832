"""The Redis layout shared by gateway replicas: every key name, every encoding, and the schema version.

Changing the layout touches this module only. Keys (all under one prefix, default `gw`):

| key | type | what |
|---|---|---|
| `{p}:schema` | hash | replica id -> layout version it speaks (SCHEMA_VERSION) |
| `{p}:hb` | zset | replica id -> last heartbeat (epoch s); stale members are dead replicas |
| `{p}:inflight` | hash | replica id -> JSON {upstream: in-flight count}, non-zero counts only |
| `{p}:gen` | hash | `weights` / `cooldown` -> change counter, so replicas re-read those hashes only when bumped |
| `{p}:weights` | hash | upstream -> operator weight (admin API) |
| `{p}:weights:ver` | hash | upstream -> version of that weight (ms clock, increasing): newer wins, lost ones are written back |
| `{p}:cooldown` | hash | upstream -> cooldown end (epoch s, Retry-After shared by every replica) |
| `{p}:win:{upstream}:{sec//10}` | hash | `sec:field:replica` -> this replica's absolute total (expires) |
| `{p}:act` | zset | JSON [slot, replica, upstream] -> when a window slot was last written: what changed, for delta pulls |
| `{p}:samples:{upstream}` | list | finished-request samples (Sample.to_row), newest last, trimmed |
| `{p}:sampled` | zset | upstream -> when samples were last pushed |
| `{p}:keys` | hash | sha256(api key) -> JSON record (gateway/auth.py) |
| `{p}:keys:ver` | string | bumped on every key change |

Pipeline replies are decoded by name (`Batch`), never by position, so adding a command cannot shift the others.

Version 1 was the layout before `schema`, `gen`, `act` and `sampled` existed (every replica pulled every window
every cycle). A replica that finds a live replica speaking another version must not merge its view: the two
would silently disagree about what the keys mean. `mismatched()` says who; fleet_sync logs it at ERROR and
reports it on /healthz.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable
from typing import Any

SCHEMA_VERSION = 2
#: What a live replica that never announced a version speaks (it predates the `schema` hash).
LEGACY_VERSION = 1
#: Seconds per window slot key: one hash holds ten seconds of per-second counters.
SLOT = 10


class Keys:
    """Names every key of one deployment (one prefix)."""

    __slots__ = ("prefix", "schema", "hb", "inflight", "gen", "weights", "weights_ver", "cooldown", "act", "sampled", "keys", "keys_ver")

    def __init__(self, prefix: str = "gw") -> None:
        self.prefix = prefix
        self.schema = f"{prefix}:schema"
        self.hb = f"{prefix}:hb"
        self.inflight = f"{prefix}:inflight"
        self.gen = f"{prefix}:gen"
        self.weights = f"{prefix}:weights"
        self.weights_ver = f"{prefix}:weights:ver"
        self.cooldown = f"{prefix}:cooldown"
        self.act = f"{prefix}:act"
        self.sampled = f"{prefix}:sampled"
        self.keys = f"{prefix}:keys"
        self.keys_ver = f"{prefix}:keys:ver"

    def win(self, upstream: str, slot: int) -> str:
        return f"{self.prefix}:win:{upstream}:{slot}"

    def samples(self, upstream: str) -> str:
        return f"{self.prefix}:samples:{upstream}"


# ---- encodings ------------------------------------------------------------------------------------------------
def text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def encode_inflight(counts: dict[str, int]) -> str:
    """Only non-zero counts: an idle fleet's row stays a few bytes whatever the number of upstreams."""
    return json.dumps({n: c for n, c in counts.items() if c}, separators=(",", ":"), sort_keys=True)


def decode_inflight(raw: bytes | str) -> dict[str, int]:
    try:
        d = json.loads(raw)
        return {str(n): int(c) for n, c in d.items()} if isinstance(d, dict) else {}
    except (ValueError, TypeError):
        return {}


def encode_window(secs: dict[int, list[int]], replica: str) -> dict[int, dict[str, int]]:
    """This replica's per-second totals grouped by slot key: {slot: {"sec:field:replica": total}} (zeros left out)."""
    out: dict[int, dict[str, int]] = {}
    for s, vals in secs.items():
        fields = out.setdefault(s // SLOT, {})
        for i, v in enumerate(vals):
            if v:
                fields[f"{s}:{i}:{replica}"] = v
    return {sl: f for sl, f in out.items() if f}


def decode_window(raw: dict, skip_replica: str) -> list[tuple[int, int, int]]:
    """(sec, field, value) of every replica but `skip_replica` (its own part is kept exactly in memory)."""
    mine = skip_replica.encode()
    rows = []
    for f, v in raw.items():
        f = f if isinstance(f, bytes) else f.encode()
        parts = f.split(b":", 2)
        if len(parts) != 3 or parts[2] == mine:
            continue
        try:
            rows.append((int(parts[0]), int(parts[1]), int(v)))
        except ValueError:
            continue
    return rows


def encode_float(v: float) -> str:
    return repr(float(v))


def decode_floats(raw: dict) -> dict[str, float]:
    out = {}
    for k, v in raw.items():
        try:
            out[text(k)] = float(v)
        except ValueError:
            continue
    return out


def encode_act(upstream: str, slot: int, replica: str) -> str:
    """Who wrote which slot: a reader skips its own writes (it knows them exactly) and re-reads the rest."""
    return json.dumps([slot, replica, upstream], separators=(",", ":"))


def decode_act(member: bytes | str) -> tuple[str, int, str] | None:
    """(upstream, slot, replica) of an `act` member, None when unreadable."""
    try:
        slot, replica, upstream = json.loads(member)
        return str(upstream), int(slot), str(replica)
    except (ValueError, TypeError):
        return None


def decode_members(raw: Iterable) -> list[str]:
    return [text(x) for x in raw]


def decode_counters(raw: dict) -> dict[str, int]:
    out = {}
    for k, v in raw.items():
        try:
            out[text(k)] = int(v)
        except ValueError:
            continue
    return out


def mismatched(alive: Iterable[str], versions: dict[str, int], me: str, mine: int = SCHEMA_VERSION) -> dict[str, int]:
    """Live replicas whose layout version differs from `mine` (no announcement = the legacy layout)."""
    return {r: v for r in alive if r != me and (v := versions.get(r, LEGACY_VERSION)) != mine}


# ---- pipelines decoded by name --------------------------------------------------------------------------------
def _size(v: Any) -> int:
    """Approximate wire bytes of a reply (for the per-round cost report)."""
    if isinstance(v, (bytes, str)):
        return len(v)
    if isinstance(v, dict):
        return sum(_size(k) + _size(x) for k, x in v.items())
    if isinstance(v, (list, tuple, set)):
        return sum(_size(x) for x in v)
    return 8


class Batch:
    """One pipelined round trip whose replies are looked up by the name each command was queued under.

    `write(...)` queues a command whose reply is not needed; `read(name, decode, ...)` one whose decoded reply is
    `result[name]`. Command and byte counts feed the sync cost figures.
    """

    def __init__(self, redis: Any) -> None:
        self.pipe = redis.pipeline(transaction=False)
        self._names: list[tuple[Hashable | None, Callable[[Any], Any] | None]] = []
        self.bytes_out = 0
        self.bytes_in = 0

    def __len__(self) -> int:
        return len(self._names)

    def write(self, cmd: str, *args: Any, **kw: Any) -> None:
        self._queue(None, None, cmd, args, kw)

    def read(self, name: Hashable, decode: Callable[[Any], Any] | None, cmd: str, *args: Any, **kw: Any) -> None:
        self._queue(name, decode, cmd, args, kw)

    def _queue(self, name: Hashable | None, decode: Callable[[Any], Any] | None, cmd: str, args: tuple, kw: dict) -> None:
        getattr(self.pipe, cmd)(*args, **kw)
        self._names.append((name, decode))
        self.bytes_out += _size(args) + _size(kw.get("mapping") or {})

    async def execute(self) -> dict[Hashable, Any]:
        if not self._names:
            return {}
        replies = await self.pipe.execute()
        out: dict[Hashable, Any] = {}
        for (name, decode), reply in zip(self._names, replies, strict=True):
            if name is None:
                continue
            self.bytes_in += _size(reply)
            out[name] = decode(reply) if decode is not None else reply
        return out
