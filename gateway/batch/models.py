"""Types shared by the batch package: the execution seam, ids and the OpenAI-shaped result lines."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
WINDOWS = {"24h": 24 * 3600}
FINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """One batch line to run: `endpoint` is the URL path (e.g. /v1/chat/completions)."""

    endpoint: str
    body: dict[str, Any]
    owner: str | None
    batch_id: str
    custom_id: str


@dataclass(frozen=True, slots=True)
class ExecResult:
    status_code: int
    body: dict[str, Any]
    request_id: str


#: The execution seam: the worker never calls HTTP itself; executor.py runs each line through the request path
#: in-process (gateway/inprocess.py), in the `batch` service class.
Execute = Callable[[ExecRequest], Awaitable[ExecResult]]


def new_id(kind: str) -> str:
    """OpenAI-style ids: file-…, batch_…, batch_req_…"""
    sep = "-" if kind == "file" else "_"
    return f"{kind}{sep}{secrets.token_hex(12)}"


def response_line(custom_id: str, res: ExecResult) -> dict[str, Any]:
    """An output/error file line for a request that got an HTTP answer (OpenAI's format)."""
    return {
        "id": new_id("batch_req"),
        "custom_id": custom_id,
        "response": {"status_code": res.status_code, "request_id": res.request_id, "body": res.body},
        "error": None,
    }


def error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """An error file line for a request that was never answered (invalid, cancelled, expired, unreachable)."""
    return {"id": new_id("batch_req"), "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def output_tokens(body: dict[str, Any]) -> int:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    n = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0
