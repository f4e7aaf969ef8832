"""HTTP endpoints of the OpenAI Files and Batch APIs and of Anthropic Message Batches (the official SDKs work
unchanged), plus a progress summary.

Every object belongs to the gateway API key that created it; another key gets 404 as if it did not exist.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import BodyPartReader, web

from gateway.batch import anthropic
from gateway.batch.files import PURPOSES, FileWriter, public_file
from gateway.batch.service import BatchService
from gateway.batch.validate import LineError, check_line
from gateway.errors import GatewayError
from gateway.http.api import API_KEY, read_json

BATCH = web.AppKey("batch", BatchService)
UPLOAD_READ = 64 * 1024


def _svc(request: web.Request) -> BatchService:
    svc = request.app[BATCH]
    svc.require()
    return svc


def _owner(request: web.Request) -> str | None:
    rec = request.get(API_KEY)
    return rec.id if rec is not None else None


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= most:
        raise GatewayError(400, f"'limit' must be an integer between 1 and {most}.", code="invalid_value", param="limit")
    return n


# ---- files ----------------------------------------------------------------------------------------------------
async def create_file(request: web.Request) -> web.Response:
    svc = _svc(request)
    if not request.content_type.startswith("multipart/"):
        raise GatewayError(400, "Uploads must be multipart/form-data with fields 'file' and 'purpose'.", code="invalid_request")
    writer: list[FileWriter] = []  # set once the file part starts, so a failure can drop what was stored
    try:
        purpose, filename = await _read_upload(request, svc, writer)
        if not writer:
            raise GatewayError(400, "Missing required parameter: 'file'.", code="missing_required_parameter", param="file")
        if purpose is None:
            raise GatewayError(400, "Missing required parameter: 'purpose'.", code="missing_required_parameter", param="purpose")
        obj = await writer[0].close(filename, purpose, _owner(request), svc.s.batch_retention)
    except BaseException as e:
        if writer:
            await asyncio.shield(writer[0].abort())
        if isinstance(e, (ValueError, aiohttp.ClientPayloadError)):  # aiohttp: malformed multipart
            raise GatewayError(400, f"The multipart body could not be read ({e}).", code="invalid_request") from None
        raise
    return web.json_response(obj)


async def _read_upload(request: web.Request, svc: BatchService, writer: list[FileWriter]) -> tuple[str | None, str]:
    """Walk the multipart parts: `purpose` (checked as soon as it is read) and `file` (streamed into Redis)."""
    reader = await request.multipart()
    purpose: str | None = None
    filename = ""
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = (await part.read_chunk(256)).decode("utf-8", "replace").strip()
            _check_purpose(purpose)
        elif part.name == "file" and not writer:
            filename = (part.filename or "upload.jsonl")[:256]
            writer.append(svc.files.writer())
            await _stream_part(part, writer[0], svc.s.body_read_timeout)
        await part.release()
    return purpose, filename


def _check_purpose(purpose: str) -> None:
    if purpose != "batch":
        raise GatewayError(400, f"Invalid purpose {purpose!r}: this gateway accepts files with purpose 'batch'.",
                           code="invalid_value", param="purpose")


async def _stream_part(part: BodyPartReader, writer: FileWriter, timeout: float) -> None:
    while True:
        try:
            async with asyncio.timeout(timeout):
                data = await part.read_chunk(UPLOAD_READ)
        except TimeoutError:
            raise GatewayError(408, "the upload did not arrive in time", code="body_timeout") from None
        if not data:
            return
        await writer.feed(data)


async def list_files(request: web.Request) -> web.Response:
    svc = _svc(request)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise GatewayError(400, "'order' must be 'asc' or 'desc'.", code="invalid_value", param="order")
    purpose = request.query.get("purpose")
    if purpose is not None and purpose not in PURPOSES:
        return web.json_response({"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None})
    page = await svc.files.list_page(_owner(request), request.query.get("after"), _limit(request, 10000, 10000), order, purpose)
    return web.json_response(page)


async def get_file(request: web.Request) -> web.Response:
    svc = _svc(request)
    return web.json_response(public_file(await svc.files.meta(request.match_info["id"], _owner(request))))


async def file_content(request: web.Request) -> web.StreamResponse:
    svc = _svc(request)
    fid = request.match_info["id"]
    await svc.files.meta(fid, _owner(request))
    resp = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    await resp.prepare(request)
    async for chunk in svc.files.chunks(fid):
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def delete_file(request: web.Request) -> web.Response:
    svc = _svc(request)
    fid = request.match_info["id"]
    await svc.files.delete(fid, _owner(request))
    return web.json_response({"id": fid, "object": "file", "deleted": True})


# ---- batches --------------------------------------------------------------------------------------------------
async def create_batch(request: web.Request) -> web.Response:
    svc = _svc(request)
    body = await read_json(request)
    return web.json_response(await svc.create(_owner(request), body))


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response(await _svc(request).get(request.match_info["id"], _owner(request)))


async def list_batches(request: web.Request) -> web.Response:
    svc = _svc(request)
    return web.json_response(await svc.store.list_page(_owner(request), request.query.get("after"), _limit(request, 20, 100)))


async def cancel_batch(request: web.Request) -> web.Response:
    return web.json_response(await _svc(request).cancel(request.match_info["id"], _owner(request)))


async def summary(request: web.Request) -> web.Response:
    return web.json_response(await _svc(request).summary())


# ---- Anthropic Message Batches (same engine) -------------------------------------------------------------------
async def create_msg_batch(request: web.Request) -> web.Response:
    svc = _svc(request)
    body = await read_json(request)
    try:
        lines = anthropic.request_lines(body.get("requests"))
    except ValueError as e:
        raise GatewayError(400, str(e), param="requests") from None
    if len(lines) > svc.s.batch_max_lines:
        raise GatewayError(400, f"A batch holds at most {svc.s.batch_max_lines} requests.", param="requests")
    seen: set[str] = set()
    for i, ln in enumerate(lines):  # structural problems are refused now, as Anthropic does
        r = check_line(ln, i + 1, anthropic.ENDPOINT, seen, svc.known_model, svc.s.max_body_bytes)
        if isinstance(r, LineError):
            raise GatewayError(400, f"requests[{i}]: {r.message}", param="requests")
    writer = svc.files.writer(limited=False)
    await writer.add_lines(lines)
    meta = await writer.close("message_batch_requests.jsonl", "batch", _owner(request), svc.s.batch_retention)
    batch = await svc.start_batch(_owner(request), meta["id"], anthropic.ENDPOINT, anthropic=True, total=len(lines))
    return web.json_response(anthropic.message_batch(await svc.store.record(batch["id"]), _base(request)))


def _base(request: web.Request) -> str:
    return str(request.url.origin())


async def _msg_batch(request: web.Request) -> dict[str, str]:
    rec = await _svc(request).store.owned(request.match_info["id"], _owner(request))
    if rec.get("endpoint") != anthropic.ENDPOINT:
        raise GatewayError(404, f"No message batch found with id '{rec['id']}'.", code="batch_not_found")
    return rec


async def get_msg_batch(request: web.Request) -> web.Response:
    return web.json_response(anthropic.message_batch(await _msg_batch(request), _base(request)))


async def cancel_msg_batch(request: web.Request) -> web.Response:
    rec = await _msg_batch(request)
    if anthropic.status_of(rec) != "ended":
        await _svc(request).cancel(rec["id"], _owner(request))
    return web.json_response(anthropic.message_batch(await _msg_batch(request), _base(request)))


async def list_msg_batches(request: web.Request) -> web.Response:
    svc, base = _svc(request), _base(request)
    after = request.query.get("after_id")
    page = await svc.store.list_page(_owner(request), after, _limit(request, 20, 1000), anthropic=True,
                                     render=lambda h: anthropic.message_batch(h, base))
    page.pop("object", None)
    return web.json_response(page)


async def msg_batch_results(request: web.Request) -> web.StreamResponse:
    rec = await _msg_batch(request)
    if anthropic.status_of(rec) != "ended":
        raise GatewayError(400, f"Message batch {rec['id']} is still processing; results are available once it has ended.")
    svc = _svc(request)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-jsonl"})
    await resp.prepare(request)
    seen: set[str] = set()
    for fid in (rec.get("output_file_id"), rec.get("error_file_id")):
        if fid:
            async for ln in svc.files.lines(fid):
                res = anthropic.result_line(json.loads(ln))
                seen.add(res["custom_id"])
                await resp.write(json.dumps(res).encode() + b"\n")
    if rec.get("status") == "cancelled" and len(seen) < int(rec.get("total") or 0):
        # cancelled before anything was queued: every request that has no result was canceled
        async for ln in svc.files.lines(rec["input_file_id"]):
            cid = json.loads(ln).get("custom_id")
            if cid not in seen:
                await resp.write(json.dumps({"custom_id": cid, "result": {"type": "canceled"}}).encode() + b"\n")
    await resp.write_eof()
    return resp


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/files", create_file)
    r.add_get("/v1/files", list_files)
    r.add_get("/v1/files/{id}", get_file)
    r.add_get("/v1/files/{id}/content", file_content)
    r.add_delete("/v1/files/{id}", delete_file)
    r.add_post("/v1/batches", create_batch)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{id}", get_batch)
    r.add_post("/v1/batches/{id}/cancel", cancel_batch)
    r.add_get("/v1/gateway/batches", summary)
    r.add_post("/v1/messages/batches", create_msg_batch)
    r.add_get("/v1/messages/batches", list_msg_batches)
    r.add_get("/v1/messages/batches/{id}", get_msg_batch)
    r.add_post("/v1/messages/batches/{id}/cancel", cancel_msg_batch)
    r.add_get("/v1/messages/batches/{id}/results", msg_batch_results)
