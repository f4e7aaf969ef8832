"""LLM throughput gateway: routes each request to the upstream where it adds the most output tok/s."""

__version__ = "0.1.0"
