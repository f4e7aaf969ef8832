"""Fleet configuration: upstreams (one endpoint each) and models (client-facing names -> pool of upstreams)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ProviderKind = Literal["openai", "azure", "anthropic"]
UpstreamKind = Literal["gpu", "hosted"]
STRATEGIES = ("throughput", "weighted", "round_robin", "least_busy", "lowest_latency", "cost")


class CapacityHint(BaseModel):
    """Seed for the capacity curve t(n) = a + b*n seconds per output token of one sequence."""

    model_config = ConfigDict(extra="forbid")
    a: float = Field(0.02, gt=0)
    b: float = Field(0.0, ge=0)
    ttft: float = Field(0.2, ge=0, description="seconds to first token at low load")


class Prices(BaseModel):
    """What an upstream costs (USD). Hosted APIs: per 1M tokens (input, cached input, output; batch prices where
    the provider discounts batch work). GPU servers: per hour (or per GPU-hour x gpus); their cost per token is
    derived live from the measured throughput (gateway/cost.py). A GPU server may also carry per-token prices:
    those are then what keys are charged (an internal chargeback rate) instead of the live figure."""

    model_config = ConfigDict(extra="forbid")
    input_per_1m: float | None = Field(None, ge=0)
    cached_input_per_1m: float | None = Field(None, ge=0, description="defaults to input_per_1m")
    output_per_1m: float | None = Field(None, ge=0)
    batch_input_per_1m: float | None = Field(None, ge=0, description="batch-class price; defaults to input_per_1m")
    batch_output_per_1m: float | None = Field(None, ge=0, description="batch-class price; defaults to output_per_1m")
    per_hour: float | None = Field(None, ge=0, description="whole server per hour")
    gpu_per_hour: float | None = Field(None, ge=0, description="per GPU-hour; times `gpus`")
    gpus: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_hourly(self) -> Prices:
        if self.per_hour is not None and self.gpu_per_hour is not None:
            raise ValueError("give either 'per_hour' or 'gpu_per_hour' (x gpus), not both")
        return self

    @property
    def hourly(self) -> float | None:
        """The server's price per hour, if it is priced by the hour."""
        if self.per_hour is not None:
            return self.per_hour
        return self.gpu_per_hour * self.gpus if self.gpu_per_hour is not None else None

    @property
    def per_token(self) -> bool:
        return self.input_per_1m is not None or self.output_per_1m is not None


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
    api_version: str | None = None  # azure
    deployment: str | None = None  # azure
    metrics_url: str | None = None  # vLLM/SGLang Prometheus endpoint
    capacity: CapacityHint = Field(default_factory=CapacityHint)
    timeout: float | None = Field(None, gt=0, description="overrides the total timeout")
    price: Prices | None = None

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


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstreams: list[str] = Field(min_length=1)
    strategy: str | None = None
    aliases: list[str] = Field(default_factory=list)
    #: `cost`: among upstreams with a free slot, the cheapest $/token (ties by throughput gain).
    prefer: Literal["throughput", "cost"] | None = None

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
        if up.price is None:
            out.append(f"upstream {name!r}: no price (cost figures and key spend count it as free)")
        if up.kind == "hosted" and not (up.rpm or up.tpm):
            out.append(f"upstream {name!r}: hosted upstream without rpm/tpm limits")
    used = {u for m in fleet.models.values() for u in m.upstreams}
    for name in fleet.upstreams:
        if name not in used:
            out.append(f"upstream {name!r} is not in any model's pool")
    return out
