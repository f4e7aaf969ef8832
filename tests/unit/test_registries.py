"""Single registries (strategies, providers), telemetry naming helpers and the GATEWAY_* variable check: pure."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import ModelConfig, UpstreamConfig
from gateway.observability import telemetry as T
from gateway.routing import router
from gateway.routing.router import Decision
from gateway.settings import Settings, unknown_env_vars
from gateway.upstream import PROVIDERS, Provider, provider_for, telemetry_provider_name

README = Path(__file__).resolve().parents[2] / "README.md"


def test_a_strategy_added_to_the_router_registry_is_valid_everywhere(monkeypatch):
    with pytest.raises(ValidationError, match="unknown strategy 'newest'"):
        ModelConfig(upstreams=["a"], strategy="newest")
    monkeypatch.setitem(router.STRATEGIES, "newest", lambda pool, cands, est: Decision(cands[0], "newest", "first"))
    assert ModelConfig(upstreams=["a"], strategy="newest").strategy == "newest"
    assert Settings(default_strategy="newest").default_strategy == "newest"
    with pytest.raises(ValidationError) as e:
        Settings(default_strategy="fastest")
    assert "newest" in str(e.value)  # the error lists the registry's names


def test_readme_documents_every_strategy():
    text = README.read_text()
    for name in router.STRATEGIES:
        assert f"`{name}`" in text, name


class _NativeLike(Provider):
    kind = "nativelike"
    telemetry_name = "gcp.gemini"

    def health_url(self, up: UpstreamConfig) -> str:
        return up.base_url + "/v1beta/models"


def test_a_provider_added_to_the_registry_is_valid_everywhere(monkeypatch):
    with pytest.raises(ValidationError, match="unknown provider 'nativelike'"):
        UpstreamConfig(provider="nativelike", base_url="http://x")
    monkeypatch.setitem(PROVIDERS, "nativelike", _NativeLike())
    up = UpstreamConfig(provider="nativelike", base_url="http://x")
    assert provider_for(up.provider).health_url(up) == "http://x/v1beta/models"
    assert telemetry_provider_name(up) == "gcp.gemini"
    assert T.provider_name("nativelike") == "gcp.gemini"


def test_provider_names_and_health_paths_come_from_the_classes():
    assert {k: p.telemetry_name for k, p in PROVIDERS.items()} == {
        "openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic",
    }
    assert T.provider_name("azure_openai") == "azure.ai.openai"  # an alias of the azure class
    oai = UpstreamConfig(base_url="http://gpu:8000/v1")
    assert provider_for("openai").health_url(oai) == "http://gpu:8000/v1/models"
    ant = UpstreamConfig(provider="anthropic", base_url="https://api.anthropic.com")
    assert provider_for("anthropic").health_url(ant) == "https://api.anthropic.com/v1/models"
    az = UpstreamConfig(provider="azure", base_url="https://r.openai.azure.com", deployment="d", api_version="2024-06-01")
    assert provider_for("azure").health_url(az) == "https://r.openai.azure.com/openai/models?api-version=2024-06-01"


def test_engine_names_the_provider_in_telemetry():
    assert telemetry_provider_name(UpstreamConfig(base_url="http://gpu/v1")) == "openai"
    for engine in ("vllm", "sglang", "tgi", "llama.cpp", "ollama"):
        assert telemetry_provider_name(UpstreamConfig(base_url="http://gpu/v1", engine=engine)) == engine
    with pytest.raises(ValidationError):
        UpstreamConfig(base_url="http://gpu/v1", engine="vLLM server")


def test_status_code_of_error_types():
    assert T.status_code(None) == 200
    assert T.status_code("429") == 429
    assert T.status_code("upstream_503") == 503
    assert T.status_code("rate_limited") == 429
    assert T.status_code("upstream_timeout") == 504
    assert T.status_code("upstream_connect_error") == 502
    assert T.status_code("client_disconnected") == 499


def test_span_attribute_helpers_follow_the_convention():
    body = {"temperature": 0.2, "top_p": 1, "seed": 7, "stop": "END", "max_tokens": 64, "stream": True, "n": 2}
    a = T.client_span_attributes(operation="chat", provider="vllm", request_model="m", base_url="https://h.example/v1", body=body)
    assert a == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm", "gen_ai.request.model": "m",
        "server.address": "h.example", "server.port": 443,
        "gen_ai.request.temperature": 0.2, "gen_ai.request.top_p": 1.0, "gen_ai.request.seed": 7,
        "gen_ai.request.stop_sequences": ["END"], "gen_ai.request.max_tokens": 64, "gen_ai.request.stream": True,
        "gen_ai.request.choice.count": 2,
    }
    assert T.server_address_port("http://10.0.0.5:8000/v1") == ("10.0.0.5", 8000)
    r = T.response_attributes(response_model="m-up", response_id=None, finish_reasons=["stop"],
                              input_tokens=3, output_tokens=5, ttfc_s=0.25)
    assert r == {"gen_ai.response.model": "m-up", "gen_ai.response.finish_reasons": ["stop"],
                 "gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 5,
                 "gen_ai.response.time_to_first_chunk": 0.25}
    assert not hasattr(T, "ATTR_TTFT_MS")


def test_unknown_gateway_variables_get_a_did_you_mean():
    assert unknown_env_vars({"GATEWAY_PORT": "1", "GATEWAY_URL": "x", "HOME": "/"}) == []
    [msg] = unknown_env_vars({"GATEWAY_REDIS_ULR": "redis://x"})
    assert msg == "unknown environment variable GATEWAY_REDIS_ULR; did you mean GATEWAY_REDIS_URL?"
    [msg] = unknown_env_vars({"GATEWAY_ZZZZZZZZZZZZZZZZ": "1"})
    assert "GATEWAY_ZZZZZZZZZZZZZZZZ" in msg and "GATEWAY_PORT" in msg  # no close match: the known list


def test_settings_refuse_an_unknown_gateway_variable(monkeypatch):
    monkeypatch.setenv("GATEWAY_QUEUE_TIMOUT", "5")
    with pytest.raises(ValidationError, match="did you mean GATEWAY_QUEUE_TIMEOUT"):
        Settings()
