"""Native execution: a batch whose pool has `native_batch` configured is forwarded to a hosted provider's own
Files + Batches API instead of running line by line on the fleet (the provider bills batch work at about half
its per-request price; it may take up to its 24 h window).

Which mode: decided once, at validation (service.py), from the models of the batch's lines: native when every
runnable line's model belongs to one pool whose `native_batch` names an upstream, and the endpoint is one the
provider's batch API takes. Lines that fail the gateway's own checks (unknown model, oversize) are answered
locally as today; only runnable lines are forwarded.

One replica drives a native batch at a time, under a Redis lease ({p}:bb:{id}:nat, SET NX EX, renewed while it
runs); a replica that dies stops renewing and the sweeper on any replica restarts the driver once the lease
expired. Every step is resumable from the batch record: `up_file` (the uploaded input) and `up_batch` (the
provider's batch id) are recorded as soon as they exist, so a successor polls the same provider batch instead of
submitting again; a successor of a replica that died between creating the provider batch and recording its id
finds it by its metadata (`gateway_batch_id`) among the provider's latest batches. Results are stored through the same exactly-once results hash as local lines (HSETNX
by custom_id), then the ordinary finalization builds the gateway's output and error files, so each custom_id
appears once whoever downloaded it. Each stored line is charged once to the batch's key at the upstream's batch
prices (cost.py).

The upstream's API key is sent as a header only; errors name the status and the endpoint, never the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import aiohttp

from gateway.batch.models import ENDPOINTS, FINAL, error_line, output_tokens
from gateway.batch.validate import WorkItem
from gateway.batch.worker import REDIS_ERRORS

if TYPE_CHECKING:
    from gateway.batch.service import BatchService

log = logging.getLogger("gateway.batch")
LEASE_SECONDS = 60
#: Record fields of a native batch (besides the OpenAI ones, see store.py).
MODE, POOL, UP_FILE, UP_BATCH, UP_CANCEL = "mode", "native_pool", "up_file", "up_batch", "up_cancel"
SUBMITTING = "up_submitting"  # set before the provider batch is created: a successor looks for it first
#: Provider terminal status -> the error code of forwarded lines the provider returned no result for.
MISSING = {"cancelled": "batch_cancelled", "expired": "batch_expired", "completed": "missing_result"}

# KEYS: lease. ARGV: owner, seconds. Renew only a lease this replica still holds.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class NativeTarget:
    """Where one pool's batches go: the provider upstream (its URL ends in /v1) and how often to poll it."""

    pool: str
    upstream: str
    base_url: str
    model: str | None  # the upstream's name for the model (rewritten into every forwarded line), None: unchanged
    poll_s: float
    poll_max_s: float
    api_key: str | None = field(default=None, repr=False)


