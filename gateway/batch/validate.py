"""Checks of one batch input line, pure (no I/O): the same rules OpenAI applies to a batch input file.

A line either becomes a work item, or fails the whole batch (structural errors: the batch goes to `failed` with
the `errors` list, as OpenAI does), or fails only itself (unknown model, oversize body: it goes straight to the
error file as a per-line error and the rest of the batch runs).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_CUSTOM_ID = 512


@dataclass(frozen=True, slots=True)
class LineError:
    """A structural problem: the batch fails, listing these in `errors.data`."""

    code: str
    line: int
    message: str
    param: str | None = None

    def public(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


@dataclass(frozen=True, slots=True)
class LineFailure:
    """The line is well formed but cannot run: recorded as a failed request of its own."""

    custom_id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class WorkItem:
    custom_id: str
    body: dict[str, Any]


Checked = LineError | LineFailure | WorkItem


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def check_line(
    raw: bytes, line: int, endpoint: str, seen: set[str], known_model: Callable[[str], bool], max_body_bytes: int
) -> Checked:
    """Check one JSONL line (1-based `line`); adds its custom_id to `seen`."""
    try:
        obj = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return LineError("invalid_json_line", line, "This line is not parseable as valid JSON.")
    if not isinstance(obj, dict):
        return LineError("invalid_json_line", line, "Each line must be a JSON object.")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError("missing_required_parameter", line, "Missing required parameter: 'custom_id'.", "custom_id")
    if len(cid) > MAX_CUSTOM_ID:
        return LineError("invalid_value", line, f"'custom_id' is longer than {MAX_CUSTOM_ID} characters.", "custom_id")
    if cid in seen:
        return LineError(
            "duplicate_custom_id", line,
            "The custom_id for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch.", "custom_id",
        )
    seen.add(cid)
    if obj.get("method") != "POST":
        return LineError("invalid_method", line, "The method for this request must be 'POST'.", "method")
    url = obj.get("url")
    if url != endpoint:
        return LineError("invalid_url", line, f"The URL provided for this request does not match the batch endpoint {endpoint!r}.", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError("missing_required_parameter", line, "Missing required parameter: 'body' (a JSON object).", "body")
    return _check_body(cid, body, len(raw), known_model, max_body_bytes)


def _check_body(cid: str, body: dict[str, Any], size: int, known_model: Callable[[str], bool], max_body_bytes: int) -> Checked:
    if size > max_body_bytes:
        return LineFailure(cid, "request_too_large", f"The request body is larger than the limit of {max_body_bytes} bytes.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return LineFailure(cid, "missing_required_parameter", "Missing required parameter: 'model'.")
    if not known_model(model):
        return LineFailure(cid, "model_not_found", f"The model '{model}' does not exist")
    if body.get("stream"):
        body = {**body, "stream": False}  # batch results are whole responses
    return WorkItem(cid, body)


def split_lines(buf: bytearray, final: bool) -> tuple[list[bytes], bytearray]:
    """Cut complete lines off `buf` (the rest stays for the next read); blank lines are dropped."""
    end = buf.rfind(b"\n")
    if end < 0 and not final:
        return [], buf
    cut = len(buf) if final else end + 1
    lines = [ln for ln in bytes(buf[:cut]).split(b"\n") if ln.strip()]
    return lines, bytearray(buf[cut:])
