"""The batch lifecycle across replicas: validating -> in_progress -> finalizing -> completed | failed | expired,
in_progress -> cancelling -> cancelled.

Validation and finalization each run under a Redis lease (SET NX EX) so one replica does them; the status moves
with compare-and-set Lua scripts (store.py). A replica that dies holding a lease loses it when it expires and the
sweeper on any replica starts the phase again; both phases are idempotent (finalization rebuilds the output files
under fixed ids from the results hash; re-queued lines are stored once by custom_id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.batch.content import content_store
from gateway.batch.files import FileLimits, FileStore
from gateway.batch.keys import GROUP, BatchKeys
from gateway.batch.models import ENDPOINTS, WINDOWS, Execute, error_line
from gateway.batch.native import MODE, POOL, NativeForwarder, NativeHooks, NativeTarget, target_for
from gateway.batch.store import BatchStore, done_counts, public_batch
from gateway.batch.validate import Checked, LineError, LineFailure, WorkItem, check_line
from gateway.batch.worker import REDIS_ERRORS, Worker, WorkerConfig
from gateway.errors import GatewayError
from gateway.observability.telemetry import Telemetry
from gateway.periodic import Periodic, cancel_and_wait
from gateway.settings import Settings

log = logging.getLogger("gateway.batch")
MAX_REPORTED_ERRORS = 100
LEASE_SECONDS = 120


class BatchService:
    def __init__(self, s: Settings, known_model: Callable[[str], bool], execute: Execute, tel: Telemetry | None = None,
                 native: NativeHooks | None = None) -> None:
        self.s, self.known_model = s, known_model
        # Every worker slot may hold a connection (store a result, ack) while the sweeper and the API use others:
        # redis-py's default pool of 100 would refuse connections to a larger worker pool.
        self.redis = aioredis.from_url(
            s.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0, max_connections=s.batch_workers + 64
        ) if s.redis_url else None
        self.k = BatchKeys(s.redis_prefix)
        self.execute = execute
        self._stopped = False
        self._tasks: set[asyncio.Task] = set()
        self.hooks = native
        self.native: NativeForwarder | None = None
        if self.redis is None:
            return
        content = content_store(s.batch_files_dir, s.redis_prefix, self.redis, self.k, s.batch_retention)
        self.files = FileStore(self.redis, self.k, FileLimits(s.batch_max_file_bytes, s.batch_max_lines, s.batch_retention), content)
        self.store = BatchStore(self.redis, self.k, s.batch_retention)
        cfg = WorkerConfig(s.replica_id, s.batch_workers, s.batch_claim_idle, s.batch_max_attempts, s.batch_retry_base,
                           max_deliveries=s.batch_max_deliveries)
        self.worker = Worker(self.redis, self.k, self.store, self.execute, cfg, self.finalize, tel)
        self._sweeper = Periodic("batch-sweeper", s.batch_sweep_interval, self.sweep)
        self._files_sweeper = Periodic("batch-files-sweeper", s.batch_files_sweep_interval, self.sweep_files)
        self.native = NativeForwarder(self, native) if native is not None else None

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    def require(self) -> None:
        if self.redis is None:
            raise GatewayError(503, "The batch and files APIs need Redis: set GATEWAY_REDIS_URL.", code="batch_unavailable")

    async def start(self) -> None:
        if self.redis is None:
            return
        try:
            await self.worker.ensure_group()
        except REDIS_ERRORS as e:
            log.warning("batch: redis unavailable at start (%s); the worker retries", type(e).__name__)
        if self.s.batch_workers > 0:
            self.worker.start()
        self._sweeper.start()
        if self.s.batch_files_dir:
            self._files_sweeper.start()

    def stop_claiming(self) -> None:
        if self.redis is not None:
            self.worker.stop_claiming()

    async def stop(self, grace: float = 10.0) -> None:
        if self.redis is None or self._stopped:
            return
        self._stopped = True
        await self._sweeper.stop()
        await self._files_sweeper.stop()
        await self.worker.stop(grace)
        await cancel_and_wait(list(self._tasks))
        if self.native is not None:
            await self.native.close()
        await self.redis.aclose()

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- API ------------------------------------------------------------------------------------------------
    async def create(self, owner: str | None, body: dict[str, Any]) -> dict[str, Any]:
        fid, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
        if not isinstance(fid, str) or not fid:
            raise GatewayError(400, "Missing required parameter: 'input_file_id'.", code="missing_required_parameter", param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise GatewayError(400, f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", code="invalid_value", param="endpoint")
        if window not in WINDOWS:
            raise GatewayError(400, "'completion_window' must be '24h'.", code="invalid_value", param="completion_window")
        meta = body.get("metadata")
        if meta is not None and not _valid_metadata(meta):
            raise GatewayError(400, "'metadata' must be an object of at most 16 string values (keys <= 64, values <= 512 chars).",
                               code="invalid_value", param="metadata")
        f = await self.files.meta(fid, owner)
        if f.get("purpose") != "batch":
            raise GatewayError(400, f"File {fid} does not have purpose 'batch'.", code="invalid_value", param="input_file_id")
        return await self.start_batch(owner, fid, endpoint, window, meta)

    async def start_batch(self, owner: str | None, fid: str, endpoint: str, window: str = "24h", meta: dict | None = None,
                          anthropic: bool = False, total: int = -1) -> dict[str, Any]:
        """Record a batch over a stored input file and start validating it (`total` when already known)."""
        batch = await self.store.create(owner, fid, endpoint, WINDOWS[window], window, meta, anthropic, total)
        self._spawn(self.validate(batch["id"]))
        return batch

    async def cancel(self, bid: str, owner: str | None) -> dict[str, Any]:
        rec = await self.store.owned(bid, owner)
        now = int(time.time())
        if await self.store.move(bid, "cancelled", ("validating",), cancelling_at=now, cancelled_at=now,
                                 n_canceled=max(0, int(rec.get("total") or 0))):
            pass  # nothing was queued: every line (when already counted) is canceled
        elif await self.store.move(bid, "cancelling", ("in_progress",), cancelling_at=now):
            self._spawn(self.finalize(bid))  # nothing may be left to run
            if self.native is not None:
                self.native.wake(bid)  # a native batch: its driver (if here) sends the cancel to the provider now
        elif rec.get("status") != "cancelling":  # cancelling again is a no-op; a final batch cannot be cancelled
            raise GatewayError(409, f"Cannot cancel a batch with status '{rec.get('status')}'.", code="invalid_state")
        return await self.get(bid, owner)

    async def get(self, bid: str, owner: str | None) -> dict[str, Any]:
        return public_batch(await self.store.owned(bid, owner))

    # ---- validation -----------------------------------------------------------------------------------------
    async def validate(self, bid: str) -> None:
        if not await self.redis.set(self.k.val_lease(bid), self.s.replica_id, nx=True, ex=LEASE_SECONDS):  # type: ignore[union-attr]
            return
        try:
            rec = await self.store.record(bid)
            if rec.get("status") != "validating":
                return
            fid = rec["input_file_id"]
            lines, errors, n_errors, models = await self._check_file(bid, fid, rec["endpoint"])
            if n_errors or lines == 0 or lines > self.s.batch_max_lines:
                await self._fail(bid, lines, errors)
                return
            if (await self.store.record(bid)).get("status") != "validating":
                return  # cancelled while the file was checked: queue nothing
            target = target_for(self.hooks.resolve, rec["endpoint"], models) if self.native is not None and self.hooks else None
            await self.redis.hset(self.k.batch(bid), "total", lines)  # type: ignore[union-attr]
            await self._enqueue(bid, fid, rec, target)
            if await self.store.move(bid, "in_progress", ("validating",), in_progress_at=int(time.time())):
                if target is not None and self.native is not None:
                    self._spawn(self.native.run(bid))
                else:
                    await self.finalize(bid)  # returns at once unless every line already has its result
        except REDIS_ERRORS as e:
            log.warning("batch %s: validation interrupted (%s); the sweeper retries", bid, type(e).__name__)
        finally:
            try:
                await self.redis.delete(self.k.val_lease(bid))  # type: ignore[union-attr]
            except REDIS_ERRORS:
                pass

    async def _keep_lease(self, lease: str, n: int) -> None:
        """Extend a phase's lease every 2,000 lines, so a long phase is not taken for a dead one."""
        if n % 2000 == 0:
            await self.redis.expire(lease, LEASE_SECONDS)  # type: ignore[union-attr]

    async def checked_lines(self, fid: str, endpoint: str) -> AsyncIterator[Checked]:
        """Every line of an input file through check_line (the one place lines are judged: validation, queueing
        and native forwarding all read the file through here)."""
        seen: set[str] = set()
        n = 0
        async for raw in self.files.lines(fid):
            n += 1
            yield check_line(raw, n, endpoint, seen, self.known_model, self.s.max_body_bytes)

    async def _check_file(self, bid: str, fid: str, endpoint: str) -> tuple[int, list[dict], int, set[str]]:
        """(lines, reported errors, errors, models of the runnable lines)."""
        errors: list[dict] = []
        models: set[str] = set()
        n = n_err = 0
        async for r in self.checked_lines(fid, endpoint):
            n += 1
            await self._keep_lease(self.k.val_lease(bid), n)
            if isinstance(r, LineError):
                n_err += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(r.public())
            elif isinstance(r, WorkItem):
                models.add(str(r.body["model"]))
        return n, errors, n_err, models

    async def _fail(self, bid: str, lines: int, errors: list[dict]) -> None:
        if lines == 0:
            errors = [{"code": "empty_file", "line": None, "message": "The input file is empty.", "param": None}]
        elif lines > self.s.batch_max_lines:
            errors = [{"code": "too_many_requests", "line": None, "param": None,
                       "message": f"The batch has {lines} requests; the limit is {self.s.batch_max_lines}."}]
        await self.store.move(bid, "failed", ("validating",), failed_at=int(time.time()), total=lines,
                              errors={"object": "list", "data": errors})

    async def _enqueue(self, bid: str, fid: str, rec: dict[str, str], target: NativeTarget | None = None) -> None:
        """Second pass: XADD every runnable line (pipelined); per-line failures go straight to the results.

        A native batch (`target`) queues nothing: its runnable lines go to the provider (native.py)."""
        n = failed = 0
        p = self.redis.pipeline(transaction=False)  # type: ignore[union-attr]
        async for r in self.checked_lines(fid, rec["endpoint"]):
            n += 1
            await self._keep_lease(self.k.val_lease(bid), n)
            if isinstance(r, WorkItem) and target is None:
                p.xadd(self.k.queue, {"b": bid, "c": r.custom_id, "u": rec["endpoint"], "o": _owner(rec),
                                      "body": json.dumps(r.body, separators=(",", ":"))})
            elif isinstance(r, LineFailure):
                failed += 1
                await self.store.store_result(bid, r.custom_id, False, error_line(r.custom_id, r.code, r.message))
            if len(p) >= 500:
                await p.execute()
        await p.execute()
        if target is not None:
            await self.redis.hset(self.k.batch(bid), mapping={  # type: ignore[union-attr]
                MODE: "native", POOL: target.pool, "native_upstream": target.upstream, "native_local_failed": failed})

    # ---- finalization ---------------------------------------------------------------------------------------
    async def finalize(self, bid: str) -> None:
        """Build the output/error files and move to the final status, once, when every line has its result."""
        assert self.redis is not None
        rec = await self.store.record(bid)
        total = int(rec.get("total") or -1)
        done = int(rec.get("completed") or 0) + int(rec.get("failed") or 0)
        if rec.get("status") not in ("in_progress", "cancelling", "finalizing") or total < 0 or done < total:
            return
        if not await self.redis.set(self.k.fin_lease(bid), self.s.replica_id, nx=True, ex=LEASE_SECONDS):
            return
        try:
            await self._finalize(bid, rec)
        finally:
            await self.redis.delete(self.k.fin_lease(bid))

    async def _finalize(self, bid: str, rec: dict[str, str]) -> None:
        now = int(time.time())
        status = rec["status"]
        if status == "in_progress":
            await self.store.move(bid, "finalizing", ("in_progress",), finalizing_at=now)
        ending = "cancelled" if status == "cancelling" else "expired" if rec.get("expired") else "completed"
        owner = _owner(rec) or None
        stem = bid.removeprefix("batch_")
        # Fixed ids: an attempt that died half way published nothing (writers commit atomically); this one replaces
        # whatever a previous attempt did publish.
        out = self.files.writer(limited=False, fid=f"file-{stem}-output")
        err = self.files.writer(limited=False, fid=f"file-{stem}-errors")
        try:
            async for kind, line in self.store.results(bid):
                await (out if kind == "o" else err).add_lines([line])
                await self._keep_lease(self.k.fin_lease(bid), out.lines + err.lines)
        except BaseException:
            await asyncio.shield(asyncio.gather(out.abort(), err.abort(), return_exceptions=True))
            raise
        ids: dict[str, Any] = {"completed": out.lines, "failed": err.lines}
        ttl = self.s.batch_retention
        if out.lines:
            ids["output_file_id"] = (await out.close(f"{bid}_output.jsonl", "batch_output", owner, ttl))["id"]
        if err.lines:
            ids["error_file_id"] = (await err.close(f"{bid}_error.jsonl", "batch_output", owner, ttl))["id"]
        if await self.store.move(bid, ending, ("finalizing", "cancelling"), **ids, **{f"{ending}_at": int(time.time())}):
            await self.redis.expire(self.k.results(bid), 60)  # type: ignore[union-attr]
            log.info("batch %s %s: %d completed, %d failed", bid, ending, out.lines, err.lines)

    # ---- background -----------------------------------------------------------------------------------------
    async def sweep(self) -> None:
        """Restart a phase whose replica died (its lease expired), and finalize batches whose last line's replica
        died between storing the result and finalizing."""
        assert self.redis is not None
        for raw in await self.redis.smembers(self.k.active):
            bid = raw.decode() if isinstance(raw, bytes) else raw
            rec = await self.store.record(bid)
            if not rec:
                await self.redis.srem(self.k.active, bid)
            elif rec.get("status") == "validating":
                if not await self.redis.exists(self.k.val_lease(bid)):
                    self._spawn(self.validate(bid))
            elif rec.get(MODE) == "native" and rec.get("status") in ("in_progress", "cancelling"):
                if self.native is not None and not await self.redis.exists(self.k.nat_lease(bid)):
                    self._spawn(self.native.run(bid))  # its driver died (or never started): take it over
            else:
                await self.finalize(bid)
        try:
            await self.worker.prune_consumers()
        except ResponseError:  # no stream or group yet
            pass

    async def sweep_files(self) -> None:
        """Retention of a directory store (its files carry no TTL); every replica may run it (deletes are idempotent)."""
        await self.files.sweep()

    async def summary(self) -> dict[str, Any]:
        """Progress of the batches not yet final: lines pending/running/done/failed, batch tok/s, ETA."""
        self.require()
        assert self.redis is not None
        now = time.time()
        out = []
        for raw in await self.redis.smembers(self.k.active):
            rec = await self.store.record(raw.decode() if isinstance(raw, bytes) else raw)
            if rec:
                out.append(_progress(rec, now))
        try:
            running = int((await self.redis.xpending(self.k.queue, GROUP))["pending"])
        except REDIS_ERRORS:
            running = 0
        return {"object": "batch_summary", "batches": sorted(out, key=lambda b: b["created_at"]), "lines_running": running,
                "replica_lines_running": self.worker.running_lines}


def _progress(rec: dict[str, str], now: float) -> dict[str, Any]:
    total = max(0, int(rec.get("total") or 0))
    counts = done_counts(rec)
    completed, failed = counts["completed"], counts["failed"]
    started = float(rec.get("in_progress_at") or 0)
    elapsed = max(1e-3, now - started) if started else 0.0
    rate = (completed + failed) / elapsed if elapsed else 0.0
    pending = max(0, total - completed - failed)
    return {
        "id": rec["id"], "status": rec["status"], "created_at": int(rec["created_at"]), "total": total,
        "completed": completed, "failed": failed, "pending": pending,
        "output_tokens": int(rec.get("tokens") or 0),
        "tokens_per_second": round(int(rec.get("tokens") or 0) / elapsed, 1) if elapsed else 0.0,
        "eta_seconds": round(pending / rate, 1) if rate > 0 else None,
    }


def _owner(rec: dict[str, str]) -> str:
    o = rec.get("owner", "-")
    return "" if o == "-" else o


def _valid_metadata(m: Any) -> bool:
    return (isinstance(m, dict) and len(m) <= 16
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in m.items()))
