"""Claims batch lines from the Redis Stream and runs them through the injected executor.

At-least-once execution, exactly-once results: a line is XACKed only after its result is stored (HSETNX by
custom_id, store.py), so a replica that dies mid-line leaves it pending; another replica's XAUTOCLAIM takes it
over once it has been idle `claim_idle` seconds. A live worker refreshes the idle time of the lines it runs
(XCLAIM JUSTID, which does not count as a delivery) so a slow line is not stolen from it. Redis outages are
waited out: nothing is lost while Redis is away except time.

Crash loops: a line that kills (or hangs) every replica that runs it would be reclaimed forever. The stream counts
deliveries (XREADGROUP and XAUTOCLAIM each add one); a reclaimed line delivered more than `max_deliveries` times is
not run again but answered in the error file (`delivery_limit_reached`) and acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from redis.exceptions import RedisError, ResponseError

from gateway.batch.keys import GROUP, BatchKeys
from gateway.batch.models import FINAL, ExecRequest, ExecResult, Execute, error_line, output_tokens, response_line
from gateway.batch.store import BatchStore
from gateway.observability.telemetry import Telemetry
from gateway.periodic import cancel_and_wait

log = logging.getLogger("gateway.batch")
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    consumer: str
    concurrency: int = 8
    claim_idle: float = 60.0
    max_attempts: int = 5
    retry_base: float = 0.5
    retry_max: float = 30.0
    max_deliveries: int = 5


class LeavePending(Exception):
    """The replica is stopping and the line did not get a final answer: leave it for another replica."""


def _retryable(res: ExecResult) -> bool:
    return res.status_code == 429 or res.status_code >= 500


class Worker:
    def __init__(self, redis, keys: BatchKeys, store: BatchStore, execute: Execute, cfg: WorkerConfig,
                 on_done: Callable[[str], Awaitable[None]], tel: Telemetry | None = None) -> None:
        self.redis, self.k, self.store, self.execute, self.cfg = redis, keys, store, execute, cfg
        self.on_done = on_done
        self.tracer: trace.Tracer = tel.tracer if tel is not None else trace.NoOpTracer()
        self.tel = tel
        self.inflight: dict[str, asyncio.Task] = {}
        self.stopping = False
        self.running_lines = 0
        self._task: asyncio.Task | None = None
        self._states: dict[str, tuple[float, dict[str, str]]] = {}

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.k.queue, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batch-worker")

    def stop_claiming(self) -> None:
        """Draining: claim nothing new; lines already running finish (or are left pending if they cannot)."""
        self.stopping = True

    async def stop(self, grace: float) -> None:
        """Stop claiming; let running lines finish for `grace` seconds; the rest stay pending for other replicas."""
        self.stopping = True
        if self._task is not None:
            await cancel_and_wait([self._task])
        tasks = list(self.inflight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            await cancel_and_wait(late)

    async def _run(self) -> None:
        backoff = 0.5
        last_claim = last_beat = 0.0
        while not self.stopping:
            try:
                now = time.monotonic()
                if now - last_beat >= self.cfg.claim_idle / 3:
                    await self._heartbeat()
                    last_beat = now
                free = self.cfg.concurrency - len(self.inflight)
                if free <= 0:
                    await asyncio.wait(list(self.inflight.values()), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    continue
                entries = []
                if now - last_claim >= self.cfg.claim_idle / 2:
                    entries = await self._autoclaim(free)
                    last_claim = now
                if not entries:
                    entries = await self._read(free)
                for eid, fields, deliveries in entries:
                    self._spawn(eid, fields, deliveries)
                backoff = 0.5
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    await self.ensure_group()
                    continue
                log.warning("batch worker: redis error %s; retrying in %.1fs", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except REDIS_ERRORS as e:
                log.warning("batch worker: redis unavailable (%s); retrying in %.1fs", type(e).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _read(self, count: int) -> list[tuple[str, dict, int]]:
        """New lines: (entry id, fields, deliveries = 1)."""
        resp = await self.redis.xreadgroup(GROUP, self.cfg.consumer, {self.k.queue: ">"}, count=count, block=1000)
        return [(_s(eid), f, 1) for _, items in resp or [] for eid, f in items]

    async def _autoclaim(self, count: int) -> list[tuple[str, dict, int]]:
        """Lines idle for claim_idle under any consumer (a dead replica's), with their delivery counts."""
        idle_ms = int(self.cfg.claim_idle * 1000)
        resp = await self.redis.xautoclaim(self.k.queue, GROUP, self.cfg.consumer, idle_ms, "0-0", count=count)
        items = resp[1] if resp else []
        got = [(_s(eid), f) for eid, f in items if f]
        if not got:
            return []
        log.warning("batch worker %s: reclaimed %d lines idle for %.0fs (their replica died?)", self.cfg.consumer, len(got), self.cfg.claim_idle)
        counts = await self._deliveries([e for e, _ in got])
        return [(e, f, counts.get(e, 1)) for e, f in got if e not in self.inflight]

    async def _deliveries(self, eids: list[str]) -> dict[str, int]:
        """Times each entry was delivered, this claim included (XPENDING; XAUTOCLAIM does not report it)."""
        p = self.redis.pipeline(transaction=False)
        for e in eids:
            p.xpending_range(self.k.queue, GROUP, min=e, max=e, count=1)
        rows = await p.execute()
        return {e: int(r[0]["times_delivered"]) for e, r in zip(eids, rows, strict=True) if r}

    async def _heartbeat(self) -> None:
        if self.inflight:
            await self.redis.xclaim(self.k.queue, GROUP, self.cfg.consumer, 0, list(self.inflight), justid=True)

    async def prune_consumers(self, idle_s: float = 3600.0) -> int:
        """Drop consumers of replicas long gone (nothing pending, idle for an hour) so the group does not grow."""
        gone = 0
        for c in await self.redis.xinfo_consumers(self.k.queue, GROUP):
            name = _s(c.get("name", b""))
            if name != self.cfg.consumer and int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) > idle_s * 1000:
                await self.redis.xgroup_delconsumer(self.k.queue, GROUP, name)
                gone += 1
        return gone

    def _spawn(self, eid: str, fields: dict, deliveries: int = 1) -> None:
        if eid in self.inflight:
            return
        t = asyncio.create_task(self._handle(eid, {_s(a): b for a, b in fields.items()}, deliveries))
        self.inflight[eid] = t
        t.add_done_callback(lambda _t: self.inflight.pop(eid, None))

    async def _state(self, bid: str) -> dict[str, str]:
        """The batch record, cached for a second (cancel takes effect within that)."""
        now = time.monotonic()
        hit = self._states.get(bid)
        if hit and now - hit[0] < 1.0:
            return hit[1]
        rec = await self.store.record(bid)
        self._states[bid] = (now, rec)
        if len(self._states) > 1000:
            self._states.clear()
        return rec

    async def _handle(self, eid: str, f: dict[str, Any], deliveries: int) -> None:
        try:
            await self._handle_line(eid, f, deliveries)
        except LeavePending:
            log.info("batch worker: line %s left pending for another replica (stopping)", eid)
        except REDIS_ERRORS as e:  # left pending: reclaimed (here or elsewhere) after the idle timeout
            log.warning("batch worker: line %s left pending (%s)", eid, type(e).__name__)
        except Exception:
            log.exception("batch worker: line %s failed; left pending", eid)

    async def _handle_line(self, eid: str, f: dict[str, Any], deliveries: int) -> None:
        bid, cid = _s(f["b"]), _s(f["c"])
        rec = await _retry_redis(lambda: self._state(bid), self)
        if rec is None:
            return
        if not rec:  # the batch is gone (deleted or past retention): drop the line
            await self._ack(eid)
            return
        ok, line, tokens = await self._outcome(rec, bid, cid, f, deliveries)
        if line is not None:
            code = str((line.get("error") or {}).get("code") or "")
            extra = {"batch_cancelled": "n_canceled", "batch_expired": "n_expired"}.get(code, "")
            stored = await _retry_redis(lambda: self.store.store_result(bid, cid, ok, line, tokens, extra), self)
            if stored is None:
                return  # stopping: the line stays pending and is reclaimed elsewhere
            if stored[0] and self.tel is not None:
                self.tel.record_batch_line(ok)
            if stored[0] and stored[2] >= 0 and stored[1] >= stored[2]:
                await self.on_done(bid)
        await _retry_redis(lambda: self._ack(eid), self)

    async def _outcome(self, rec: dict[str, str], bid: str, cid: str, f: dict[str, Any],
                       deliveries: int) -> tuple[bool, dict | None, int]:
        if rec.get("status") in FINAL:
            return False, None, 0  # the batch ended (e.g. cancelled while validating): nothing to record
        if rec.get("status") == "cancelling":
            return False, error_line(cid, "batch_cancelled", "This request was not executed because the batch was cancelled."), 0
        if time.time() >= float(rec.get("expires_at") or 0):
            await self.redis.hset(self.k.batch(bid), "expired", "1")
            return False, error_line(cid, "batch_expired", "This request could not be executed before the completion window expired."), 0
        if await self.store.has_result(bid, cid):
            return False, None, 0  # ran before a crash: the stored result stands
        if deliveries > self.cfg.max_deliveries:
            log.error("batch %s: line %s delivered %d times without an answer; not run again", bid, cid, deliveries)
            return False, error_line(cid, "delivery_limit_reached", too_many_deliveries(deliveries, self.cfg.max_deliveries)), 0
        req = ExecRequest(_s(f["u"]), json.loads(f["body"]), _s(f.get("o", b"")) or None, bid, cid)
        self.running_lines += 1
        attrs = {"gateway.batch.id": bid, "gateway.batch.custom_id": cid, "gateway.batch.endpoint": req.endpoint}
        # One span per line, tagged with its batch; the request path's span (via traceparent) is its child.
        with self.tracer.start_as_current_span(f"batch_line {bid}", attributes=attrs) as span:
            try:
                res = await self._run_with_retries(req)
            finally:
                self.running_lines -= 1
            span.set_attribute("http.response.status_code", res.status_code if isinstance(res, ExecResult) else 0)
        if self.stopping and (not isinstance(res, ExecResult) or _retryable(res)):
            raise LeavePending  # e.g. our own gateway answered 503 while draining: not the line's fault
        if isinstance(res, ExecResult):
            return 200 <= res.status_code < 300, response_line(cid, res), output_tokens(res.body)
        return False, error_line(cid, "request_failed", res), 0

    async def _run_with_retries(self, req: ExecRequest) -> ExecResult | str:
        """The final answer, or a message when no attempt got one. 429/5xx and transport errors retry with backoff."""
        last: ExecResult | str = "no attempt was made"
        for attempt in range(self.cfg.max_attempts):
            if attempt and self.stopping:
                break
            if attempt:
                delay = min(self.cfg.retry_max, self.cfg.retry_base * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            try:
                last = await self.execute(req)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the executor's transport failed: retry like a 5xx
                last = f"the request could not be sent ({type(e).__name__})"
                continue
            if not _retryable(last):
                return last
        return last

    async def _ack(self, eid: str) -> None:
        p = self.redis.pipeline(transaction=True)
        p.xack(self.k.queue, GROUP, eid)
        p.xdel(self.k.queue, eid)
        await p.execute()


async def _retry_redis(op: Callable[[], Awaitable[Any]], w: Worker) -> Any:
    """Run a Redis operation until it succeeds (Redis restarts are waited out); None when the worker stops."""
    delay = 0.2
    while True:
        try:
            return await op()
        except REDIS_ERRORS as e:
            if w.stopping:
                return None
            log.warning("batch worker: redis unavailable (%s); retrying", type(e).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def too_many_deliveries(deliveries: int, limit: int) -> str:
    return (f"This request was not executed again: it was handed to a batch worker {deliveries} times and each stopped "
            f"without an answer (the replica running it crashed or was stopped); the limit is "
            f"GATEWAY_BATCH_MAX_DELIVERIES={limit}.")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
