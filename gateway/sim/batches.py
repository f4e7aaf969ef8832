"""A minimal native Files + Batches API on the hosted simulator, the counterpart of a provider's own batch API that
the gateway forwards batches to (gateway/batch/native.py).

In memory, one process: uploads (multipart `file` + `purpose`) are kept whole; a batch checks its input file
(validating), answers every line with the simulator's own answer generation (in_progress; the same code a
non-streamed request runs, so answers, usage and rate limits are the sim's), writes the output and error files in
the gateway's line format (gateway/batch/models.py) and completes. Cancel stops taking new lines; lines already
running finish and are reported, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from gateway.batch.models import ENDPOINTS, ExecResult, response_line

#: Lines answered at once per batch (bounded: a batch never takes the whole simulated upstream).
CONCURRENCY = 8
RATE_LIMIT_PAUSE = 0.5  # seconds a line waits before retrying after the sim's own 429
FINAL = ("completed", "failed", "expired", "cancelled")
#: (endpoint, body) -> (status, response body): the simulator's answer to one non-streamed request.
Answer = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


@dataclass
class SimFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.content), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None}


@dataclass
class SimBatch:
    id: str
    input_file_id: str
    endpoint: str
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    times: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = None
    metadata: Any = None

    def move(self, status: str) -> None:
        self.status = status
        self.times[f"{status}_at"] = int(time.time())

    def public(self) -> dict[str, Any]:
        times = {t: self.times.get(t) for t in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                                   "expired_at", "cancelling_at", "cancelled_at")}
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
                "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "expires_at": self.created_at + 24 * 3600, **times,
                "request_counts": dict(self.counts), "metadata": self.metadata}


class NativeBatches:
    """The simulator's files and batches (app[NATIVE]); tests read `files` and `batches` directly."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.files: dict[str, SimFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self._tasks: set[asyncio.Task] = set()

    def add_file(self, filename: str, purpose: str, content: bytes) -> SimFile:
        f = SimFile(f"file-sim{secrets.token_hex(8)}", filename, purpose, content)
        self.files[f.id] = f
        return f

    def start(self, b: SimBatch) -> None:
        t = asyncio.create_task(self.run(b))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def run(self, b: SimBatch) -> None:
        items, errors = _parse(self.files[b.input_file_id].content, b.endpoint)
        b.counts["total"] = len(items) + len(errors)
        if errors or not items:
            b.errors = {"object": "list", "data": errors or [{"code": "empty_file", "line": None,
                                                             "message": "empty file", "param": None}]}
            b.move("failed")
            return
        if b.status != "validating":
            return  # cancelled while validating
        b.move("in_progress")
        todo = iter(items)
        out: list[dict] = []
        err: list[dict] = []
        await asyncio.gather(*(self._lane(b, todo, out, err) for _ in range(min(CONCURRENCY, len(items)))))
        b.move("finalizing" if b.status == "in_progress" else b.status)
        if out:
            b.output_file_id = self._result_file(b, out).id
        if err:
            b.error_file_id = self._result_file(b, err).id
        b.move("cancelled" if b.status == "cancelling" else "completed")

    async def _lane(self, b: SimBatch, todo, out: list[dict], err: list[dict]) -> None:
        for cid, body in todo:
            if b.status != "in_progress":
                return  # cancelling: lines not started are not run
            while True:
                status, resp = await self.answer(b.endpoint, {**body, "stream": False})
                if status != 429:
                    break
                await asyncio.sleep(RATE_LIMIT_PAUSE)
            line = response_line(cid, ExecResult(status, resp, f"req_sim{secrets.token_hex(6)}"))
            ok = status == 200
            (out if ok else err).append(line)
            b.counts["completed" if ok else "failed"] += 1

    def _result_file(self, b: SimBatch, lines: list[dict]) -> SimFile:
        data = b"".join(json.dumps(ln, separators=(",", ":")).encode() + b"\n" for ln in lines)
        return self.add_file(f"{b.id}_output.jsonl", "batch_output", data)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


NATIVE = web.AppKey("native_batches", NativeBatches)


