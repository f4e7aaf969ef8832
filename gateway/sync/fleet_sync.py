"""Shares the fleet view between gateway replicas through Redis, in a background task.

Each cycle (~150 ms) one pipelined round trip pushes this replica's deltas (per-second counters, finished-request
samples, its exact in-flight counts, cooldowns) and pulls the merged view. Replicas heartbeat in a sorted set; a
replica that stops heartbeating stops counting, so a crash cannot leak in-flight load. Without Redis configured the
same loop just folds local deltas into the local view. When Redis is unreachable the gateway keeps routing on
local data, reports `degraded`, and reconnects on its own.

Keys (prefix `gw`): hb (zset replica->ts), inflight (hash replica->json {upstream: n}), weights (hash
upstream->weight), weights:ver (hash upstream->version), cooldown (hash upstream->until),
win:{upstream}:{sec//10} (hash "sec:field"->int, expires), samples:{upstream} (list).

Admin weights are durable without Redis persistence: a change is written to Redis first (atomically, with a
version = max(wall-clock ms, previous version + 1)) and only then applied locally, so a change made while Redis is
down fails cleanly (StoreUnavailable) and changes nothing. Every replica remembers the newest (weight, version) it
has seen; when Redis comes back empty (or holds an older version) the replicas write theirs back, and a
compare-and-set on the version means a stale replica can never override a newer change.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from gateway.periodic import Periodic
from gateway.routing.capacity import Sample
from gateway.state.fleet import Fleet
from gateway.state.stats import WINDOW_S, Window

log = logging.getLogger("gateway.sync.fleet_sync")

HEARTBEAT_TTL = 3.0
STORE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
SOCKET_TIMEOUT = 1.0
WRITE_DEADLINE = SOCKET_TIMEOUT / 2  # an admin write that reaches Redis later than this is refused there

# KEYS: weights, weights:ver. ARGV: upstream, weight, now_ms, deadline_ms. Returns the new version, or -1 when
# it runs after the deadline: a command that sat in a frozen server's buffer past the client's timeout must not
# land after the client was told "nothing changed" (assumes the clocks agree to well under a second).
_SET_WEIGHT = """
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[4]) then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local v = math.max(tonumber(ARGV[3]), cur + 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], v)
return v
"""
# KEYS: weights, weights:ver. ARGV: (upstream, weight, version)*. Writes only what is newer than Redis holds.
_WRITE_BACK = """
for i = 1, #ARGV, 3 do
  local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if tonumber(ARGV[i + 2]) > cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  end
