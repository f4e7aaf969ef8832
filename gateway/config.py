"""Fleet configuration: upstreams (one endpoint each) and models (client-facing names -> pool of upstreams)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.upstream import provider_kinds

UpstreamKind = Literal["gpu", "hosted"]
#: What a pool (`prefer` on a model) or one of its service classes (`prefer` on a class) optimises when choosing among
#: the upstreams that may take a request: aggregate tok/s, or USD per token (the router's `cost` strategy).
Preference = Literal["throughput", "cost"]


def _known_provider(v: str) -> str:
    kinds = provider_kinds()
    if v not in kinds:
        raise ValueError(f"unknown provider {v!r}; choose one of {', '.join(kinds)}")
    return v


#: A key of the provider registry (gateway.upstream.PROVIDERS): the registry is the only list of kinds.
ProviderKind = Annotated[str, AfterValidator(_known_provider)]


def strategy_names() -> tuple[str, ...]:
    """The routing strategies, from the router's registry (imported late: the router imports this module)."""
    from gateway.routing.router import STRATEGIES

    return tuple(STRATEGIES)


def check_strategy(v: str) -> str:
    """Validator shared by the fleet YAML (per model) and settings (GATEWAY_DEFAULT_STRATEGY)."""
    names = strategy_names()
    if v not in names:
        raise ValueError(f"unknown strategy {v!r}; choose one of {', '.join(names)}")
    return v


_ENGINE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


class CapacityHint(BaseModel):
    """Seed for the capacity curve t(n) = a + b*n seconds per output token of one sequence."""

    model_config = ConfigDict(extra="forbid")
    a: float = Field(0.02, gt=0)
    b: float = Field(0.0, ge=0)
    ttft: float = Field(0.2, ge=0, description="seconds to first token at low load")
    prefill: float = Field(0.0, ge=0, description="extra seconds to first token per prompt token to prefill")
    prompt_tokens: int = Field(0, ge=0, description="prompt size of the requests a and b were measured with (t(n) "
                               "includes the stalls of their prefills; 0: a and b exclude prefill)")


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
    #: Bring your own key: a key the client sends (x-upstream-api-key, or its bearer when the gateway takes no
    #: API keys of its own) replaces api_key_env for its requests. Off by default.
    byok: bool = False
    #: The upstream serves OpenAI's Responses API (/responses): Responses requests are passed to it untouched
    #: (its ids and previous_response_id state), not translated. OpenAI upstreams only.
    responses_api: bool = False
    engine: str | None = Field(
        None,
        description="serving engine behind an OpenAI-compatible API (vllm, sglang, tgi, llama.cpp, ollama ...): "
        "reported as gen_ai.provider.name instead of the provider's own name",
    )

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str | None) -> str | None:
        if v is not None and not _ENGINE.match(v):
            raise ValueError("must be a lower-case name such as vllm, sglang, tgi, llama.cpp, ollama")
        return v
    #: KV-cache affinity (routing/affinity.py): prompt tokens the engine's prefix cache holds (None: the engine's
    #: reported KV size, else a default) and the prompt size from which a hosted provider caches prompts.
    prefix_cache_tokens: int | None = Field(None, ge=16)
    prompt_cache_min_tokens: int | None = Field(None, ge=0)
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
        if self.responses_api and self.provider != "openai":
            raise ValueError("responses_api is for openai upstreams only")
        return self

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @property
    def rate_limited(self) -> bool:
        """Has a request or token rate limit: takes requests at its budget's pace, not in proportion to slots."""
        return bool(self.rpm or self.tpm)


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
    #: How this class chooses among the upstreams that meet its admission: `cost` = the cheapest USD per token
    #: (batch work flows to the cheapest tokens), `throughput` = the largest marginal tok/s gain; None = the
    #: pool's strategy. Admission (the class's targets, the guards that protect interactive room) is unchanged.
    prefer: Preference | None = None
    #: How many times a request of this class may be preempted on a GPU upstream for a class with targets and a
    #: better priority, and resumed as a continuation (gateway/routing/preempt.py); 0: never preempted.
    max_preemptions: int = Field(0, ge=0)


class NativeBatch(BaseModel):
    """Forward this pool's Batch API jobs to a hosted provider's own Batch API instead of running them on the fleet.

    Why: a provider's batch price is about half its per-request price, in exchange for a completion window of up
    to 24 h; the local batch engine instead runs lines on the fleet's spare capacity (free on owned GPUs, but it
    only moves as fast as interactive traffic leaves room). Hosted OpenAI-protocol upstreams only."""

    model_config = ConfigDict(extra="forbid")
    #: The upstream (provider openai, kind hosted) whose /files and /batches receive the job.
    upstream: str
    #: First status poll this many seconds after submitting; each idle poll waits 1.5x longer, up to poll_max_s.
    poll_s: float = Field(30.0, gt=0)
    poll_max_s: float = Field(300.0, gt=0)


