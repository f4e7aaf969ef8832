"""Bench scenarios beyond the core ones in bench.py, one module each, registered by name.

A scenario module defines a function `async def run(bench) -> dict` (bench: tools.bench.Bench, which gives it
`procs`, `sims`, `o` (options), `_fleet`, `_teardown` and the harness functions of tools.bench) and decorates it
with `@scenario("name")`, optionally passing `render=` (result dict -> list of markdown lines for the report).
Every module in this package is imported when the registry is first read, so adding a scenario is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Any], Awaitable[dict]]
    render: Callable[[dict], list[str]] | None = None
    #: Run the direct-to-simulator oracle of the reference workload before this scenario.
    needs_oracle: bool = False


_REGISTRY: dict[str, Scenario] = {}


def scenario(name: str, *, render: Callable[[dict], list[str]] | None = None, needs_oracle: bool = False):
    def deco(fn: Callable[[Any], Awaitable[dict]]):
        _REGISTRY[name] = Scenario(name, fn, render, needs_oracle)
        return fn

    return deco


def registry() -> dict[str, Scenario]:
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")
    return _REGISTRY
