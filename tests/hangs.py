"""Tests that run real servers in one event loop: if one hangs, say where before pytest-timeout kills it."""

from __future__ import annotations

import asyncio
import io
import sys
from collections.abc import AsyncIterator

import pytest

#: Seconds before pytest-timeout's limit at which every task's stack is printed.
MARGIN = 20.0


def dump_tasks(label: str) -> None:
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    print(f"\n=== {label}: {len(tasks)} asyncio tasks still pending ===", file=out)
    for task in tasks:
        print(f"--- {task.get_name()} {task.get_coro()!r}", file=out)
        task.print_stack(limit=12, file=out)
    sys.stderr.write(out.getvalue())


@pytest.fixture(autouse=True)
async def report_hangs(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Set up first and torn down last, so its timer also covers the other fixtures' teardown."""
    limit = float(request.config.getini("timeout") or 0)
    loop = asyncio.get_running_loop()
    handle = loop.call_later(limit - MARGIN, dump_tasks, request.node.nodeid) if limit > MARGIN else None
    yield
    if handle is not None:
        handle.cancel()