#: A pool or client model name -> its pool's native target (None: the pool runs batches locally).
Resolve = Callable[[str], NativeTarget | None]
#: Book one forwarded line's usage: (owner key id, pool, upstream, usage object of the answer).
Charge = Callable[[str | None, str, str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class NativeHooks:
    resolve: Resolve
    charge: Charge


class NativeError(Exception):
    """The provider refused or failed a call: the message names the call and status only (never the key)."""


def target_for(resolve: Resolve, endpoint: str, models: set[str]) -> NativeTarget | None:
    """The native target of a batch whose runnable lines use `models`, or None (local execution)."""
    if endpoint not in ENDPOINTS or not models:
        return None
    targets = {resolve(m) for m in models}
    if len(targets) != 1:
        return None
    return targets.pop()


class NativeForwarder:
    def __init__(self, svc: BatchService, hooks: NativeHooks) -> None:
        self.svc, self.hooks = svc, hooks
        assert svc.redis is not None
        self.redis, self.k, self.store = svc.redis, svc.k, svc.store
        self._renew = self.redis.register_script(_RENEW)
        self._session: aiohttp.ClientSession | None = None
        self._wake: dict[str, asyncio.Event] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def wake(self, bid: str) -> None:
        """Poll now (a cancel on this replica reaches the provider at once, not at the next poll)."""
        ev = self._wake.get(bid)
        if ev is not None:
            ev.set()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No total limit (an upload or download of a large file takes what it takes); a stalled read fails.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=120))
        return self._session

    # ---- driver ---------------------------------------------------------------------------------------------
    async def run(self, bid: str) -> None:
        """Drive one native batch to its end, if no other replica is driving it."""
        lease = self.k.nat_lease(bid)
        if not await self.redis.set(lease, self.svc.s.replica_id, nx=True, ex=LEASE_SECONDS):
            return
        keeper = asyncio.create_task(self._keep(lease, asyncio.current_task()))
        self._wake[bid] = asyncio.Event()
        try:
            await self._drive(bid)
            await self.redis.delete(lease)
        except (NativeError, aiohttp.ClientError, ValueError, KeyError, *REDIS_ERRORS) as e:  # Value/Key: a bad answer
            # The lease stays until it expires: the sweeper retries then (a natural backoff).
            log.warning("batch %s: native forwarding interrupted (%s); retried once its lease expires",
                        bid, e if isinstance(e, NativeError) else type(e).__name__)
        finally:
            keeper.cancel()
            self._wake.pop(bid, None)

    async def _keep(self, lease: str, driver: asyncio.Task | None) -> None:
        """Renew the lease while the driver runs; a lease found taken over (this replica stalled past its expiry)
        stops the driver, so two replicas never drive one batch."""
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                held = await self._renew(keys=[lease], args=[self.svc.s.replica_id, LEASE_SECONDS])
            except REDIS_ERRORS:
                continue
            if not held and driver is not None:
                log.warning("native batch lease %s lost; another replica drives it", lease)
                driver.cancel()
                return

    async def _drive(self, bid: str) -> None:
        rec = await self.store.record(bid)
        if rec.get("status") not in ("in_progress", "cancelling"):
            return
        t = self.hooks.resolve(rec[POOL])
        if t is None:
            raise NativeError(f"pool {rec[POOL]!r} no longer forwards batches natively")
        up = rec.get(UP_BATCH) or await self._submit(bid, rec, t)
        ub = await self._poll(bid, up, t) if up else {"status": "cancelled"}
        if ub["status"] == "failed":
            await self.store.move(bid, "failed", ("in_progress", "cancelling"), failed_at=int(time.time()),
                                  errors=ub.get("errors") or {"object": "list", "data": []})
            return
        await self._collect(bid, rec, ub, t)
        await self.svc.finalize(bid)

    async def _submit(self, bid: str, rec: dict[str, str], t: NativeTarget) -> str | None:
        """Upload the runnable lines and create the provider batch; None when cancelled before it was created."""
        up_file = rec.get(UP_FILE)
        if not up_file:
            up_file = await self._upload(bid, rec, t)
            await self.redis.hset(self.k.batch(bid), UP_FILE, up_file)
        now = await self.store.record(bid)
        if now.get("status") != "in_progress":
            return None
        ub = await self._find(t, bid) if now.get(SUBMITTING) else None
        if ub is None:
            await self.redis.hset(self.k.batch(bid), SUBMITTING, "1")
            body = {"input_file_id": up_file, "endpoint": rec["endpoint"], "completion_window": rec["completion_window"],
                    "metadata": {"gateway_batch_id": bid}}
            ub = await self._call(t, "POST", "/batches", json=body)
        await self.redis.hset(self.k.batch(bid), UP_BATCH, ub["id"])
        log.info("batch %s forwarded to upstream %s as %s", bid, t.upstream, ub["id"])
        return str(ub["id"])

    async def _find(self, t: NativeTarget, bid: str) -> dict[str, Any] | None:
        """A provider batch created for `bid` by a replica that died before recording its id (among the provider's
        latest 100 batches, tagged with metadata.gateway_batch_id), so it is not submitted twice."""
        page = await self._call(t, "GET", "/batches?limit=100")
        found = [b for b in page.get("data") or [] if (b.get("metadata") or {}).get("gateway_batch_id") == bid]
        return found[0] if found else None

    async def _upload(self, bid: str, rec: dict[str, str], t: NativeTarget) -> str:
        with tempfile.TemporaryFile() as f:  # bounded memory whatever the file size
            await self._write_input(f, rec, t)
            f.seek(0)
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", f, filename=f"{bid}.jsonl", content_type="application/jsonl")
            return str((await self._call(t, "POST", "/files", data=form))["id"])

    async def _write_input(self, f: IO[bytes], rec: dict[str, str], t: NativeTarget) -> None:
        async for item in self.svc.checked_lines(rec["input_file_id"], rec["endpoint"]):
            if isinstance(item, WorkItem):
                body = {**item.body, "model": t.model} if t.model else item.body
                line = {"custom_id": item.custom_id, "method": "POST", "url": rec["endpoint"], "body": body}
                f.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")

    async def _poll(self, bid: str, up: str, t: NativeTarget) -> dict[str, Any]:
        """Poll the provider batch until it is final (backoff x1.5 up to poll_max_s); send a cancel once."""
        delay = t.poll_s
        while True:
            ub = await self._call(t, "GET", f"/batches/{up}")
            rec = await self.store.record(bid)
            await self._mirror(bid, rec, ub)
            if ub.get("status") in FINAL:
                return ub
            if rec.get("status") == "cancelling" and not rec.get(UP_CANCEL) and ub.get("status") != "cancelling":
                await self._call(t, "POST", f"/batches/{up}/cancel")
                await self.redis.hset(self.k.batch(bid), UP_CANCEL, "1")
                delay = t.poll_s
                continue
            ev = self._wake.get(bid)
            if ev is not None:
                try:
                    await asyncio.wait_for(ev.wait(), delay)
                except TimeoutError:
                    pass
                ev.clear()
            delay = min(delay * 1.5, t.poll_max_s)

    async def _mirror(self, bid: str, rec: dict[str, str], ub: dict[str, Any]) -> None:
        """The provider's progress as the gateway batch's request_counts (lines failed locally added)."""
        c = ub.get("request_counts") or {}
        local_failed = int(rec.get("native_local_failed") or 0)
        await self.redis.hset(self.k.batch(bid), mapping={
            "up_completed": int(c.get("completed") or 0), "up_failed": int(c.get("failed") or 0) + local_failed})

    async def _collect(self, bid: str, rec: dict[str, str], ub: dict[str, Any], t: NativeTarget) -> None:
        """Store every provider result (once per custom_id), then an error line for each forwarded line without one."""
        owner = rec.get("owner", "-")
        owner_id = None if owner == "-" else owner
        for key in ("output_file_id", "error_file_id"):
            if ub.get(key):
                async for raw in self._download(t, ub[key]):
                    await self._store_line(bid, owner_id, raw, t)
        status = str(ub.get("status"))
        if status == "expired":
            await self.redis.hset(self.k.batch(bid), "expired", "1")
        code = MISSING.get(status, "missing_result")
        async for item in self.svc.checked_lines(rec["input_file_id"], rec["endpoint"]):
            if isinstance(item, WorkItem) and not await self.store.has_result(bid, item.custom_id):
                msg = f"The provider's batch ended ({status}) without a result for this request."
                await self.store.store_result(bid, item.custom_id, False, error_line(item.custom_id, code, msg))

    async def _store_line(self, bid: str, owner: str | None, raw: bytes, t: NativeTarget) -> None:
        try:
            line = json.loads(raw)
            cid = line["custom_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("batch %s: skipped an unreadable line of the provider's results", bid)
            return
        resp = line.get("response") or {}
        b = resp.get("body")
        body: dict[str, Any] = b if isinstance(b, dict) else {}
        ok = line.get("error") is None and 200 <= int(resp.get("status_code") or 0) < 300
        stored, _, _ = await self.store.store_result(bid, cid, ok, line, output_tokens(body))
        if stored and isinstance(body.get("usage"), dict):
            self.hooks.charge(owner, t.pool, t.upstream, body["usage"])

    # ---- HTTP -----------------------------------------------------------------------------------------------
    def _headers(self, t: NativeTarget) -> dict[str, str]:
        return {"Authorization": f"Bearer {t.api_key}"} if t.api_key else {}

    async def _call(self, t: NativeTarget, method: str, path: str, **kw: Any) -> dict[str, Any]:
        async with self.session().request(method, t.base_url + path, headers=self._headers(t), **kw) as r:
            if r.status >= 400:
                raise NativeError(f"upstream {t.upstream}: {method} {path.split('/')[1]} answered {r.status}")
            return await r.json(content_type=None)

    async def _download(self, t: NativeTarget, fid: str) -> AsyncIterator[bytes]:
        """A provider file's lines, streamed (a line may span reads)."""
        async with self.session().get(f"{t.base_url}/files/{fid}/content", headers=self._headers(t)) as r:
            if r.status >= 400:
                raise NativeError(f"upstream {t.upstream}: GET files content answered {r.status}")
            rest = b""
            async for chunk in r.content.iter_chunked(1 << 16):
                *whole, rest = (rest + chunk).split(b"\n")
                for ln in whole:
                    if ln.strip():
                        yield ln
            if rest.strip():
                yield rest

