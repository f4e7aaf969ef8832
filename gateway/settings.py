"""Process settings (env prefix GATEWAY_); the fleet itself lives in the YAML config."""

from __future__ import annotations

import difflib
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.upstream.headers import DEFAULT_FORWARD, check_forward_list

DEFAULT_FLEET = Path(__file__).with_name("default_fleet.yaml")
ENV_PREFIX = "GATEWAY_"
#: GATEWAY_* variables read by the command-line tools, not by the server (`gateway top`, `gateway bench`).
TOOL_ENV_VARS = frozenset({
    "GATEWAY_URL", "GATEWAY_BENCH_REDIS_URL", "GATEWAY_BENCH_SCALING_QUALITY", "GATEWAY_BENCH_SCALING_REPLICAS",
    "GATEWAY_BENCH_SCALING_UPSTREAMS", "GATEWAY_BENCH_MIXED_VARIANTS",
    "GATEWAY_BENCH_AFFINITY_SETTINGS", "GATEWAY_BENCH_AFFINITY_VARIANTS",
})


def _replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, extra="ignore")

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
    #: Pools with more upstreams than this score a constant-size sample per pick (routing/candidates.py);
    #: a very large value keeps exact scoring everywhere (the bench compares both).
    routing_sample_above: int = 16
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    #: A client must finish sending its request body within this many seconds (slow uploads get a 408).
    body_read_timeout: float = 30.0

    # Timeout budget (README "Timeouts"): SDKs give up after 600 s (OpenAI, Anthropic defaults), so a failed
    # attempt must leave room for a retry inside that: queue_timeout + 2 x total_timeout = 570 s < 600 s.
    # Streams are bounded mostly by ttft_timeout (a stuck upstream is abandoned, and retried, within 30 s).
    connect_timeout: float = 5.0
    ttft_timeout: float = 30.0
    idle_timeout: float = 30.0
    #: Per attempt, non-streamed (the body only arrives when generation is done, so nothing earlier can be timed).
    total_timeout: float = 270.0
    #: Per attempt, streamed: the TTFT and idle timeouts catch stuck streams; this only caps very long generations.
    stream_total_timeout: float = 600.0
    #: Largest non-streamed upstream body, and largest single SSE event, the gateway accepts (bytes; clean 502 past it).
    max_response_bytes: int = 32 * 1024 * 1024
    max_event_bytes: int = 4 * 1024 * 1024

    queue_max: int = 1024
    queue_timeout: float = 30.0
    max_attempts: int = 3
    #: Retries may add at most this fraction of recent requests (retry budget).
    retry_budget_ratio: float = 0.2
    retry_budget_min: int = 10

    #: Outlier ejection (reliability/outlier.py): this many consecutive failures (failures of requests that were
    #: in flight together count once) eject an upstream for base * 2^(ejections in a row - 1) s, capped at max.
    eject_after_failures: int = 5
    eject_base_seconds: float = 5.0
    eject_max_seconds: float = 60.0
    #: Never eject more than this share of a pool at once (at least one upstream may always be ejected).
    eject_max_percent: float = 50.0
    #: Success-rate ejection: an upstream succeeding less than this fraction of its pool's rate is ejected ...
    eject_success_rate_ratio: float = 0.6
    #: ... once it and its peers have this many recent attempts (decaying window of eject_window_seconds).
    eject_min_requests: int = 20
    eject_window_seconds: float = 10.0
    #: Active probing of ejected upstreams (GET metrics_url or base_url + /models): one that was unreachable and
    #: answers again is tried at once instead of after its backoff. 0 = off.
    eject_probe_interval: float = 1.0
    #: Active health checks of every upstream this often (a failing check ejects without traffic); 0 = off.
    health_check_interval: float = 0.0
    health_check_timeout: float = 2.0

    #: How long a Responses API response stays available to `previous_response_id` (seconds, in Redis).
    responses_ttl: float = Field(24 * 3600.0, gt=0)

    flush_interval: float = 0.15

    #: Batch API (needs redis_url). Lines run concurrently by this replica's batch worker; 0 = this replica runs none.
    batch_workers: int = Field(8, ge=0)
    batch_max_file_bytes: int = Field(200 * 1024 * 1024, gt=0)
    batch_max_lines: int = Field(50_000, gt=0)
    #: A line claimed by a replica that has not touched it for this long is taken over by another replica.
    batch_claim_idle: float = Field(60.0, gt=0)
    #: Attempts per line on 429/5xx/transport errors, backoff from batch_retry_base doubling up to 30 s.
    batch_max_attempts: int = Field(5, ge=1)
    batch_retry_base: float = Field(0.5, ge=0)
    #: Seconds files, and batches after they end, are kept (OpenAI keeps batch files 30 days).
    batch_retention: int = Field(30 * 24 * 3600, gt=0)
    batch_sweep_interval: float = Field(5.0, gt=0)
    #: Where file contents (uploads, output and error files) live: empty = in Redis; a directory shared by every
    #: replica (NFS, a shared volume) for installs whose batches outgrow Redis memory. README "Batch API".
    batch_files_dir: str = ""
    #: How often each replica removes directory contents whose metadata expired (retention) or was lost.
    batch_files_sweep_interval: float = Field(300.0, gt=0)
    #: A line handed to a worker this many times without an answer (each replica running it died or stopped)
    #: is not run again: it goes to the error file, so a line that crashes replicas cannot loop forever.
    batch_max_deliveries: int = Field(5, ge=1)
    shutdown_grace: float = 30.0
    capture_content: bool = False
    #: Client request headers forwarded to upstreams (an allow-list; credentials and hop-by-hop headers never are).
    forward_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_FORWARD))
    log_level: str = "INFO"

    @field_validator("forward_headers")
    @classmethod
    def _forward(cls, v: list[str]) -> list[str]:
        return check_forward_list(v)

    @field_validator("default_strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from gateway.config import check_strategy

        return check_strategy(v)

    @model_validator(mode="after")
    def _no_unknown_env(self) -> Settings:
        problems = unknown_env_vars(os.environ)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def known_env_vars() -> list[str]:
    return sorted([ENV_PREFIX + name.upper() for name in Settings.model_fields] + list(TOOL_ENV_VARS))


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """One message per GATEWAY_* variable no setting reads, with the closest known name: a misspelt variable
    (GATEWAY_REDIS_ULR) must stop the start, not be ignored while the gateway runs on defaults."""
    known = known_env_vars()
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
        out.append(f"unknown environment variable {name}{hint}")
    return out
