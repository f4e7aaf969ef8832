"""Spend per gateway key, model and upstream: accounted exactly across replicas, enforced without Redis.

Accounting. Each finished client request is charged once, from the HTTP layer, for the attempt that produced its
response (gateway/cost.py prices it in integer micro-dollars); a request that never reached an upstream costs 0,
so its admission reservation is simply released (the refund). Charges accumulate in this replica's memory and a
background task flushes them every `interval` seconds with one Lua script that HINCRBYs per-day hashes
`{prefix}:spend:d:{YYYYMMDD}` (fields `key|<id>|usd_micros`, `model|<name>|...`, `upstream|<name>|...` for
usd_micros, requests, input and output tokens) and per-month budget hashes `{prefix}:spend:m:{YYYYMM}`. Every batch
carries a unique id the script claims with SET NX first, so a flush retried after a lost reply is applied once:
no double count. Days and months are UTC.

Enforcement (hot path: no Redis). Per budgeted key the replica keeps the fleet-wide spend of the current day and
month from the last sync, plus its own spend and in-flight reservations since then. A request is admitted while
its estimated cost (the dearest upstream of the pool at its max_tokens) fits this replica's share of the headroom
seen at the last sync, split between the live replicas like an upstream's limits (state/rate.py); when the headroom is smaller than one
request per replica, only rank 0 may spend it. The shares add up to the headroom, so the fleet stops within about
one request's cost of the budget. Over budget: 429 `insufficient_quota`, saying when the budget resets; when
budget is left but this replica's share is held by its own running requests, a retryable 429 (Retry-After 1 s).
The estimate is an upper bound only when the client sets max_tokens (else the default output estimate is used).
A replica counts the live replicas from the fleet sync: until its first sync it sees only itself.

Redis outage. Traffic is never blocked on Redis (no call on the request path). Budgets do not fail open: with no
sync the shares do not grow, so each replica can spend at most its share of the headroom it last saw (a new
period starts from the full budget split between the replicas, which also cannot overshoot). Charges wait in
memory and are flushed exactly once when Redis is back. Bound: budgeted keys see stale totals for the outage plus
one flush interval; nothing waits on Redis.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError

from gateway.context import RequestContext
from gateway.cost import Tokens, usd
from gateway.errors import GatewayError
from gateway.periodic import Periodic
from gateway.routing.classes import BATCH
from gateway.state.fleet import Fleet
from gateway.state.rate import static_share

log = logging.getLogger("gateway.spend")

GROUPS = ("key", "model", "upstream")
METRICS = ("usd_micros", "requests", "input_tokens", "output_tokens")
TTL_S = 400 * 86400
_LY = {"day": "daily", "month": "monthly"}

_APPLY = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then
  for i = 1, #ARGV, 3 do
    local k = KEYS[tonumber(ARGV[i])]
    redis.call('HINCRBY', k, ARGV[i + 1], ARGV[i + 2])
    redis.call('EXPIRE', k, %d)
  end
  return 1
end
return 0
""" % TTL_S


