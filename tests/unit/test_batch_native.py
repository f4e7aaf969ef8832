"""Native batch forwarding: the config rules and the choice of execution mode (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.batch.native import NativeTarget, target_for
from gateway.config import FleetConfig

HOSTED = {"provider": "openai", "kind": "hosted", "base_url": "http://h/v1", "model": "up-model"}
GPU = {"provider": "openai", "kind": "gpu", "base_url": "http://g/v1"}


def fleet(native: dict | None, **ups: dict) -> FleetConfig:
    model: dict = {"upstreams": ["gpu"]}
    if native is not None:
        model["native_batch"] = native
    return FleetConfig.model_validate({"upstreams": {"gpu": GPU, **ups}, "models": {"m": model}})


def test_native_batch_names_a_hosted_openai_upstream():
    cfg = fleet({"upstream": "prov"}, prov=HOSTED)
    nb = cfg.models["m"].native_batch
    assert nb is not None and nb.upstream == "prov" and nb.poll_s == 30.0  # the provider need not serve interactive
    with pytest.raises(ValidationError, match="native_batch names unknown upstream 'nope'"):
        fleet({"upstream": "nope"})
    with pytest.raises(ValidationError, match="must be a hosted openai upstream"):
        fleet({"upstream": "gpu"})
    with pytest.raises(ValidationError, match="must be a hosted openai upstream"):
        fleet({"upstream": "ant"}, ant={**HOSTED, "provider": "anthropic"})
    assert fleet(None).models["m"].native_batch is None


def test_mode_is_native_only_when_every_line_goes_to_one_native_pool():
    t = NativeTarget("m", "prov", "http://h/v1", "up-model", 1.0, 5.0, api_key="sk-secret")
    pools = {"m": t, "alias-of-m": t, "local": None}
    resolve = pools.get
    assert target_for(resolve, "/v1/chat/completions", {"m", "alias-of-m"}) is t
    assert target_for(resolve, "/v1/embeddings", {"m"}) is t
    assert target_for(resolve, "/v1/chat/completions", {"m", "local"}) is None  # mixed pools run locally
    assert target_for(resolve, "/v1/chat/completions", {"local"}) is None
    assert target_for(resolve, "/v1/messages", {"m"}) is None  # not a provider batch endpoint here
    assert target_for(resolve, "/v1/chat/completions", set()) is None  # nothing runnable
    assert "sk-secret" not in repr(t)