end
return 0
"""


class StoreUnavailable(Exception):
    """The shared store could not record an admin change; nothing was changed."""

SLOT = 10
REFIT_EVERY = 1.0


class FleetSync:
    def __init__(self, fleet: Fleet, replica_id: str, redis_url: str = "", prefix: str = "gw", interval: float = 0.15):
        self.fleet = fleet
        self.replica = replica_id
        self.prefix = prefix
        self.redis: aioredis.Redis | None = (
            aioredis.from_url(redis_url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT) if redis_url else None
        )
        self.status = "ok" if self.redis else "disabled"
        self.last_ok = 0.0
        self._loop = Periodic("fleet-sync", interval, self.sync_once)
        self._stopped = False
        self._last_refit = 0.0
        self._cooldowns: dict[str, float] = {}
        #: Newest admin weight version seen per upstream (0 = the config weight, never changed).
        self.weight_versions: dict[str, int] = {}

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.sync_once()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self.redis is not None and not self._stopped:
            self._stopped = True
            try:
                await self.sync_once()  # flush the last deltas
                p = self.redis.pipeline(transaction=False)
                p.zrem(self._k("hb"), self.replica)
                p.hdel(self._k("inflight"), self.replica)
                await p.execute()
            except (RedisError, OSError, asyncio.TimeoutError):
                pass
            await self.redis.aclose()

    # ---- operator actions (shared through Redis) ------------------------------------------------------------
    def set_cooldown(self, upstream: str, until: float) -> None:
        u = self.fleet.upstreams[upstream]
        if until > u.cooldown_until:
            u.cooldown_until = until
            self._cooldowns[upstream] = until

    async def set_weight(self, upstream: str, weight: float) -> None:
        """Record in Redis first, then apply here; raise StoreUnavailable (nothing changed) when Redis fails."""
        version = self.weight_versions.get(upstream, 0) + 1
        if self.redis is not None:
            try:
                keys = [self._k("weights"), self._k("weights", "ver")]
                now_ms = int(time.time() * 1000)
                deadline = now_ms + int(WRITE_DEADLINE * 1000)
                res = await self.redis.eval(_SET_WEIGHT, 2, *keys, upstream, repr(weight), now_ms, deadline)
            except STORE_ERRORS as e:
                raise StoreUnavailable(f"the shared store (Redis) is unavailable: {type(e).__name__}") from None
            if int(res) < 0:
                raise StoreUnavailable("the shared store (Redis) answered too late")
            version = int(res)
        self.fleet.upstreams[upstream].weight = weight
        self.weight_versions[upstream] = version

    def _apply_weights(self, weights: dict[bytes, bytes], versions: dict[bytes, bytes]) -> list[str]:
        """Adopt newer weights from Redis; return the upstreams whose newer weight Redis lost (to write back)."""
        stale = []
        for n, u in self.fleet.upstreams.items():
            mine = self.weight_versions.get(n, 0)
            theirs = int(versions.get(n.encode(), b"0"))
            wv = weights.get(n.encode())
            if wv is not None and theirs >= mine:
                u.weight = float(wv)
                self.weight_versions[n] = theirs
            elif mine > theirs:
                stale.append(n)  # Redis restarted empty, or holds an older change: ours is newer
            else:
                u.weight = u.cfg.weight
        return stale

    async def _write_back(self, names: list[str]) -> None:
        assert self.redis is not None
        args: list[str | int] = []
        for n in names:
            args += [n, repr(self.fleet.upstreams[n].weight), self.weight_versions[n]]
        await self.redis.eval(_WRITE_BACK, 2, self._k("weights"), self._k("weights", "ver"), *args)
        log.info("wrote admin weights back to redis: %s", ", ".join(names))

    # ---- one cycle -----------------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def sync_once(self) -> None:
        now = time.time()
        ups = self.fleet.upstreams
        dirty = {n: u.take_dirty() for n, u in ups.items()}
        samples = {n: u.take_samples() for n, u in ups.items()}
        if self.redis is None:
            for n, u in ups.items():
                u.samples.extend(samples[n])
            self._refresh(now)
            return
        try:
            await self._exchange(now, dirty, samples)
            self.last_ok = now
            if self.status == "degraded":
                log.warning("redis reachable again; fleet view shared")
                for u in ups.values():  # Redis may have restarted empty: give it this replica's whole window back
                    u.dirty.update(u.mine.buckets)
            self.status = "ok"
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            for n, u in ups.items():
                u.dirty.update(dirty[n])  # absolute totals: writing them again later is safe
                u.samples.extend(samples[n])  # not re-sent (a timed-out write may have landed); refits use them
                if now - self.last_ok > 5 * HEARTBEAT_TTL:
                    u.inflight_remote = 0  # other replicas' load is unknown by now
            if self.status != "degraded":
                log.warning("redis unavailable (%s); routing on local data", type(e).__name__)
            self.status = "degraded"
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        refit = now - self._last_refit >= REFIT_EVERY
        for u in self.fleet.upstreams.values():
            u.refresh(now)
            if refit:
                u.refit(now)
        if refit:
            self._last_refit = now

    async def _exchange(self, now: float, dirty: dict[str, dict[int, list[int]]], samples: dict[str, list[Sample]]) -> None:
        assert self.redis is not None
        ups = self.fleet.upstreams
        sec = int(now)
        me = self.replica
        p = self.redis.pipeline(transaction=False)
        p.zadd(self._k("hb"), {me: now})
        p.hset(self._k("inflight"), me, json.dumps({n: u.inflight_local for n, u in ups.items()}))
        for n, secs in dirty.items():
            by_slot: dict[int, dict[FieldT, EncodableT]] = {}  # redis-py's own types: Mapping keys are invariant
            for s, vals in secs.items():
                fields = by_slot.setdefault(s // SLOT, {})
                for i, v in enumerate(vals):
                    if v:
                        fields[f"{s}:{i}:{me}"] = v
            for sl, fields in by_slot.items():
                if fields:
                    key = self._k("win", n, str(sl))
                    p.hset(key, mapping=fields)
                    p.expire(key, WINDOW_S + 2 * SLOT)
            if samples[n]:
                p.rpush(self._k("samples", n), *(x.to_row() for x in samples[n]))
                p.ltrim(self._k("samples", n), -400, -1)
        cooldowns, self._cooldowns = self._cooldowns, {}  # set during the round trip: sent next cycle
        if cooldowns:
            p.hset(self._k("cooldown"), mapping={k: repr(v) for k, v in cooldowns.items()})
        p.zrangebyscore(self._k("hb"), now - HEARTBEAT_TTL, "+inf")
        p.hgetall(self._k("inflight"))
        p.hgetall(self._k("weights"))
        p.hgetall(self._k("weights", "ver"))
        p.hgetall(self._k("cooldown"))
        slots = range((sec - WINDOW_S) // SLOT, sec // SLOT + 1)
        for n in ups:
            for sl in slots:
                p.hgetall(self._k("win", n, str(sl)))
        refit = now - self._last_refit >= REFIT_EVERY
        if refit:
            for n in ups:
                p.lrange(self._k("samples", n), 0, -1)
        try:
            res = await p.execute()
        except BaseException:
            for k, until in cooldowns.items():
                self._cooldowns[k] = max(until, self._cooldowns.get(k, 0.0))
            raise

        i = len(res) - (len(ups) * len(slots)) - 5 - (len(ups) if refit else 0)
        alive = {x.decode() for x in res[i]}
        inflight_rows = res[i + 1]
        stale_weights = self._apply_weights(res[i + 2], res[i + 3])
        cooldowns = res[i + 4]
        i += 5
        remote = {n: 0 for n in ups}
        dead = []
        for rep, row in inflight_rows.items():
            rep = rep.decode()
            if rep == self.replica:
                continue
            if rep not in alive:
                dead.append(rep)
                continue
            for n, c in json.loads(row).items():
                if n in remote:
                    remote[n] += int(c)
        live = sorted(alive | {me})
        rank = live.index(me)
        for n, u in ups.items():
            u.inflight_remote = remote[n]
            u.replicas = len(live)
            u.rank = rank
            cv = cooldowns.get(n.encode())
            if cv is not None:
                u.cooldown_until = max(u.cooldown_until, float(cv))
            others = Window()
            mine = me.encode()
            for _ in slots:
                for f, v in res[i].items():
                    s, field, rep = f.split(b":", 2)
                    if rep != mine:
                        others.add(int(s), int(field), int(v))
                i += 1
            u.others = others
        if refit:
            for n, u in ups.items():
                u.samples.clear()
                u.samples.extend(Sample.from_row(r) for r in res[i])
                i += 1
        self._refresh(now)
        if stale_weights:
            await self._write_back(stale_weights)
        if dead:
            p = self.redis.pipeline(transaction=False)
            p.hdel(self._k("inflight"), *dead)
            p.zremrangebyscore(self._k("hb"), "-inf", now - 10 * HEARTBEAT_TTL)
            await p.execute()
