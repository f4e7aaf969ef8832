"""Shares the fleet view between gateway replicas through Redis, in a background task. Key layout: sync/store.py.

Each cycle (~150 ms) moves only what changed, so its cost follows traffic, not the size of the fleet:
1. poll (one pipelined round trip, a fixed handful of commands): heartbeat, live replicas and the layout version
   each speaks, the in-flight rows (non-zero counts only), the change counters of weights/cooldowns, and the
   window slots other replicas wrote since the last poll (`act`).
2. push + pull (a second round trip): this replica's per-second totals for the seconds that changed, its samples,
   its in-flight row (when it changed, and once a second as a heartbeat of its own); then reads of exactly the
   changed slots (at most MAX_SLOT_READS per cycle, the rest next cycle), weights/cooldowns only when their
   counter moved, and on refit cycles the sample lists that grew.
Idle upstreams are not read at all, except by a slow sweep (SWEEP_PER_CYCLE slot keys a cycle) that catches
a change the `act` index missed (a writer's clock more than ACT_MARGIN behind). Replicas heartbeat in a sorted
set; a replica that stops heartbeating stops counting, so a crash cannot leak in-flight load. Without Redis the
same loop folds local deltas into the local view. When Redis is unreachable the gateway keeps routing on local
data, reports `degraded`, and reconnects on its own. A live replica speaking another layout version is reported
(`version_mismatch`, ERROR log) and nothing is merged with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Hashable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.periodic import Periodic
from gateway.routing.capacity import Sample
from gateway.state.fleet import Fleet
from gateway.state.rate import WINDOW_S, Window
from gateway.state.stats import UpstreamStats
from gateway.sync import store
from gateway.sync.store import SCHEMA_VERSION, SLOT, Batch, Keys

log = logging.getLogger("gateway.sync.fleet_sync")

HEARTBEAT_TTL = 3.0
REFIT_EVERY = 1.0
#: Upstreams with samples but none new are refitted this many per refit cycle (their samples age).
IDLE_REFIT_BATCH = 4
#: Per-cycle bounds: window slot reads, sample list reads, and slot keys re-read by the safety sweep.
MAX_SLOT_READS = 64
#: Upstreams whose deltas one cycle pushes (the rest keep their dirty seconds for the next cycles, in rotation).
MAX_PUSH_UPSTREAMS = 128
MAX_SAMPLE_READS = 16
SWEEP_PER_CYCLE = 2
#: A slot written up to this long before the previous poll is still picked up (tolerated clock skew).
ACT_MARGIN = 1.0
INFLIGHT_RESEND = 1.0
CLEAN_EVERY = 10.0
SAMPLES_KEPT = 400
_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
SOCKET_TIMEOUT = 1.0
STOP_TIMEOUT = 3 * SOCKET_TIMEOUT
WRITE_DEADLINE = SOCKET_TIMEOUT / 2  # an admin write that reaches Redis later than this is refused there

# Admin weights are durable without Redis persistence: a change is written to Redis first (atomically, with a
# version = max(wall-clock ms, previous version + 1)) and only then applied locally, so a change made while Redis
# is down fails cleanly (StoreUnavailable) and changes nothing. Every replica remembers the newest (weight, version)
# it has seen; when Redis comes back empty (or holds an older version) the replicas write theirs back, and a
# compare-and-set on the version means a stale replica can never override a newer change.
# KEYS: weights, weights:ver, gen. ARGV: upstream, weight, now_ms, deadline_ms. Returns the new version, or -1 when
# it runs after the deadline: a command that sat in a frozen server's buffer past the client's timeout must not
# land after the client was told "nothing changed" (assumes the clocks agree to well under a second).
_SET_WEIGHT = """
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[4]) then return -1 end
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local v = math.max(tonumber(ARGV[3]), cur + 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], v)
redis.call('HINCRBY', KEYS[3], 'weights', 1)
return v
"""
# KEYS: weights, weights:ver, gen. ARGV: (upstream, weight, version)*. Writes only what is newer than Redis holds.
_WRITE_BACK = """
local n = 0
for i = 1, #ARGV, 3 do
  local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0')
  if tonumber(ARGV[i + 2]) > cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[3], 'weights', 1) end
