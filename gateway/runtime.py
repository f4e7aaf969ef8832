"""Assembles one gateway replica's components, independent of HTTP: fleet state, router, Redis sync, upstream
client, hook subscribers, proxy and background loops, started and stopped in dependency order. The inbound HTTP
layer (gateway/http/app.py) serves a Runtime; in-process callers (batch runner, tests) can use its proxy directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.auth import KeyStore
from gateway.batch.executor import InProcessExecutor
from gateway.batch.native import NativeHooks, NativeTarget
from gateway.batch.service import BatchService
from gateway.config import FleetConfig, missing_key_warnings
from gateway.cost import Tokens
from gateway.hooks import Hooks
from gateway.observability import redact
from gateway.observability.subscribers import Metrics, tracing
from gateway.observability.telemetry import Telemetry
from gateway.periodic import Periodic
from gateway.proxy import Proxy
from gateway.reliability.outlier import HealthChecker, OutlierDetector
from gateway.reliability.verdicts import Verdicts
from gateway.routing.affinity import Affinity
from gateway.routing.classes import BATCH
from gateway.routing.router import Router
from gateway.settings import Settings
from gateway.spend import CostQuote, SpendLedger, charge_request
from gateway.state.fleet import Fleet
from gateway.state.goodput import SloTracker
from gateway.state.lengths import Lengths
from gateway.state.measure import Measurement, Outcome, take_usage
from gateway.state.response_store import ResponseStore
from gateway.sync.engine_metrics import EngineMetricsScraper
from gateway.sync.fleet_sync import FleetSync
from gateway.tokens import encoding
from gateway.upstream.client import UpstreamClient

log = logging.getLogger("gateway")
#: Seconds each component gets to stop (Runtime.stop).
STOP_TIMEOUT = 10.0


class Runtime:
    def __init__(self, settings: Settings, cfg: FleetConfig, telemetry: Telemetry | None = None) -> None:
        _register_secrets(settings, cfg)
        #: Configuration findings that do not stop the start (empty key variables ...), shown on /healthz.
        self.warnings = _startup_warnings(cfg, settings)
        self.settings = settings
        self.fleet = Fleet(cfg, settings.default_strategy)
        self.telemetry = telemetry or Telemetry(capture_content=settings.capture_content)
        s = settings
        self.health = OutlierDetector(
            s.eject_after_failures, s.eject_base_seconds, s.eject_max_seconds, self.telemetry.record_ejection,
            max_ejection_percent=s.eject_max_percent, success_rate_ratio=s.eject_success_rate_ratio,
            min_requests=s.eject_min_requests, window=s.eject_window_seconds,
            pools=[p.cfg.upstreams for p in self.fleet.pools.values()],
        )
        self.router = Router(self.fleet, self.health, s.queue_max, s.queue_timeout, s.routing_sample_above)
        self.affinity = self.router.affinity = Affinity(self.fleet)
        self.sync = FleetSync(self.fleet, s.replica_id, s.redis_url, s.redis_prefix, s.flush_interval)
        self.responses = ResponseStore(self.sync.redis, s.redis_prefix, s.responses_ttl)
        self.client = UpstreamClient(s.connect_timeout, s.max_response_bytes, s.max_event_bytes)
        self.hooks = Hooks()
        self.slo = SloTracker(self.fleet)
        # Order matters where one reads what another wrote: measurement first, SLO verdicts before tracing.
        subscribers = (
            Lengths(self.fleet), Measurement(), Verdicts(self.health, self.sync), self.slo, self.affinity, CostQuote(self.fleet),
            tracing(self.telemetry), Metrics(self.telemetry),
        )
        for sub in subscribers:
            self.hooks.subscribe(sub)
        self.proxy = Proxy(s, self.fleet, self.router, self.client, self.hooks)
        self.scraper = EngineMetricsScraper(self.fleet, affinity=self.affinity)
        self.keys = KeyStore(self.sync.redis, s.redis_prefix, s.api_key_refresh_interval, lambda: self.sync.replicas)
        self.ledger = SpendLedger(
            self.sync.redis, s.redis_prefix, s.replica_id, s.spend_sync_interval, self._fleet_rank,
            key_ids=lambda: [r.id for r in self.keys.keys.values()],
        )
        self.checker = (
            HealthChecker(self.fleet.upstreams, self.health, s.health_check_interval, s.health_check_timeout, s.eject_probe_interval)
            if s.health_check_interval > 0 or s.eject_probe_interval > 0
            else None
        )
        # Batch lines run through the same path in-process, in the batch class (spare capacity only).
        self.batch = BatchService(s, lambda model: self.fleet.pool(model) is not None, InProcessExecutor(self.proxy), self.telemetry,
                                  native=NativeHooks(self._native_target, self._charge_native))
        # The sync loop refreshes limits; wake queued requests each cycle so new headroom is used at once.
        self.waker = Periodic("router-wake", s.flush_interval, self._wake)

    def _native_target(self, model: str) -> NativeTarget | None:
        """The provider batch API a pool's batches are forwarded to (config `native_batch`), if any."""
        pool = self.fleet.pool(model)
        nb = pool.cfg.native_batch if pool is not None else None
        if pool is None or nb is None:
            return None
        up = self.fleet.config.upstreams[nb.upstream]
        return NativeTarget(pool.model, up.name, up.base_url, up.model, nb.poll_s, nb.poll_max_s, up.api_key())

    def _charge_native(self, owner: str | None, pool: str, upstream: str, usage: dict) -> None:
        """Book one line a provider ran in its batch API, at the upstream's batch prices."""
        out = Outcome()
        take_usage(out, usage)
        tokens = Tokens(out.input_tokens or 0, out.cached_tokens, out.output_tokens)
        charge_request(self.fleet, self.ledger, owner, 0, pool, upstream, tokens, service_class=BATCH)

    def _fleet_rank(self) -> tuple[int, int]:
        """(live replicas, this replica's rank) as the fleet sync last saw them."""
        u = next(iter(self.fleet.upstreams.values()), None)
        return (u.replicas, u.rank) if u is not None else (1, 0)

    async def _wake(self) -> None:
        self.router.tick()

    async def start(self) -> None:
        encoding()  # load the tokenizer before the first request
        await self.client.start()
        await self.sync.start()
        await self.scraper.start()
        await self.keys.start()
        await self.ledger.start()
        if self.checker is not None:
            await self.checker.start()
        self.waker.start()
        await self.batch.start()

    async def stop(self) -> None:
        """Stop every component in order. Each gets STOP_TIMEOUT seconds: one that does not stop is logged by name
        and left behind, so a stuck component cannot hold the process (or the next components) forever."""
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("batch", lambda: self.batch.stop(0.0)),  # idempotent: the HTTP layer stops it first, with a grace
            ("router-wake", self.waker.stop),
            ("health-checks", self.checker.stop if self.checker is not None else _nothing),
            ("spend-ledger", self.ledger.stop),
            ("key-store", self.keys.stop),
            ("engine-metrics", self.scraper.stop),
            ("response-store", self.responses.drain),
            ("fleet-sync", self.sync.stop),
            ("upstream-client", self.client.stop),
            ("telemetry", self.telemetry.shutdown),
        ]
        for name, step in steps:
            try:
                await asyncio.wait_for(step(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("shutdown: %s did not stop within %.0f s; going on without it", name, STOP_TIMEOUT)


async def _nothing() -> None:
    return None


def _register_secrets(settings: Settings, cfg: FleetConfig) -> None:
    redact.install()
    if settings.admin_key is not None:
        redact.add_secret(settings.admin_key.get_secret_value())
    for up in cfg.upstreams.values():
        redact.add_secret(up.api_key())


def _startup_warnings(cfg: FleetConfig, settings: Settings) -> list[str]:
    """Logged once at start-up; the fleet ones are also shown on /healthz (a missing key looks like an outage)."""
    warnings = missing_key_warnings(cfg)
    for w in warnings:
        log.warning("%s", w)
    if settings.require_api_key and settings.admin_key is None:
        log.warning("GATEWAY_REQUIRE_API_KEY is set but GATEWAY_ADMIN_KEY is not: no API key can be created")
    return warnings
