"""Conversation state of the Responses API, for `previous_response_id`.

A stored response is the chat messages of its conversation (without instructions, which OpenAI does not carry over)
plus its own output, as JSON under `<prefix>:resp:<id>` with a TTL, so any replica can continue it. The request
path pays at most one GET (only for requests that name a previous response, bounded by `timeout`); writes run in
background tasks after the response went out. Without Redis (single replica) a bounded in-process map stands in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.dialects.responses import ResponseMeta, assistant_message
from gateway.errors import GatewayError

log = logging.getLogger("gateway.responses")

LOCAL_MAX = 10_000  # responses kept in process when there is no Redis


def not_found(response_id: str) -> GatewayError:
    return GatewayError(
        400, f"Previous response with id '{response_id}' not found (it expired, was stored with store=false, or never existed).",
        code="previous_response_not_found", param="previous_response_id",
    )


class ResponseStore:
    def __init__(self, redis: aioredis.Redis | None, prefix: str, ttl: float, timeout: float = 1.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self.timeout = timeout
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}:resp:{response_id}"

    async def history(self, response_id: str) -> list[dict] | None:
        """The conversation up to and including `response_id`, or None when the gateway does not know it."""
        if not isinstance(response_id, str) or not response_id or len(response_id) > 128:
            raise GatewayError(400, "'previous_response_id' must be a response id", code="invalid_value", param="previous_response_id")
        raw = await self._get(response_id)
        if raw is None:
            return None
        messages = json.loads(raw)
        assert isinstance(messages, list)
        return messages

    async def _get(self, response_id: str) -> bytes | None:
        if self.redis is None:
            hit = self._local.get(response_id)
            return hit[1] if hit and hit[0] > time.monotonic() else None
        try:
            async with asyncio.timeout(self.timeout):
                value = await self.redis.get(self._key(response_id))
                return value.encode() if isinstance(value, str) else value
        except (RedisError, OSError, TimeoutError):
            raise GatewayError(
                503, "previous_response_id cannot be resolved right now (the conversation store is unavailable); retry",
                code="store_unavailable", param="previous_response_id", retry_after=1,
            ) from None

    def save(self, meta: ResponseMeta) -> None:
        """Keep a completed response for later turns, off the request path (fire and forget, failures logged)."""
        if meta.final is None or not meta.store:
            return
        data = json.dumps([*meta.turn, assistant_message(meta.final)], separators=(",", ":")).encode()
        if self.redis is None:
            self._local[meta.id] = (time.monotonic() + self.ttl, data)
            while len(self._local) > LOCAL_MAX:
                self._local.popitem(last=False)
            return
        task = asyncio.get_running_loop().create_task(self._put(meta.id, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, response_id: str, data: bytes) -> None:
        assert self.redis is not None
        try:
            await self.redis.set(self._key(response_id), data, ex=max(1, int(self.ttl)))
        except (RedisError, OSError) as e:
            log.warning("could not store response %s for previous_response_id: %s", response_id, type(e).__name__)

    async def drain(self) -> None:
        """Wait for pending writes (shutdown, tests)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
