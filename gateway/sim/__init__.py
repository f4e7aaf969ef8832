"""Upstream simulator: a GPU continuous-batching engine or a rate-limited hosted API behind
OpenAI / Azure / Anthropic wire formats, for tests, the demo and benchmarks."""

from gateway.sim.server import SimConfig, create_app, start_sim

__all__ = ["SimConfig", "create_app", "start_sim"]