return n
"""


class StoreUnavailable(Exception):
    """The shared store could not record an admin change; nothing was changed."""


class SyncCost:
    """Commands and approximate bytes this replica moved through Redis, for /v1/gateway/info and the bench."""

    def __init__(self) -> None:
        self.rounds = self.commands = self.bytes_out = self.bytes_in = 0

    def add(self, b: Batch) -> None:
        self.commands += len(b)
        self.bytes_out += b.bytes_out
        self.bytes_in += b.bytes_in

    def snapshot(self) -> dict[str, float]:
        r = max(1, self.rounds)
        return {"rounds": self.rounds, "commands": self.commands, "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
                "commands_per_round": round(self.commands / r, 2), "bytes_per_round": round((self.bytes_out + self.bytes_in) / r)}


class FleetSync:
    def __init__(self, fleet: Fleet, replica_id: str, redis_url: str = "", prefix: str = "gw", interval: float = 0.15):
        self.fleet = fleet
        self.replica = replica_id
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.redis: aioredis.Redis | None = (
            aioredis.from_url(redis_url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT) if redis_url else None
        )
        self.status = "ok" if self.redis else "disabled"
        self.detail = ""
        #: The layout version this replica speaks (an instance attribute so a test can run another version).
        self.schema_version = SCHEMA_VERSION
        self.last_ok = 0.0
        self.replicas = 1
        self.cost = SyncCost()
        #: Newest admin weight version seen per upstream (0 = the config weight, never changed).
        self.weight_versions: dict[str, int] = {}
        self._stale_weights: list[str] = []
        self._loop = Periodic("fleet-sync", interval, self.sync_once)
        self._stopped = False
        self._last_refit = 0.0
        self._cooldowns: dict[str, float] = {}
        self._slots: dict[str, dict[int, Window]] = {}  # other replicas' counts per upstream per slot key
        self._pending: dict[tuple[str, int], None] = {}  # slots known changed, not read yet (FIFO)
        self._seen: dict[bytes, float] = {}  # `act` member -> the write time last acted on
        self._pending_samples: set[str] = set()
        self._poll_at = 0.0  # the `act` cutoff: changes after this (minus ACT_MARGIN) are new
        self._sample_poll_at = 0.0
        self._gen: dict[str, int] = {}
        self._remote_names: set[str] = set()
        self._inflight_sent: tuple[str, float] = ("", 0.0)
        self._last_clean = 0.0
        self._last_prune = 0.0
        self._sweep = 0
        self._push_from = 0
        self._idle_refit = 0
        self._live: list[str] = [replica_id]
        self._pending_fits: set[str] = set()  # upstreams with new samples, refitted at the next refit cycle

    # ---- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.sync_once()
        for _ in range(50):  # a big fleet's first load can take more than one bounded cycle
            if not (self._pending or self._pending_samples) or self.status != "ok":
                break
            await self.sync_once()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self.redis is not None and not self._stopped:
            self._stopped = True
            try:  # bounded: a store that stopped answering must not hold up the shutdown
                await asyncio.wait_for(self._leave(), STOP_TIMEOUT)
            except _ERRORS:
                pass
            await self.redis.aclose()

    async def _leave(self) -> None:
        """Flush the last deltas and take this replica out of the heartbeat, in-flight and layout rows."""
        assert self.redis is not None
        await self.sync_once()
        b = Batch(self.redis)
        b.write("zrem", self.keys.hb, self.replica)
        b.write("hdel", self.keys.inflight, self.replica)
        b.write("hdel", self.keys.schema, self.replica)
        await b.execute()

    # ---- operator actions (shared through Redis) ------------------------------------------------------------
    def set_cooldown(self, upstream: str, until: float) -> None:
        if self.fleet.upstreams[upstream].set_cooldown(until):
            self._cooldowns[upstream] = until
            self.fleet.changed.add(upstream)

    async def set_weight(self, upstream: str, weight: float) -> None:
        """Record in Redis first, then apply here; raise StoreUnavailable (nothing changed) when Redis fails."""
        version = self.weight_versions.get(upstream, 0) + 1
        if self.redis is not None:
            k = self.keys
            now_ms = int(time.time() * 1000)
            try:
                res = await self.redis.eval(_SET_WEIGHT, 3, k.weights, k.weights_ver, k.gen, upstream,
                                            store.encode_float(weight), now_ms, now_ms + int(WRITE_DEADLINE * 1000))
            except _ERRORS as e:
                raise StoreUnavailable(f"the shared store (Redis) is unavailable: {type(e).__name__}") from None
            if int(res) < 0:
                raise StoreUnavailable("the shared store (Redis) answered too late")
            version = int(res)
        self.fleet.upstreams[upstream].set_weight(weight)
        self.weight_versions[upstream] = version
        self.fleet.changed.add(upstream)

    def info(self) -> dict[str, Any]:
        cached = sum(len(w.buckets) for c in self._slots.values() for w in c.values())
        return {"status": self.status, "detail": self.detail, "schema_version": self.schema_version,
                "replicas": self.replicas, "cost": self.cost.snapshot(), "pending_slot_reads": len(self._pending),
                "cached_slot_seconds": cached, "act_index_entries": len(self._seen)}

    # ---- one cycle -----------------------------------------------------------------------------------------
    async def sync_once(self) -> None:
        now = time.time()
        ups = self.fleet.upstreams
        active = self._to_push()
        dirty = {u.name: u.take_dirty() for u in active}
        samples = {u.name: s for u in active if (s := u.take_samples())}
        if self.redis is None:
            for n, s in samples.items():
                ups[n].keep_samples(s)
            self._refresh(now, set(samples))
            return
        try:
            await self._exchange(now, dirty, samples)
            self.last_ok = now
            if self.status == "degraded":
                log.warning("redis reachable again; fleet view shared")
                self._inflight_sent = ("", 0.0)
                for u in ups.values():  # Redis may have restarted empty: give it this replica's whole window back
                    u.rates.mark_dirty()
            if self.status != "version_mismatch":
                self.status = "ok"
        except _ERRORS as e:
            self._failed(now, e, dirty, samples)

    def _to_push(self) -> list[UpstreamStats]:
        """Upstreams with deltas, at most MAX_PUSH_UPSTREAMS, starting where the last capped cycle stopped."""
        active = [u for u in self.fleet.upstreams.values() if u.rates.dirty or u.learned.pending]  # per upstream per cycle: reads only
        if len(active) <= MAX_PUSH_UPSTREAMS:
            return active
        start = self._push_from % len(active)
        self._push_from = start + MAX_PUSH_UPSTREAMS
        return (active[start:] + active[:start])[:MAX_PUSH_UPSTREAMS]

    def _failed(self, now: float, e: BaseException, dirty: dict[str, dict[int, list[int]]], samples: dict[str, list[Sample]]) -> None:
        ups = self.fleet.upstreams
        for n, secs in dirty.items():
            ups[n].rates.mark_dirty(secs)  # absolute totals: writing them again later is safe
        for n, s in samples.items():
            ups[n].keep_samples(s)  # not re-sent (a timed-out write may have landed); refits use them
        if now - self.last_ok > 5 * HEARTBEAT_TTL:
            for n in self._remote_names:
                ups[n].set_remote_inflight(0)  # other replicas' load is unknown by now
                self.fleet.changed.add(n)
            self._remote_names = set()
        if self.status != "degraded":
            log.warning("redis unavailable (%s); routing on local data", type(e).__name__)
        self.status = "degraded"
        self._refresh(now, set(samples))

    async def _exchange(self, now: float, dirty: dict[str, dict[int, list[int]]], samples: dict[str, list[Sample]]) -> None:
        polled = await self._poll(now)
        if self._version_conflict(polled):
            ups = self.fleet.upstreams
            for n, secs in dirty.items():  # written once the versions agree again
                ups[n].rates.mark_dirty(secs)
            for n, s in samples.items():  # keep what this replica learned; nothing is merged or written
                ups[n].keep_samples(s)
            self._refresh(now, set(samples))
            return
        dead = self._merge_inflight(polled)
        b = Batch(self.redis)
        cooldowns, self._cooldowns = self._cooldowns, {}  # set during the round trip: sent next cycle
        self._push(b, now, dirty, samples, cooldowns)
        plan = self._plan_pull(b, now, polled)
        if dead:
            b.write("hdel", self.keys.inflight, *dead)
            b.write("hdel", self.keys.schema, *dead)
        try:
            res = await b.execute()
        except BaseException:
            for k, v in cooldowns.items():
                self._cooldowns[k] = max(v, self._cooldowns.get(k, 0.0))
            for key in plan["slots"]:  # read them next time
                self._pending.setdefault(key, None)
            self._pending_samples.update(plan["sampled"])
            raise
        self.cost.add(b)
        self.cost.rounds += 1
        refitted = self._apply_pull(now, plan, res)
        self._refresh(now, refitted)
        await self._write_back()

    async def _poll(self, now: float) -> dict[Hashable, Any]:
        """Round trip 1: a fixed number of commands, whatever the number of upstreams."""
        k = self.keys
        b = Batch(self.redis)
        # The version goes first, every cycle: whoever sees this heartbeat also sees the version (after a Redis
        # restart too), so "live but no version" really means a replica that predates versions.
        b.write("hset", k.schema, self.replica, self.schema_version)
        b.write("zadd", k.hb, {self.replica: now})
        b.read("alive", store.decode_members, "zrangebyscore", k.hb, now - HEARTBEAT_TTL, "+inf")
        b.read("schema", store.decode_counters, "hgetall", k.schema)
        b.read("inflight", None, "hgetall", k.inflight)
        b.read("gen", store.decode_counters, "hgetall", k.gen)
        b.read("act", None, "zrangebyscore", k.act, self._poll_at - ACT_MARGIN, "+inf", withscores=True)
        if now - self._last_refit >= REFIT_EVERY:
            b.read("sampled", store.decode_members, "zrangebyscore", k.sampled, self._sample_poll_at - ACT_MARGIN, "+inf")
        res = await b.execute()
        self.cost.add(b)
        return res

    def _version_conflict(self, polled: dict[Hashable, Any]) -> bool:
        alive = set(polled["alive"]) | {self.replica}
        other = store.mismatched(alive, polled["schema"], self.replica, self.schema_version)
        if not other:
            if self.status == "version_mismatch":
                log.warning("fleet sync: no replica of another layout version is live any more; merging again")
                self.status, self.detail = "ok", ""
            return False
        detail = ", ".join(f"{r} speaks v{v}" for r, v in sorted(other.items()))
        if self.status != "version_mismatch" or detail != self.detail.partition(": ")[2]:
            log.error("fleet sync: Redis layout version mismatch (this replica speaks v%d): %s; NOT merging the "
                      "fleet view until every live replica runs the same version", self.schema_version, detail)
        self.status = "version_mismatch"
        self.detail = f"layout v{self.schema_version} here, other versions live: {detail}"
        return True

    def _merge_inflight(self, polled: dict[Hashable, Any]) -> list[str]:
        """Other live replicas' in-flight counts; returns the dead replicas whose rows are to be removed."""
        ups = self.fleet.upstreams
        alive = set(polled["alive"])
        remote: dict[str, int] = {}
        dead = []
        for rep_b, row in polled["inflight"].items():
            rep = store.text(rep_b)
            if rep == self.replica:
                continue
            if rep not in alive:
                dead.append(rep)
                continue
            for n, c in store.decode_inflight(row).items():
                if n in ups:
                    remote[n] = remote.get(n, 0) + c
        for n in self._remote_names | set(remote):
            u = ups[n]
            if u.inflight_remote != remote.get(n, 0):
                u.set_remote_inflight(remote.get(n, 0))
                self.fleet.changed.add(n)
        self._remote_names = set(remote)
        live = sorted(alive | {self.replica})
        if live != self._live:
            self._live = live
            self.replicas = len(live)
            rank = live.index(self.replica)
            for u in ups.values():  # only when membership changes
                u.set_membership(len(live), rank)
        return dead

    def _push(self, b: Batch, now: float, dirty: dict[str, dict[int, list[int]]], samples: dict[str, list[Sample]],
              cooldowns: dict[str, float]) -> None:
        k, me = self.keys, self.replica
        for n, secs in dirty.items():
            for sl, fields in store.encode_window(secs, me).items():
                key = k.win(n, sl)
                b.write("hset", key, mapping=fields)
                b.write("expire", key, WINDOW_S + 2 * SLOT)
                b.write("zadd", k.act, {store.encode_act(n, sl, me): now})
        for n, rows in samples.items():
            b.write("rpush", k.samples(n), *(x.to_row() for x in rows))
            b.write("ltrim", k.samples(n), -SAMPLES_KEPT, -1)
            b.write("zadd", k.sampled, {n: now})
        if cooldowns:
            b.write("hset", k.cooldown, mapping={n: store.encode_float(v) for n, v in cooldowns.items()})
            b.write("hincrby", k.gen, "cooldown", 1)
        row = store.encode_inflight({n: u.endpoint.inflight_local for n, u in self.fleet.upstreams.items() if u.endpoint.inflight_local})
        if row != self._inflight_sent[0] or now - self._inflight_sent[1] >= INFLIGHT_RESEND:
            b.write("hset", k.inflight, me, row)
            self._inflight_sent = (row, now)
        if now - self._last_clean >= CLEAN_EVERY:
            self._last_clean = now
            old = now - WINDOW_S - 3 * SLOT
            b.write("zremrangebyscore", k.act, "-inf", old)
            b.write("zremrangebyscore", k.sampled, "-inf", old)
            b.write("zremrangebyscore", k.hb, "-inf", now - 10 * HEARTBEAT_TTL)

    def _plan_pull(self, b: Batch, now: float, polled: dict[Hashable, Any]) -> dict[str, Any]:
        """Queue reads of what changed (bounded); returns what was queued, for _apply_pull."""
        k, ups = self.keys, self.fleet.upstreams
        lo = (int(now) - WINDOW_S) // SLOT
        first = self._poll_at == 0.0
        for m, at in polled["act"]:
            if self._seen.get(m) == at:  # seen in an earlier poll (the margin shows it again): read already
                continue
            self._seen[m] = at
            a = store.decode_act(m)
            if a is not None and a[2] != self.replica and a[0] in ups and a[1] >= lo:
                self._pending[(a[0], a[1])] = None
        self._poll_at = now
        names = list(ups)
        for _ in range(min(SWEEP_PER_CYCLE, len(names))):  # safety net for changes `act` did not show
            self._sweep = (self._sweep + 1) % len(names)
            self._pending.setdefault((names[self._sweep], int(now) // SLOT), None)
        slots = list(self._pending) if first else list(itertools.islice(self._pending, MAX_SLOT_READS))
        for key in slots:
            del self._pending[key]
        for n, sl in slots:
            b.read(("win", n, sl), None, "hgetall", k.win(n, sl))
        gen = polled["gen"]
        for h in ("weights", "cooldown"):
            if gen.get(h) != self._gen.get(h) or first:
                b.read(h, store.decode_floats, "hgetall", getattr(k, h))
                if h == "weights":
                    b.read("weights_ver", store.decode_counters, "hgetall", k.weights_ver)
        self._gen = gen
        sampled: list[str] = []
        if "sampled" in polled:
            self._pending_samples.update(n for n in polled["sampled"] if n in ups)
            self._sample_poll_at = now
            sampled = sorted(self._pending_samples)
            sampled = sampled if first else sampled[:MAX_SAMPLE_READS]
            self._pending_samples.difference_update(sampled)
            for n in sampled:
                b.read(("samples", n), None, "lrange", k.samples(n), 0, -1)
        return {"slots": slots, "sampled": sampled, "lo": lo}

    def _apply_pull(self, now: float, plan: dict[str, Any], res: dict[Hashable, Any]) -> set[str]:
        """Merge what round trip 2 read; returns the upstreams whose samples were replaced (to refit)."""
        ups = self.fleet.upstreams
        touched = set()
        for n, sl in plan["slots"]:
            w = Window()
            for s, f, v in store.decode_window(res[("win", n, sl)], self.replica):
                w.add(s, f, v)
            cache = self._slots.setdefault(n, {})
            if w or sl in cache:
                cache[sl] = w
                touched.add(n)
        if now - self._last_prune >= CLEAN_EVERY:  # idle upstreams' cached slots age out too
            self._last_prune = now
            touched.update(self._slots)
            old = now - WINDOW_S - 3 * SLOT
            self._seen = {m: at for m, at in self._seen.items() if at >= old}
        for n in touched:
            self._rebuild(ups[n], plan["lo"])
        self._apply_operator(res)
        for n in plan["sampled"]:
            ups[n].learned.replace(Sample.from_row(r) for r in res[("samples", n)])
        return set(plan["sampled"])

    def _apply_operator(self, res: dict[Hashable, Any]) -> None:
        """Weights and cooldowns, read only in cycles where their change counter moved."""
        ups, changed = self.fleet.upstreams, self.fleet.changed
        if "weights" in res:
            self._stale_weights = self._apply_weights(res["weights"], res.get("weights_ver", {}))
        for n, until in res.get("cooldown", {}).items():
            c = ups.get(n)
            if c is not None and c.set_cooldown(until):
                changed.add(n)

    def _apply_weights(self, weights: dict[str, float], versions: dict[str, int]) -> list[str]:
        """Adopt newer weights from Redis; return the upstreams whose newer weight Redis lost (to write back)."""
        stale = []
        for n, u in self.fleet.upstreams.items():
            mine, theirs = self.weight_versions.get(n, 0), versions.get(n, 0)
            if n in weights and theirs >= mine:
                w, self.weight_versions[n] = weights[n], theirs
            elif mine > theirs:
                stale.append(n)  # Redis restarted empty, or holds an older change: ours is newer
                continue
            else:
                w = u.cfg.weight
            if u.set_weight(w):
                self.fleet.changed.add(n)
        return stale

    async def _write_back(self) -> None:
        names, self._stale_weights = self._stale_weights, []
        if not names or self.redis is None:
            return
        args: list[str | int] = []
        for n in names:
            args += [n, store.encode_float(self.fleet.upstreams[n].weight), self.weight_versions[n]]
        k = self.keys
        await self.redis.eval(_WRITE_BACK, 3, k.weights, k.weights_ver, k.gen, *args)
        log.info("wrote admin weights back to redis: %s", ", ".join(names))

    def _rebuild(self, u: UpstreamStats, lo: int) -> None:
        """The other replicas' window of one upstream, from its cached slots (old slots dropped)."""
        cache = self._slots[u.name]
        for sl in [sl for sl in cache if sl < lo]:
            del cache[sl]
        others = Window()
        for w in cache.values():
            others.merge(w)
        u.rates.set_others(others)
        if not cache:
            del self._slots[u.name]

    def _refresh(self, now: float, fresh_samples: set[str]) -> None:
        """Recompute cached figures of the upstreams that have any; refit those with new samples (+ a few idle)."""
        ups, changed = self.fleet.upstreams, self.fleet.changed
        for n, u in ups.items():
            if not u.quiet():
                u.refresh(now)
                changed.add(n)
        if now - self._last_refit < REFIT_EVERY:
            self._pending_fits |= fresh_samples
            return
        self._last_refit = now
        fits, self._pending_fits = self._pending_fits | fresh_samples, set()
        names = list(ups)
        for _ in range(min(IDLE_REFIT_BATCH, len(names))):  # samples age: refit idle upstreams slowly too
            self._idle_refit = (self._idle_refit + 1) % len(names)
            if ups[names[self._idle_refit]].learned.samples:
                fits.add(names[self._idle_refit])
        for n in fits:
            ups[n].refit(now)
            changed.add(n)