def default_classes() -> dict[str, ServiceClass]:
    return {
        "interactive": ServiceClass(min_tok_s=20.0, max_ttft_s=2.0, priority=0, wait_s=1.0),
        "batch": ServiceClass(priority=10, min_share=0.1, wait_s=0.0, aging_s=10.0, max_wait_s=300.0, max_preemptions=2),
    }


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstreams: list[str] = Field(min_length=1)
    strategy: str | None = None
    aliases: list[str] = Field(default_factory=list)
    #: Service classes of this pool: `interactive` and `batch` always exist (their targets may be overridden).
    classes: dict[str, ServiceClass] = Field(default_factory=default_classes)
    default_class: str = "interactive"
    #: A request parameter the serving upstream cannot honour is dropped (and listed in the response header
    #: x-gateway-dropped-params) instead of answered with a 400 naming it (gateway/upstream/policy.py).
    drop_unsupported_params: bool = False
    #: KV-cache affinity in the throughput strategy's score (routing/affinity.py); false: prefix-blind.
    affinity: bool = True

    #: `cost`: among upstreams with a free slot, the cheapest $/token (ties by throughput gain).
    prefer: Preference | None = None
    #: Batch API jobs of this pool go to a hosted provider's native Batch API (None: run locally on the fleet).
    native_batch: NativeBatch | None = None

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
        return None if v is None else check_strategy(v)


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstreams: dict[str, UpstreamConfig]
    models: dict[str, ModelConfig]

    @model_validator(mode="after")
    def _links(self) -> FleetConfig:
        for name, up in self.upstreams.items():
            up.name = name
        problems = link_problems(self.upstreams, {k: m.model_dump() for k, m in self.models.items()})
        for mname, m in self.models.items():
            nb = m.native_batch
            nu = self.upstreams.get(nb.upstream) if nb is not None else None
            if nu is not None and (nu.provider != "openai" or nu.kind != "hosted"):
                problems.append(f"model {mname!r}: native_batch upstream {nu.name!r} must be a hosted openai upstream")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolve(self, model: str) -> tuple[str, ModelConfig] | None:
        m = self.models.get(model)
        if m is not None:
            return model, m
        for name, cfg in self.models.items():
            if model in cfg.aliases:
                return name, cfg
        return None


def link_problems(upstreams: Iterable[str], models: Mapping[str, Any]) -> list[str]:
    """Cross-references between models and upstreams, checked on the raw YAML too so that they are reported
    beside field errors (pydantic skips the model validator once a field is invalid)."""
    known = set(upstreams)
    out: list[str] = []
    owner: dict[str, str] = {}
    for mname, m in models.items():
        m = m if isinstance(m, Mapping) else {}
        ups = m.get("upstreams")
        for u in ups if isinstance(ups, list) else ():
            if isinstance(u, str) and u not in known:
                out.append(f"model {mname!r} names unknown upstream {u!r}")
        nb = m.get("native_batch")
        nu = nb.get("upstream") if isinstance(nb, Mapping) else None
        if isinstance(nu, str) and nu not in known:
            out.append(f"model {mname!r}: native_batch names unknown upstream {nu!r}")
        aliases = m.get("aliases")
        for a in aliases if isinstance(aliases, list) else ():
            if not isinstance(a, str):
                continue
            if a in models and a != mname:
                out.append(f"model {mname!r}: alias {a!r} is the name of another model")
            elif a in owner and owner[a] != mname:
                out.append(f"model {mname!r}: alias {a!r} is also an alias of model {owner[a]!r}")
            owner.setdefault(a, mname)
    return out


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
        raise ConfigError(_report(p, e, raw)) from None


def _report(p: Path, e: ValidationError, raw: dict) -> str:
    """Every problem in one message: field errors, then the cross-reference ones pydantic did not get to."""
    problems: list[str] = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top)"
        msg = err["msg"].removeprefix("Value error, ")
        if loc == "(top)":
            problems.extend(f"  (top): {m}" for m in msg.split("; "))
        else:
            problems.append(f"  {loc}: {msg}")
    ups, models = raw.get("upstreams"), raw.get("models")
    if isinstance(ups, dict) and isinstance(models, dict):
        problems += [f"  (top): {m}" for m in link_problems(ups, models) if f"  (top): {m}" not in problems]
    return "\n".join([f"{p}: {len(problems)} problem(s)", *problems])


def missing_key_warnings(fleet: FleetConfig) -> list[str]:
    """Upstreams whose key variable is unset or empty: every request to them would be a 401 from the upstream,
    then an ejection that looks like an outage. Logged at start-up, shown on /healthz and by check-config."""
    return [
        f"upstream {name!r}: env var {up.api_key_env} is empty or not set; its requests will fail authentication"
        for name, up in fleet.upstreams.items()
        if up.api_key_env and not os.environ.get(up.api_key_env, "").strip()
    ]


def check_warnings(fleet: FleetConfig) -> list[str]:
    """Non-fatal findings for `gateway check-config`."""
    out = missing_key_warnings(fleet)
    for name, up in fleet.upstreams.items():
        if up.price is None:
            out.append(f"upstream {name!r}: no price (cost figures and key spend count it as free)")
        if up.kind == "hosted" and not (up.rpm or up.tpm):
            out.append(f"upstream {name!r}: hosted upstream without rpm/tpm limits")
    used = {u for m in fleet.models.values() for u in m.upstreams}
    used |= {m.native_batch.upstream for m in fleet.models.values() if m.native_batch is not None}
    for name in fleet.upstreams:
        if name not in used:
            out.append(f"upstream {name!r} is not in any model's pool")
    return out
