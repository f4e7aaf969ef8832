"""Anthropic Message Batch views of the batch engine's records and result lines (pure)."""

from __future__ import annotations

import json

import pytest

from gateway.batch.anthropic import counts_of, message_batch, request_lines, result_line, status_of

REC = {"id": "batch_1", "status": "in_progress", "created_at": "1764000000", "expires_at": "1764086400",
       "total": "10", "completed": "4", "failed": "3", "n_canceled": "1", "n_expired": "1"}


def test_status_and_counts():
    assert status_of(REC) == "in_progress" and status_of({"status": "validating"}) == "in_progress"
    assert status_of({"status": "cancelling"}) == "canceling"
    assert all(status_of({"status": s}) == "ended" for s in ("completed", "failed", "expired", "cancelled"))
    assert counts_of(REC) == {"processing": 3, "succeeded": 4, "errored": 1, "canceled": 1, "expired": 1}
    assert counts_of({**REC, "status": "completed"})["processing"] == 0


def test_message_batch_view():
    mb = message_batch(REC, "http://gw")
    assert mb["type"] == "message_batch" and mb["created_at"] == "2025-11-24T16:00:00Z" and mb["results_url"] is None
    done = message_batch({**REC, "status": "cancelled", "cancelling_at": "1764000010", "cancelled_at": "1764000020"}, "http://gw")
    assert done["results_url"] == "http://gw/v1/messages/batches/batch_1/results"
    assert done["ended_at"] == "2025-11-24T16:00:20Z" and done["cancel_initiated_at"] == "2025-11-24T16:00:10Z"


def test_request_lines():
    [line] = request_lines([{"custom_id": "a", "params": {"model": "m"}}])
    assert json.loads(line) == {"custom_id": "a", "method": "POST", "url": "/v1/messages", "body": {"model": "m"}}
    for bad in (None, [], [{"custom_id": "a"}], ["x"]):
        with pytest.raises(ValueError):
            request_lines(bad)


def test_result_lines():
    ok = {"custom_id": "a", "response": {"status_code": 200, "request_id": "r", "body": {"type": "message"}}, "error": None}
    assert result_line(ok) == {"custom_id": "a", "result": {"type": "succeeded", "message": {"type": "message"}}}
    ant_err = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    r = result_line({"custom_id": "b", "response": {"status_code": 529, "body": ant_err}, "error": None})
    assert r["result"] == {"type": "errored", "error": ant_err}
    r = result_line({"custom_id": "c", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}, "error": None})
    assert r["result"]["error"] == {"type": "error", "error": {"type": "api_error", "message": "boom"}}
    assert result_line({"custom_id": "d", "response": None, "error": {"code": "batch_cancelled"}})["result"] == {"type": "canceled"}
    assert result_line({"custom_id": "e", "response": None, "error": {"code": "batch_expired"}})["result"] == {"type": "expired"}
    r = result_line({"custom_id": "f", "response": None, "error": {"code": "model_not_found", "message": "no m"}})
    assert r["result"]["error"]["error"] == {"type": "not_found_error", "message": "no m"}
