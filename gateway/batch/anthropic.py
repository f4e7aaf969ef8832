"""Anthropic Message Batches on the same engine: request conversion, the MessageBatch view and result lines (pure).

A Message Batch is stored like an OpenAI batch over an internal input file whose lines target /v1/messages; only
the shapes differ. Status: validating/in_progress/finalizing -> "in_progress", cancelling -> "canceling", any
final status -> "ended". Counts: succeeded = completed; canceled and expired are counted apart; errored = the
other failures; processing = lines without a result.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from gateway.batch.models import FINAL

ENDPOINT = "/v1/messages"


def rfc3339(ts: str | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(int(float(ts)), UTC).isoformat().replace("+00:00", "Z")


def request_lines(requests: Any) -> list[bytes]:
    """`requests: [{custom_id, params}]` as batch input lines; raises ValueError with the problem."""
    if not isinstance(requests, list) or not requests:
        raise ValueError("'requests' must be a non-empty array")
    out = []
    for i, r in enumerate(requests):
        if not isinstance(r, dict) or not isinstance(r.get("params"), dict):
            raise ValueError(f"requests[{i}]: each request needs 'custom_id' and an object 'params'")
        line = {"custom_id": r.get("custom_id"), "method": "POST", "url": ENDPOINT, "body": r["params"]}
        out.append(json.dumps(line, separators=(",", ":")).encode())
    return out


def status_of(rec: dict[str, str]) -> str:
    st = rec.get("status", "")
    return "ended" if st in FINAL else "canceling" if st == "cancelling" else "in_progress"


def counts_of(rec: dict[str, str]) -> dict[str, int]:
    n = {k: int(rec.get(k) or 0) for k in ("total", "completed", "failed", "n_canceled", "n_expired")}
    done = n["completed"] + n["failed"]
    return {
        "processing": 0 if status_of(rec) == "ended" else max(0, n["total"] - done),
        "succeeded": n["completed"],
        "errored": max(0, n["failed"] - n["n_canceled"] - n["n_expired"]),
        "canceled": n["n_canceled"],
        "expired": n["n_expired"],
    }


def message_batch(rec: dict[str, str], base_url: str = "") -> dict[str, Any]:
    """The MessageBatch object; `results_url` once it has ended."""
    ended = status_of(rec) == "ended"
    return {
        "id": rec["id"], "type": "message_batch", "processing_status": status_of(rec),
        "request_counts": counts_of(rec),
        "created_at": rfc3339(rec.get("created_at")), "expires_at": rfc3339(rec.get("expires_at")),
        "ended_at": rfc3339(next((rec[k] for k in ("completed_at", "cancelled_at", "expired_at", "failed_at") if rec.get(k)), None)),
        "cancel_initiated_at": rfc3339(rec.get("cancelling_at")), "archived_at": None,
        "results_url": f"{base_url}/v1/messages/batches/{rec['id']}/results" if ended else None,
    }


def result_line(line: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-format output/error line as an Anthropic batch result line."""
    cid, resp, err = line.get("custom_id"), line.get("response"), line.get("error")
    if resp is not None:
        body = resp.get("body") or {}
        if 200 <= int(resp.get("status_code") or 0) < 300:
            return {"custom_id": cid, "result": {"type": "succeeded", "message": body}}
        if body.get("type") != "error":
            msg = str((body.get("error") or {}).get("message") or f"HTTP {resp.get('status_code')}")
            body = {"type": "error", "error": {"type": "api_error", "message": msg}}
        return {"custom_id": cid, "result": {"type": "errored", "error": body}}
    code = (err or {}).get("code")
    if code == "batch_cancelled":
        return {"custom_id": cid, "result": {"type": "canceled"}}
    if code == "batch_expired":
        return {"custom_id": cid, "result": {"type": "expired"}}
    kind = "not_found_error" if code == "model_not_found" else "invalid_request_error"
    message = str((err or {}).get("message") or code)
    return {"custom_id": cid, "result": {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}}
