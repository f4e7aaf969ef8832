"""Shares the fleet view between gateway replicas through Redis, in a background task.

Each cycle (~150 ms) one pipelined round trip pushes this replica's deltas (per-second counters, finished-request
samples, its exact in-flight counts, cooldowns) and pulls the merged view. Replicas heartbeat in a sorted set; a
replica that stops heartbeating stops counting, so a crash cannot leak in-flight load. Without Redis configured the
same loop just folds local deltas into the local view. When Redis is unreachable the gateway keeps routing on
local data, reports `degraded`, and reconnects on its own.

Keys (prefix `gw`): hb (zset replica->ts), inflight (hash replica->json {upstream: n}), weights (hash),
cooldown (hash upstream->until), win:{upstream}:{sec//10} (hash "sec:field"->int, expires), samples:{upstream} (list).
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
SLOT = 10
REFIT_EVERY = 1.0


class FleetSync:
    def __init__(self, fleet: Fleet, replica_id: str, redis_url: str = "", prefix: str = "gw", interval: float = 0.15):
        self.fleet = fleet
        self.replica = replica_id
        self.prefix = prefix
        self.redis: aioredis.Redis | None = (
            aioredis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0) if redis_url else None
        )
        self.status = "ok" if self.redis else "disabled"
        self.last_ok = 0.0
        self._loop = Periodic("fleet-sync", interval, self.sync_once)
        self._stopped = False
        self._last_refit = 0.0
        self._cooldowns: dict[str, float] = {}

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
        self.fleet.upstreams[upstream].weight = weight
        if self.redis is not None:
            await self.redis.hset(self._k("weights"), upstream, repr(weight))

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

        i = len(res) - (len(ups) * len(slots)) - 4 - (len(ups) if refit else 0)
        alive = {x.decode() for x in res[i]}
        inflight_rows = res[i + 1]
        weights = res[i + 2]
        cooldowns = res[i + 3]
        i += 4
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
            wv = weights.get(n.encode())
            u.weight = float(wv) if wv is not None else u.cfg.weight
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
        if dead:
            p = self.redis.pipeline(transaction=False)
            p.hdel(self._k("inflight"), *dead)
            p.zremrangebyscore(self._k("hb"), "-inf", now - 10 * HEARTBEAT_TTL)
            await p.execute()
