"""Error responses of the inbound API: one handler per exception type, found along the exception's MRO (as
Starlette's exception handlers are), each answering in the client's dialect (OpenAI JSON, or Anthropic JSON on the
Anthropic paths)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from aiohttp import web

from gateway.errors import GatewayError

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request, BaseException, str], web.StreamResponse]


def error_response(err: GatewayError, dialect: str = "openai") -> web.Response:
    return web.Response(
        status=err.status, body=json.dumps(err.body_for(dialect)).encode(), content_type="application/json",
        headers=err.headers(),
    )


def is_anthropic_path(path: str) -> bool:
    """/v1/messages and everything under it speak Anthropic's wire format, errors included (404, 405 too)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def dialect_of(path: str) -> str:
    return "anthropic" if is_anthropic_path(path) else "openai"


def lookup(handlers: dict[type[BaseException], Handler], exc: BaseException) -> Handler | None:
    for cls in type(exc).__mro__:
        h = handlers.get(cls)
        if h is not None:
            return h
    return None
