"""Shared fixtures: real simulator upstreams, real gateways and the real Redis, all on loopback."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from gateway.config import FleetConfig
from gateway.http.api import PROXY_KEY, RUNTIME, SYNC
from gateway.http.app import create_app
from gateway.http.protocol import GatewayRunner
from gateway.proxy import Proxy
from gateway.runtime import Runtime
from gateway.settings import Settings
from gateway.sim import SimConfig, start_sim
from gateway.sim.reference import REFERENCE_SIMS, reference_fleet
from tests.otlp_receiver import otlp_receiver  # noqa: F401  (a fixture for every test module)

REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder: tests/unit, tests/integration, tests/e2e (`pytest -m unit`)."""
    for item in items:
        kind = item.path.parent.name
        if kind in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Gateway:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def proxy(self) -> Proxy:
        return self.app[PROXY_KEY]

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    async def sync(self) -> None:
        """One fleet-sync cycle now (flush this replica's figures, pull the others'): instead of sleeping for one."""
        await self.app[SYNC].sync_once()

    async def stop(self) -> None:
        await self.runner.cleanup()


@dataclass
class SimFleet:
    ports: dict[str, int]
    apps: dict[str, web.Application]
    runners: dict[str, web.AppRunner]

    def config(self, sims: dict[str, SimConfig] | None = None) -> FleetConfig:
        return reference_fleet(self.ports, sims)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


StartSims = Callable[..., Awaitable[SimFleet]]
StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_sims() -> AsyncIterator[StartSims]:
    runners: list[web.AppRunner] = []

    async def start(sims: dict[str, SimConfig] | None = None) -> SimFleet:
        sims = sims or REFERENCE_SIMS
        ports, apps, rs = {}, {}, {}
        for name, cfg in sims.items():
            runner, port = await start_sim(cfg, "127.0.0.1", 0)
            runners.append(runner)
            ports[name], apps[name], rs[name] = port, runner.app, runner
        return SimFleet(ports, apps, rs)

    yield start
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def sim_fleet(start_sims: StartSims) -> SimFleet:
    return await start_sims()


@pytest.fixture
def redis_prefix() -> str:
    return f"gwtest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def redis_client(redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(REDIS_URL, socket_timeout=10, socket_connect_timeout=5)
    await r.ping()  # the real server must be there: no silent skip
    yield r
    keys = [k async for k in r.scan_iter(f"{redis_prefix}:*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(fleet: FleetConfig, **overrides) -> Gateway:
        overrides.setdefault("replica_id", f"test-{uuid.uuid4().hex[:6]}")
        overrides.setdefault("port", free_port())  # known before create_app: the batch worker posts to it
        telemetry = overrides.pop("telemetry", None)
        settings = Settings(**overrides)
        app = create_app(settings, fleet, telemetry)
        runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=settings.shutdown_grace)
        await runner.setup()
        port = settings.port
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        gw = Gateway(f"http://127.0.0.1:{port}", app, runner)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.stop()


@pytest.fixture
async def gateway(sim_fleet: SimFleet, start_gateway: StartGateway) -> Gateway:
    return await start_gateway(sim_fleet.config())


StartUpstream = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """A hand-written upstream for wire-level cases the simulator does not produce: `handler` serves
    POST /v1/chat/completions; returns the base URL (…/v1)."""
    runners: list[web.AppRunner] = []

    async def start(handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for r in runners:
        await r.cleanup()

