"""Batch input line checks and line splitting (pure logic)."""

from __future__ import annotations

import json

from gateway.batch.service import _progress, _valid_metadata
from gateway.batch.validate import LineError, LineFailure, WorkItem, check_line, split_lines

EP = "/v1/chat/completions"


def known(m: str) -> bool:
    return m == "m"


def line(**over) -> bytes:
    obj = {"custom_id": "a", "method": "POST", "url": EP, "body": {"model": "m", "messages": []}}
    obj.update(over)
    return json.dumps(obj).encode()


def check(raw: bytes, seen: set[str] | None = None, max_body: int = 10_000):
    return check_line(raw, 7, EP, set() if seen is None else seen, known, max_body)


def test_a_good_line_becomes_a_work_item_and_drops_stream():
    r = check(line(body={"model": "m", "messages": [], "stream": True}))
    assert r == WorkItem("a", {"model": "m", "messages": [], "stream": False})


def test_structural_errors_name_line_code_and_param():
    cases = {
        b"{oops": ("invalid_json_line", None),
        b"[1]": ("invalid_json_line", None),
        b'{"x": NaN}': ("invalid_json_line", None),
        line(custom_id=""): ("missing_required_parameter", "custom_id"),
        line(custom_id=3): ("missing_required_parameter", "custom_id"),
        line(custom_id="x" * 600): ("invalid_value", "custom_id"),
        line(method="GET"): ("invalid_method", "method"),
        line(url="/v1/embeddings"): ("invalid_url", "url"),
        line(body="text"): ("missing_required_parameter", "body"),
    }
    for raw, (code, param) in cases.items():
        r = check(raw)
        assert isinstance(r, LineError) and (r.code, r.param, r.line) == (code, param, 7), raw


def test_duplicate_custom_id():
    seen: set[str] = set()
    assert isinstance(check(line(), seen), WorkItem)
    r = check(line(), seen)
    assert isinstance(r, LineError) and r.code == "duplicate_custom_id"


def test_unknown_model_and_oversize_body_fail_only_the_line():
    r = check(line(body={"model": "other"}))
    assert isinstance(r, LineFailure) and r.code == "model_not_found" and r.custom_id == "a"
    r = check(line(body={"model": "m", "messages": [{"content": "x" * 200}]}), max_body=100)
    assert isinstance(r, LineFailure) and r.code == "request_too_large"
    r = check(line(body={"messages": []}))
    assert isinstance(r, LineFailure) and r.code == "missing_required_parameter"


def test_split_lines_keeps_the_partial_tail():
    lines, rest = split_lines(bytearray(b'a\n\nb\r\nc'), final=False)
    assert lines == [b"a", b"b\r"] and rest == b"c"
    lines, rest = split_lines(bytearray(b"no newline yet"), final=False)
    assert lines == [] and rest == b"no newline yet"
    lines, rest = split_lines(rest, final=True)
    assert lines == [b"no newline yet"] and rest == b""


def test_metadata_rules():
    assert _valid_metadata({"k": "v"}) and _valid_metadata({})
    assert not _valid_metadata({"k": 1}) and not _valid_metadata({str(i): "v" for i in range(17)})
    assert not _valid_metadata({"k" * 65: "v"}) and not _valid_metadata(["x"])


def test_progress_rate_and_eta():
    rec = {"id": "b", "status": "in_progress", "created_at": "90", "in_progress_at": "100", "total": "100",
           "completed": "40", "failed": "10", "tokens": "5000"}
    p = _progress(rec, now=110.0)
    assert (p["pending"], p["tokens_per_second"], p["eta_seconds"]) == (50, 500.0, 10.0)
    p = _progress({**rec, "in_progress_at": "", "total": "-1"}, now=110.0)
    assert p["total"] == 0 and p["eta_seconds"] is None