def _err(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": None}}, status=status)


def _parse(content: bytes, endpoint: str) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(custom_id, body) per line, or the errors that fail the batch."""
    items, errors, seen = [], [], set()
    for n, raw in enumerate((ln for ln in content.split(b"\n") if ln.strip()), 1):
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        ok = (isinstance(obj, dict) and isinstance(obj.get("custom_id"), str) and obj["custom_id"] not in seen
              and obj.get("url") == endpoint and obj.get("method") == "POST" and isinstance(obj.get("body"), dict))
        if not ok or obj is None:
            errors.append({"code": "invalid_line", "line": n, "message": "invalid batch line", "param": None})
            continue
        seen.add(obj["custom_id"])
        items.append((obj["custom_id"], obj["body"]))
    return items, errors


# ------------------------------------------------------------------------------- handlers
def _store(request: web.Request) -> NativeBatches:
    return request.app[NATIVE]


async def create_file(request: web.Request) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        return _err(400, "Uploads must be multipart/form-data")
    fields: dict[str, Any] = {}
    reader = await request.multipart()
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "file":
            fields["filename"] = part.filename or "upload.jsonl"
            fields["file"] = await part.read()
        elif part.name == "purpose":
            fields["purpose"] = await part.text()
    if "file" not in fields or fields.get("purpose") != "batch":
        return _err(400, "'file' and purpose 'batch' are required", "file")
    f = _store(request).add_file(fields["filename"], "batch", bytes(fields["file"]))
    return web.json_response(f.public())


def _not_found(what: str) -> web.HTTPNotFound:
    body = json.dumps({"error": {"message": f"No such {what}", "type": "invalid_request_error"}})
    return web.HTTPNotFound(text=body, content_type="application/json")


def _file(request: web.Request) -> SimFile:
    f = _store(request).files.get(request.match_info["file_id"])
    if f is None:
        raise _not_found("file")
    return f


async def get_file(request: web.Request) -> web.Response:
    return web.json_response(_file(request).public())


async def file_content(request: web.Request) -> web.Response:
    return web.Response(body=_file(request).content, content_type="application/octet-stream")


async def create_batch(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _err(400, "Invalid JSON body")
    st = _store(request)
    fid, endpoint = body.get("input_file_id"), body.get("endpoint")
    if fid not in st.files:
        return _err(400, f"No such file: {fid}", "input_file_id")
    if endpoint not in ENDPOINTS:
        return _err(400, "unsupported endpoint", "endpoint")
    b = SimBatch(f"batch_sim{secrets.token_hex(8)}", fid, endpoint, metadata=body.get("metadata"))
    st.batches[b.id] = b
    st.start(b)
    return web.json_response(b.public())


def _batch(request: web.Request) -> SimBatch:
    b = _store(request).batches.get(request.match_info["batch_id"])
    if b is None:
        raise _not_found("batch")
    return b


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response(_batch(request).public())


async def list_batches(request: web.Request) -> web.Response:
    """Newest first, `limit` (default 20), as OpenAI lists batches (no cursor here)."""
    limit = int(request.query.get("limit") or 20)
    data = [b.public() for b in reversed(list(_store(request).batches.values()))][:limit]
    return web.json_response({"object": "list", "data": data, "has_more": False,
                              "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})


async def cancel_batch(request: web.Request) -> web.Response:
    b = _batch(request)
    if b.status in ("validating", "in_progress"):
        b.move("cancelling")
    elif b.status != "cancelling":
        return _err(409, f"Cannot cancel a batch with status '{b.status}'.")
    return web.json_response(b.public())


def add_routes(app: web.Application, answer: Answer) -> None:
    """Mount the native Files + Batches API on the simulator app."""
    st = NativeBatches(answer)
    app[NATIVE] = st

    async def _stop(_: web.Application) -> None:
        await st.stop()

    app.on_shutdown.append(_stop)
    r = app.router
    r.add_post("/v1/files", create_file)
    r.add_get("/v1/files/{file_id}", get_file)
    r.add_get("/v1/files/{file_id}/content", file_content)
    r.add_post("/v1/batches", create_batch)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{batch_id}", get_batch)
    r.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