def day_id(now: float) -> str:
    return _period_ids(int(now // _DAY_S))[0]


def month_id(now: float) -> str:
    return _period_ids(int(now // _DAY_S))[1]


_DAY_S = 86400  # a UTC day in POSIX time (no leap seconds)


@functools.lru_cache(maxsize=8)
def _period_ids(day: int) -> tuple[str, str]:
    """(YYYYMMDD, YYYYMM) of a UTC day number. Cached because every charge needs both and strftime costs ~30 us
    here (about a twentieth of a whole proxied request's CPU); the day number changes once a day."""
    d = datetime.fromtimestamp(day * _DAY_S, UTC)
    return d.strftime("%Y%m%d"), d.strftime("%Y%m")


@functools.lru_cache(maxsize=4096)
def _fields(group: str, name: str) -> tuple[str, ...]:
    """The hash fields of one key, model or upstream (one per METRICS entry): made once, not on every charge."""
    return tuple(f"{group}|{name}|{metric}" for metric in METRICS)


def next_reset(now: float, period: str) -> datetime:
    """Start (UTC) of the next day / month: when a budget of that period is fresh again."""
    d = datetime.fromtimestamp(now, UTC)
    if period == "day":
        return (d + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    first = d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


def share(headroom: int, replicas: int, rank: int, need: int) -> int:
    """This replica's part of a budget's headroom (see the module docstring); pure."""
    if headroom <= 0:
        return 0
    n = max(1, replicas)
    if headroom < n * max(1, need):  # too little to split usefully: one replica may spend it all
        return headroom if rank == 0 else 0
    return static_share(headroom, n, rank)


@dataclass(slots=True)
class Tally:
    """One key's spend for one period: fleet total at the last sync + this replica's since then."""

    period: str = ""
    synced: int = 0
    unsynced: int = 0  # charged here, not yet confirmed in Redis
    reserved: int = 0  # admitted requests still running

    def roll(self, period: str) -> None:
        if period != self.period:
            self.period, self.synced, self.unsynced = period, 0, 0

    @property
    def total(self) -> int:
        return self.synced + self.unsynced


class SpendLedger:
    """This replica's spend book (see the module docstring)."""

    def __init__(
        self, redis, prefix: str, replica: str, interval: float = 0.25,
        fleet_rank: Callable[[], tuple[int, int]] = lambda: (1, 0), clock: Callable[[], float] = time.time,
        key_ids: Callable[[], list[str]] = list,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.replica = replica
        self.fleet_rank = fleet_rank
        self.clock = clock
        self.day: dict[str, Tally] = defaultdict(Tally)
        self.month: dict[str, Tally] = defaultdict(Tally)
        self.key_ids = key_ids  # every known key id: their fleet totals are read back at each sync
        self._rows: dict[tuple[str, str], int] = defaultdict(int)  # (hash key, field) -> delta not yet sent
        self._batch: tuple[str, dict[tuple[str, str], int]] | None = None  # sent, not yet confirmed
        self._seq = itertools.count(1)
        self._script = redis.register_script(_APPLY) if redis is not None else None
        self._loop = Periodic("spend-sync", interval, self.sync_logged)
        self.failing = False

    # ---- hot path ------------------------------------------------------------------------------------------
    def admit(self, key_id: str, key_name: str, budgets: tuple[int | None, int | None], estimate: int) -> int:
        """Reserve `estimate` micro-dollars for one request or raise 429 insufficient_quota; returns the reservation.

        `budgets`: (day, month) in micro-dollars, None = no budget for that period."""
        if budgets == (None, None):
            return 0
        now = self.clock()
        n, rank = self.fleet_rank()
        for period, budget, book, pid in (("day", budgets[0], self.day, day_id(now)), ("month", budgets[1], self.month, month_id(now))):
            if budget is None:
                continue
            t = book[key_id]
            t.roll(pid)
            since = t.unsynced + t.reserved
            if since + estimate > share(budget - t.synced, n, rank, estimate):
                raise self._refusal(key_name, period, budget, t, estimate, now)
        for book, budget in ((self.day, budgets[0]), (self.month, budgets[1])):
            if budget is not None:
                book[key_id].reserved += estimate
        return estimate

    def _refusal(self, key_name: str, period: str, budget: int, t: Tally, estimate: int, now: float) -> GatewayError:
        """insufficient_quota when the budget is spent as far as this replica may spend it; a retryable 429 when
        budget is left and only this replica's requests still running hold its share (they end soon, and the
        next sync re-splits what is left)."""
        if t.reserved > 0 and budget - t.total - t.reserved >= estimate:
            return GatewayError(
                429, f"API key '{key_name}' is close to its {_LY[period]} budget: this replica's share of what is left "
                "is in use by running requests; retry in a second.", code="rate_limit_exceeded", retry_after=1.0,
            )
        when = next_reset(now, period).strftime("%Y-%m-%d %H:%M UTC")
        return GatewayError(
            429, f"API key '{key_name}' has used its {_LY[period]} budget of ${usd(budget):.2f} "
            f"(spent ${usd(t.total + t.reserved):.4f}); the budget resets at {when}.",
            code="insufficient_quota",
        )

    def charge(self, key_id: str | None, reserved: int, micros: int, model: str, upstream: str | None, tokens: tuple[int, int]) -> None:
        """Book one finished request (releasing its reservation); `micros` 0 and no tokens = a refund."""
        now = self.clock()
        d, m = day_id(now), month_id(now)
        if key_id is not None:
            for book, pid in ((self.day, d), (self.month, m)):
                t = book[key_id]
                t.roll(pid)
                t.reserved = max(0, t.reserved - reserved)
                t.unsynced += micros
        if not micros and not any(tokens):
            return
        dk, mk = f"{self.prefix}:spend:d:{d}", f"{self.prefix}:spend:m:{m}"
        names = (("key", key_id), ("model", model), ("upstream", upstream))
        values = (micros, 1, tokens[0], tokens[1])
        for group, name in names:
            if name is None:
                continue
            for field, v in zip(_fields(group, name), values, strict=True):
                self._rows[(dk, field)] += v
        if key_id is not None:
            self._rows[(mk, f"key|{key_id}|usd_micros")] += micros

    def spent(self, key_id: str) -> tuple[float, float]:
        """(today, this month) in USD as this replica knows it."""
        now = self.clock()
        out = []
        for book, pid in ((self.day, day_id(now)), (self.month, month_id(now))):
            t = book.get(key_id)
            out.append(usd(t.total) if t is not None and t.period == pid else 0.0)
        return out[0], out[1]

    # ---- background ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        try:
            await self.sync()  # last charges out before the process ends
        except (RedisError, OSError, asyncio.TimeoutError):
            log.warning("spend: could not flush the last charges (redis unavailable)")

    async def sync_logged(self) -> None:
        try:
            await self.sync()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            if not self.failing:
                log.warning("spend: redis unavailable (%s); enforcing budgets on local shares", type(e).__name__)
            self.failing = True
            return
        self.failing = False

    async def sync(self) -> None:
        """Flush charges exactly once, then read the fleet totals of budgeted keys."""
        if self._batch is None and self._rows:
            self._batch = (f"{self.prefix}:spend:batch:{self.replica}:{next(self._seq)}:{time.time_ns()}", dict(self._rows))
            self._rows.clear()
        if self.redis is None:
            self._apply_local()
            return
        now = self.clock()
        d, m = day_id(now), month_id(now)
        ids = self.key_ids()
        if self._batch is None and not ids:
            return
        p = self.redis.pipeline(transaction=False)
        if self._batch is not None:
            await self._script_call(p, *self._batch)
        if ids:
            p.hmget(f"{self.prefix}:spend:d:{d}", [f"key|{i}|usd_micros" for i in ids])
            p.hmget(f"{self.prefix}:spend:m:{m}", [f"key|{i}|usd_micros" for i in ids])
        res = await p.execute()
        sent = self._batch[1] if self._batch is not None else {}
        self._batch = None
        if ids:
            self._settle(sent, ids, res[-2], res[-1], d, m)

    async def _script_call(self, p, batch_id: str, rows: dict[tuple[str, str], int]) -> None:
        hashes = sorted({h for h, _ in rows})
        idx = {h: i + 2 for i, h in enumerate(hashes)}
        argv: list = []
        for (h, f), v in rows.items():
            argv += [idx[h], f, v]
        assert self._script is not None
        await self._script(keys=[batch_id, *hashes], args=argv, client=p)  # queued on the pipeline

    def _settle(self, sent: dict, ids: list[str], day_vals: list, month_vals: list, d: str, m: str) -> None:
        """Totals from Redis now include what was just sent: move it from unsynced to synced."""
        for book, pid, vals, hkey in ((self.day, d, day_vals, f"{self.prefix}:spend:d:{d}"), (self.month, m, month_vals, f"{self.prefix}:spend:m:{m}")):
            for key_id, raw in zip(ids, vals, strict=True):
                t = book[key_id]
                t.roll(pid)
                t.unsynced = max(0, t.unsynced - sent.get((hkey, f"key|{key_id}|usd_micros"), 0))
                t.synced = int(raw or 0)

    def _apply_local(self) -> None:
        """No Redis: this process is the fleet; its own totals are the synced ones."""
        if self._batch is None:
            return
        self._batch = None
        for book in (self.day, self.month):
            for t in book.values():
                t.synced += t.unsynced
                t.unsynced = 0

    # ---- report --------------------------------------------------------------------------------------------
    async def report(self, group_by: str, start: float, end: float) -> dict:
        """Per-day buckets between `start` and `end` (UTC days, inclusive) grouped by key, model or upstream."""
        days: list[str] = []
        t = datetime.fromtimestamp(start, UTC).date()
        last = datetime.fromtimestamp(end, UTC).date()
        while t <= last and len(days) < 400:
            days.append(t.strftime("%Y%m%d"))
            t += timedelta(days=1)
        if self.redis is None:
            raise GatewayError(503, "the spend report needs Redis (GATEWAY_REDIS_URL)", code="store_unavailable")
        p = self.redis.pipeline(transaction=False)
        for day in days:
            p.hgetall(f"{self.prefix}:spend:d:{day}")
        rows = await p.execute()
        return _report(group_by, days, rows)


def _report(group_by: str, days: list[str], rows: list[dict]) -> dict:
    buckets = []
    totals: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
    for day, h in zip(days, rows, strict=True):
        per: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
        for f, v in h.items():
            f = f.decode() if isinstance(f, bytes) else f
            group, _, rest = f.partition("|")
            name, _, metric = rest.rpartition("|")
            if group != group_by or metric not in METRICS:
                continue
            per[name][metric] += int(v)
            totals[name][metric] += int(v)
        if per:
            buckets.append({"date": f"{day[:4]}-{day[4:6]}-{day[6:]}", "groups": {k: _row(v) for k, v in sorted(per.items())}})
    return {"group_by": group_by, "days": buckets, "totals": {k: _row(v) for k, v in sorted(totals.items())}}


def _row(v: dict[str, int]) -> dict:
    return {"usd": usd(v["usd_micros"]), "usd_micros": v["usd_micros"], "requests": v["requests"],
            "input_tokens": v["input_tokens"], "output_tokens": v["output_tokens"]}


def charge_request(
    fleet: Fleet, ledger: SpendLedger, key_id: str | None, reserved: int, model: str, upstream: str | None,
    tokens: Tokens, *, service_class: str = "",
) -> int:
    """Price one finished client request on the upstream that answered it and book it (micro-dollars).

    A request that never reached an upstream (or whose attempts all failed) has no tokens: it costs nothing and
    its budget reservation is released: the refund. Independent of the request object, so any caller that knows
    the serving upstream and its usage can charge (e.g. a `request_end` hook). The batch class pays batch rates;
    a charged request is also booked to its pool's class (state/class_cost.py)."""
    micros = 0
    u = fleet.upstreams.get(upstream) if upstream else None
    charged = False
    if u is not None and (tokens.input_tokens or tokens.output_tokens):
        micros, charged = u.charge(tokens, service_class == BATCH), True
    pool = fleet.pool(model)
    if charged and pool is not None and service_class in pool.cfg.classes:
        fleet.class_cost.add(pool.model, service_class, micros, tokens.output_tokens)
    ledger.charge(key_id, reserved, micros, pool.model if pool else model, upstream if u else None,
                  (tokens.input_tokens, tokens.output_tokens))
    return micros



class CostQuote:
    """Hook subscriber: what the request costs on the upstream that answered it, for its span (booking happens once,
    in the HTTP layer, against the key's reservation; this only prices)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def request_end(self, ctx: RequestContext, error: BaseException | None) -> None:
        u = self.fleet.upstreams.get(ctx.upstream) if ctx.upstream else None
        us = ctx.usage
        if u is None or u.cfg.price is None or not (us.output_tokens or us.input_tokens):
            return
        tokens = Tokens(us.input_tokens if us.input_tokens is not None else ctx.est.prompt_tokens, us.cached_tokens, us.output_tokens)
        ctx.extras["cost_usd"] = usd(u.quote(tokens, ctx.service_class == BATCH))
