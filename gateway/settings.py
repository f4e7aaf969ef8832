"""Process settings (env prefix GATEWAY_); the fleet itself lives in the YAML config."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_FLEET = Path(__file__).with_name("default_fleet.yaml")


def _replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=None, extra="ignore")

    host: str = "0.0.0.0"
    port: int = 8080
    config: Path = DEFAULT_FLEET
    #: redis://host:port/db; empty means an in-process store (single replica).
    redis_url: str = ""
    redis_prefix: str = "gw"
    replica_id: str = Field(default_factory=_replica_id)

    #: Admin API key; admin endpoints are disabled when unset.
    admin_key: SecretStr | None = None
    #: Require a gateway API key (created via the admin API) on /v1/* requests.
    require_api_key: bool = False
    #: How often each replica reloads the gateway API keys from Redis (only when they changed).
    api_key_refresh_interval: float = 1.0
    #: How often each replica flushes its spend to Redis and reads the keys' fleet-wide totals (budgets).
    spend_sync_interval: float = 0.25

    default_strategy: str = "throughput"
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    #: A client must finish sending its request body within this many seconds (slow uploads get a 408).
    body_read_timeout: float = 30.0

    connect_timeout: float = 5.0
    ttft_timeout: float = 60.0
    idle_timeout: float = 60.0
    total_timeout: float = 600.0

    queue_max: int = 1024
    queue_timeout: float = 30.0
    max_attempts: int = 3
    #: Retries may add at most this fraction of recent requests (retry budget).
    retry_budget_ratio: float = 0.2
    retry_budget_min: int = 10

    eject_after_failures: int = 5
    eject_base_seconds: float = 5.0
    eject_max_seconds: float = 120.0
    #: Active health checks: GET each upstream's metrics_url (or base_url + /models) this often; 0 = off.
    health_check_interval: float = 0.0
    health_check_timeout: float = 2.0

    flush_interval: float = 0.15
    shutdown_grace: float = 30.0
    capture_content: bool = False
    log_level: str = "INFO"

    @field_validator("default_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from gateway.config import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose one of {', '.join(STRATEGIES)}")
        return v
