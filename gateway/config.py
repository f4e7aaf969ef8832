"""Fleet configuration: upstreams (one endpoint each) and models (client-facing names -> pool of upstreams)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ProviderKind = Literal["openai", "azure", "anthropic"]
UpstreamKind = Literal["gpu", "hosted"]
STRATEGIES = ("throughput", "weighted", "round_robin", "least_busy", "lowest_latency")


class CapacityHint(BaseModel):
    """Seed for the capacity curve t(n) = a + b*n seconds per output token of one sequence."""

    model_config = ConfigDict(extra="forbid")
    a: float = Field(0.02, gt=0)
    b: float = Field(0.0, ge=0)
    ttft: float = Field(0.2, ge=0, description="seconds to first token at low load")


class UpstreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    provider: ProviderKind = "openai"
    kind: UpstreamKind = "gpu"
    base_url: str
    model: str | None = Field(None, description="model name the upstream expects; defaults to the client's")
    api_key_env: str | None = None
    weight: float = Field(1.0, ge=0)
    max_concurrency: int = Field(64, ge=1)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    tpm_counts: Literal["reserved", "usage"] = Field(
        "reserved",
        description="how the provider counts TPM: reserved = prompt + max_tokens at admission (OpenAI); "
        "usage = tokens really used (the gateway charges prompt + expected output and settles by usage)",
    )
    kv_tokens: int | None = Field(
        None, ge=1, description="GPU engine KV-cache capacity in tokens (default: learned from vllm:cache_config_info)"
    )
    api_version: str | None = None  # azure
    deployment: str | None = None  # azure
    metrics_url: str | None = None  # vLLM/SGLang Prometheus endpoint
    capacity: CapacityHint = Field(default_factory=CapacityHint)
    timeout: float | None = Field(None, gt=0, description="overrides the total timeout")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _azure(self) -> UpstreamConfig:
        if self.provider == "azure" and not (self.deployment and self.api_version):
            raise ValueError("azure upstreams need 'deployment' and 'api_version'")
        return self

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class ServiceClass(BaseModel):
    """Targets of one class of requests in a pool (see gateway/routing/classes.py for how they are enforced)."""

    model_config = ConfigDict(extra="forbid")
    #: Every running request of this class should decode at least this fast (output tok/s per request; 0: no floor).
    min_tok_s: float = Field(0.0, ge=0)
    #: Time to first token target in seconds (None: no target).
    max_ttft_s: float | None = Field(None, gt=0)
    #: Lower is served first from the gateway queue.
    priority: int = 0
    #: Share of the pool's capacity this class may always use, whatever other classes want (starvation guard).
    min_share: float = Field(0.0, ge=0, le=1)
    #: How long a request waits in the gateway for an upstream that meets the targets before going best-effort.
    wait_s: float = Field(1.0, ge=0)
    #: Waiting this long in the queue raises a request's priority by one step (aging: nothing waits forever).
    aging_s: float = Field(5.0, gt=0)
    #: How long a request of this class may wait in the gateway queue at most (None: GATEWAY_QUEUE_TIMEOUT).
    max_wait_s: float | None = Field(None, gt=0)


def default_classes() -> dict[str, ServiceClass]:
    return {
        "interactive": ServiceClass(min_tok_s=20.0, max_ttft_s=2.0, priority=0, wait_s=1.0),
        "batch": ServiceClass(priority=10, min_share=0.1, wait_s=0.0, aging_s=10.0, max_wait_s=300.0),
    }


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstreams: list[str] = Field(min_length=1)
    strategy: str | None = None
    aliases: list[str] = Field(default_factory=list)
    #: Service classes of this pool: `interactive` and `batch` always exist (their targets may be overridden).
    classes: dict[str, ServiceClass] = Field(default_factory=default_classes)
    default_class: str = "interactive"

    @model_validator(mode="after")
    def _classes(self) -> ModelConfig:
        merged = default_classes()
        merged.update(self.classes)
        self.classes = merged
        if self.default_class not in self.classes:
            raise ValueError(f"default_class {self.default_class!r} is not one of the pool's classes ({', '.join(self.classes)})")
        return self

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str | None) -> str | None:
        if v is not None and v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose one of {', '.join(STRATEGIES)}")
        return v


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstreams: dict[str, UpstreamConfig]
    models: dict[str, ModelConfig]

    @model_validator(mode="after")
    def _links(self) -> FleetConfig:
        for name, up in self.upstreams.items():
            up.name = name
        for mname, m in self.models.items():
            for u in m.upstreams:
                if u not in self.upstreams:
                    raise ValueError(f"model {mname!r} names unknown upstream {u!r}")
        return self

    def resolve(self, model: str) -> tuple[str, ModelConfig] | None:
        m = self.models.get(model)
        if m is not None:
            return model, m
        for name, cfg in self.models.items():
            if model in cfg.aliases:
                return name, cfg
        return None


class ConfigError(Exception):
    pass


def load_fleet(path: str | Path) -> FleetConfig:
    """Read and validate the YAML; ConfigError carries a readable message per problem."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping with 'upstreams' and 'models'")
    try:
        return FleetConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{p}: {e.error_count()} problem(s)"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def check_warnings(fleet: FleetConfig) -> list[str]:
    """Non-fatal findings for `gateway check-config`."""
    out = []
    for name, up in fleet.upstreams.items():
        if up.api_key_env and not os.environ.get(up.api_key_env):
            out.append(f"upstream {name!r}: env var {up.api_key_env} is not set")
        if up.kind == "hosted" and not (up.rpm or up.tpm):
            out.append(f"upstream {name!r}: hosted upstream without rpm/tpm limits")
    used = {u for m in fleet.models.values() for u in m.upstreams}
    for name in fleet.upstreams:
        if name not in used:
            out.append(f"upstream {name!r} is not in any model's pool")
    return out
