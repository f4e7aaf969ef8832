"""The request context: one client request, parsed once, carried along the whole path.

The HTTP layer (or an in-process caller such as the batch runner) builds it; the router and its strategies read it
(prompt estimate, service class, cache/session key), hooks read and annotate it, and when the request ends it holds
the result (which upstream served it, the usage it reported, the status it ended with).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_OUTPUT_TOKENS = 256


@dataclass(slots=True)
class Estimate:
    """What a request is expected to cost, known before it is sent."""

    prompt_tokens: int
    output_tokens: int  # expected: max_tokens (or the default) until the pool's observed lengths refine it
    operation: str = "chat"
    max_tokens: int | None = None  # the client's own limit, when it gave one

    @property
    def admitted_tokens(self) -> int:
        """What reserving hosted APIs (OpenAI-style) charge against TPM at admission: prompt + max_tokens."""
        return self.prompt_tokens + (self.max_tokens if self.max_tokens is not None else self.output_tokens)

    @property
    def kv_tokens(self) -> int:
        """KV-cache tokens the request is expected to hold on a GPU engine at its end: prompt + expected output."""
        return self.prompt_tokens + self.output_tokens


@dataclass(slots=True)
class Usage:
    """Tokens the serving upstream reported (or the gateway counted) for the request."""

    input_tokens: int | None = None
    cached_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True, eq=False)
class RequestContext:
    operation: str  # chat | text_completion | embeddings
    model: str  # as the client named it
    body: dict  # canonical (OpenAI-dialect) body
    stream: bool
    include_usage: bool
    dialect: str  # the client's wire format: openai | anthropic
    est: Estimate
    headers: Mapping[str, str] = field(default_factory=dict)  # the client's request headers (traceparent ...)
    native: dict | None = None  # the client's own body when it is not in the canonical dialect
    principal: Any = None  # the gateway API key (auth.ApiKey) when keys are required
    path: str = ""  # the inbound path (for spans)
    #: The service class: as requested (header / service_tier; "" when not) until the proxy resolves it.
    service_class: str = ""
    class_source: str | None = None  # where the requested class came from (for the 400 naming it)
    cache_key: str | None = None  # session / prompt-cache key the client gave (stickiness)
    prefix: Any = None  # routing.affinity.PromptPrefix: the prompt's block hashes, computed when first needed
    predicted_cached: dict[str, int] | None = None  # upstream -> prompt tokens it probably caches (affinity)
    resume: Any = None  # upstream.resume.Resume once the request was preempted (its continuations read it)
    kv_shared: dict[str, int] | None = None  # upstream -> prompt tokens its running sequences already hold (affinity)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    #: Headers the response must carry (request id, upstream rate-limit headers, key limits ...).
    response_headers: dict[str, str] = field(default_factory=dict)
    # ---- filled in as the request runs ----
    upstream: str | None = None  # the upstream whose attempt produced the response
    usage: Usage = field(default_factory=Usage)
    used_tokens: int = 0  # prompt + output tokens really used (for the key's TPM settlement)
    status: int = 0  # final status (0 while running)
    #: Per-request scratch space for hooks (like aiohttp's trace_request_ctx): hook name -> its state.
    extras: dict[str, Any] = field(default_factory=dict)
    outcome: Any = None  # the measured Outcome of the attempt that produced the response
    slo: Any = None  # goodput.SloVerdict once the request ended
