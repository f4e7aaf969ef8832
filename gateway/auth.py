"""Gateway API keys: hashed at rest, cached in memory on every replica, per-key RPM/TPM limits.

Storage. A key is `sk-gw-<43 random url-safe chars>`; only sha256(key) is stored: Redis hash `{prefix}:keys`
(names: sync/store.py Keys.keys / Keys.keys_ver)
(field = hex digest, value = JSON {id, name, prefix, rpm, tpm, created}) when Redis is configured, else this
process's memory. `{prefix}:keys:ver` is bumped on every change.

Hot path. No Redis: `lookup()` hashes the presented key and finds it in the in-memory copy; the stored digest is
then compared with `hmac.compare_digest`. (The dict lookup is keyed by a SHA-256 of a 256-bit secret, so its
timing reveals nothing useful about the key.) A background task polls `keys:ver` every `refresh` seconds and
reloads the hash when it changed, so a key created or deleted on one replica works / stops working on all of them
within about a second (immediately on the replica that made the change). While Redis is down the last copy keeps
serving. If Redis comes back empty (restarted without persistence), the replica writes its copy back so keys
are not lost; a key deleted in the second before such a crash could come back, and an operator must delete it
again.

Limits. RPM and TPM per key are enforced in memory with 1-second buckets over a sliding 60 s window (the window
and limit check of state/rate.py, which upstream limits use too). With N live replicas (taken from the fleet
view) each replica allows max(1, limit / N): the fleet-wide total stays within
the limit when the load balancer spreads a key's traffic evenly; a skewed balancer makes a key hit 429 before
its fleet-wide limit (never after, except for the rounding up to 1 per replica). TPM is charged prompt +
expected output tokens at admission (as hosted APIs do) and corrected with the real usage when the request ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from gateway.errors import GatewayError
from gateway.periodic import Periodic
from gateway.state.rate import WINDOW_S, Window, even_share, exceeded
from gateway.sync.store import Keys

log = logging.getLogger("gateway.auth")

KEY_PREFIX = "sk-gw-"
WINDOW = WINDOW_S
KEY_REQ, KEY_TOK = 0, 1  # the fields of a key's usage window
#: What is stored per key (Redis JSON) and shown by GET /admin/keys; the first three are identity.
STORED_FIELDS = (
    "id", "name", "prefix", "rpm", "tpm", "created", "budget_usd_day", "budget_usd_month", "models", "expires_at", "metadata",
    "service_class",
)
#: What POST /admin/keys accepts; anything else is a 400.
SETTABLE_FIELDS = (
    "name", "rpm", "tpm", "budget_usd_day", "budget_usd_month", "models", "expires_at", "metadata", "service_class",
)


def _micros(v: float | None) -> int | None:
    return None if v is None else round(v * 1_000_000)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def presented_key(headers) -> str | None:
    """The key a client sent: `Authorization: Bearer ...`, `x-api-key` (Anthropic SDK) or `api-key` (Azure)."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or headers.get("api-key") or None


@dataclass(slots=True)
class ApiKey:
    digest: str
    id: str
    name: str
    prefix: str
    rpm: int | None = None
    tpm: int | None = None
    created: float = 0.0
    # Budgets in USD per UTC day / month (gateway/spend.py), model allow-list, expiry (epoch s), free metadata.
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None
    models: list[str] | None = None
    expires_at: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: The service class of this key's requests when they name none (routing/classes.py; checked per pool).
    service_class: str | None = None
    #: This replica's usage: requests and tokens started per second (KEY_REQ, KEY_TOK).
    usage: Window = field(default_factory=lambda: Window(2))

    def to_json(self) -> str:
        return json.dumps({f: getattr(self, f) for f in STORED_FIELDS})

    @classmethod
    def from_json(cls, dig: str, raw: bytes | str) -> ApiKey:
        d = json.loads(raw)
        rec = cls(dig, d.get("id") or dig[:16], d.get("name", ""), d.get("prefix", ""))
        for f in STORED_FIELDS[3:]:
            if d.get(f) is not None:
                setattr(rec, f, d[f])
        return rec

    def public(self) -> dict:
        return {**{f: getattr(self, f) for f in STORED_FIELDS}, "prefix": self.prefix + "..."}

    def budgets_micros(self) -> tuple[int | None, int | None]:
        return _micros(self.budget_usd_day), _micros(self.budget_usd_month)

    def check_access(self, model: str, pool_model: str | None, now: float) -> None:
        """Expired keys get 401, models outside the allow-list 403 (checked before any budget or rate charge)."""
        if self.expires_at is not None and now >= self.expires_at:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires_at))
            raise GatewayError(401, f"API key '{self.name}' expired at {when}.", code="key_expired")
        if self.models is not None and model not in self.models and (pool_model is None or pool_model not in self.models):
            raise GatewayError(
                403, f"API key '{self.name}' may not use model '{model}' (allowed: {', '.join(self.models) or 'none'}).",
                code="model_not_allowed", param="model",
            )

    def rate_headers(self, replicas: int, now: float | None = None) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers: the limit, what is left of this replica's share, when it frees up."""
        if self.rpm is None and self.tpm is None:
            return {}
        now = time.time() if now is None else now
        req, tok = self._window(now)
        oldest = self.usage.oldest()
        reset = f"{max(1, math.ceil(oldest + WINDOW - now))}s" if oldest is not None else "0s"
        h = {}
        for kind, limit, used in (("requests", self.rpm, req), ("tokens", self.tpm, tok)):
            if limit is not None:
                h[f"x-ratelimit-limit-{kind}"] = str(limit)
                h[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(even_share(limit, replicas) - used)))
                h[f"x-ratelimit-reset-{kind}"] = reset
        return h

    # ---- limits (state/rate.py: the window and check upstream limits use too) -----------------------------
    def _window(self, now: float) -> tuple[int, int]:
        """(requests, tokens) started in the sliding window, older seconds dropped."""
        since = int(now) - WINDOW + 1
        self.usage.prune(since)
        return self.usage.sum(KEY_REQ, since), self.usage.sum(KEY_TOK, since)

    def _limit_headers(self, replicas: int, req: int, tok: int, reset: float, hit: str) -> dict[str, str]:
        """OpenAI-style x-ratelimit-* headers of this key's 429 (remaining: this replica's share, as enforced)."""
        out: dict[str, str] = {}
        for kind, limit, used in (("requests", self.rpm, req), ("tokens", self.tpm, tok)):
            if limit is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            left = 0 if kind == hit else max(0, int(even_share(limit, replicas) - used))
            out[f"x-ratelimit-remaining-{kind}"] = str(left)
            if kind == hit:
                out[f"x-ratelimit-reset-{kind}"] = f"{max(1, math.ceil(reset))}s"
        return out

    def admit(self, tokens: int, replicas: int, now: float | None = None) -> int:
        """Count one request costing `tokens`, or raise a 429 GatewayError with Retry-After.

        Returns the second it was booked in (settle() corrects that second's charge)."""
        now = time.time() if now is None else now
        if self.rpm is None and self.tpm is None:
            return int(now)
        req, tok = self._window(now)
        n = max(1, replicas)
        req_share = even_share(self.rpm, n) if self.rpm else 0.0
        tok_share = even_share(self.tpm, n) if self.tpm else 0.0
        hit = exceeded(self, req, req_share, tok, tok_share, tokens)
        if hit == "requests":
            ra = self.usage.frees_in(KEY_REQ, req, req_share - 1, now)
            raise GatewayError(
                429, f"Rate limit reached for API key '{self.name}': {self.rpm} requests per minute",
                code="rate_limit_exceeded", retry_after=ra, headers=self._limit_headers(n, req, tok, ra, "requests"),
            )
        if hit == "tokens":
            ra = self.usage.frees_in(KEY_TOK, tok, tok_share - tokens, now) if tokens <= tok_share else float(WINDOW)
            raise GatewayError(
                429, f"Rate limit reached for API key '{self.name}': {self.tpm} tokens per minute "
                f"(this request needs about {tokens})", code="rate_limit_exceeded", retry_after=ra,
                headers=self._limit_headers(n, req, tok, ra, "tokens"),
            )
        sec = int(now)
        self.usage.add(sec, KEY_REQ, 1)
        self.usage.add(sec, KEY_TOK, tokens)
        return sec

    def settle(self, delta_tokens: int, booked: int, now: float | None = None) -> None:
        """Correct the token charge once the real usage is known.

        A refund goes to the second the charge was booked in, and lapses with it (a refund booked later would
        outlive the charge and lend the key tokens it never had); extra usage counts now."""
        if self.tpm is None or not delta_tokens:
            return
        if delta_tokens > 0:
            self.usage.add(int(time.time() if now is None else now), KEY_TOK, delta_tokens)
        else:
            self.usage.refund(booked, KEY_TOK, -delta_tokens)


class KeyStore:
    """The replica's copy of the gateway API keys (see the module docstring)."""

    def __init__(self, redis, prefix: str, refresh: float = 1.0, replicas: Callable[[], int] = lambda: 1) -> None:
        self.redis = redis
        names = Keys(prefix)  # the key names live in sync/store.py with the rest of the Redis layout
        self.hash_key = names.keys
        self.ver_key = names.keys_ver
        self.replicas = replicas
        self.keys: dict[str, ApiKey] = {}
        self._ver: bytes | None = None
        self._failing = False
        self._loop = Periodic("key-refresh", refresh, self._refresh_logged)

    # ---- hot path ----------------------------------------------------------------------------------------
    def lookup(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        d = digest(presented)
        rec = self.keys.get(d)
        if rec is None or not hmac.compare_digest(rec.digest, d):
            return None
        return rec

    def admit(self, rec: ApiKey, tokens: int) -> int:
        return rec.admit(tokens, self.replicas())

    # ---- admin -------------------------------------------------------------------------------------------
    async def create(self, name: str, rpm: int | None = None, tpm: int | None = None, **extra) -> tuple[str, ApiKey]:
        """A new key; `extra` holds the other SETTABLE_FIELDS (validated by the admin API)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        d = digest(key)
        rec = ApiKey(d, d[:16], name, key[: len(KEY_PREFIX) + 4], rpm, tpm, round(time.time(), 3))
        for f, v in extra.items():
            setattr(rec, f, v)
        if self.redis is not None:
            try:
                p = self.redis.pipeline(transaction=True)
                p.hset(self.hash_key, d, rec.to_json())
                p.incr(self.ver_key)
                await p.execute()
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                raise GatewayError(503, f"key store unavailable ({type(e).__name__}); try again", code="store_unavailable") from None
        self.keys[d] = rec
        return key, rec

    async def delete(self, key_id: str) -> bool:
        found = [d for d, r in self.keys.items() if r.id == key_id]  # ids are not secret
        if self.redis is not None:
            try:
                if not found:  # maybe created elsewhere a moment ago
                    await self.refresh(force=True)
                    found = [d for d, r in self.keys.items() if r.id == key_id]  # ids are not secret
                if found:
                    p = self.redis.pipeline(transaction=True)
                    p.hdel(self.hash_key, *found)
                    p.incr(self.ver_key)
                    await p.execute()
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                raise GatewayError(503, f"key store unavailable ({type(e).__name__}); try again", code="store_unavailable") from None
        for d in found:
            self.keys.pop(d, None)
        return bool(found)

    def list(self) -> list[dict]:
        return sorted((r.public() for r in self.keys.values()), key=lambda x: x["created"])

    # ---- background --------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.redis is None:
            return
        try:
            await self.refresh(force=True)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            log.warning("key store: redis unavailable at start (%s); will retry", type(e).__name__)
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            if not self._failing:
                log.warning("key store: redis unavailable (%s); serving the cached keys", type(e).__name__)
            self._failing = True
            return
        if self._failing:
            log.info("key store: redis reachable again")
        self._failing = False

    async def refresh(self, force: bool = False) -> None:
        ver = await self.redis.get(self.ver_key)
        if ver is None and self.keys:
            await self._reseed()
            return
        if not force and ver == self._ver:
            return
        rows = await self.redis.hgetall(self.hash_key)
        fresh: dict[str, ApiKey] = {}
        for d, raw in rows.items():
            d = d.decode() if isinstance(d, bytes) else d
            try:
                rec = ApiKey.from_json(d, raw)
            except (ValueError, TypeError, AttributeError):
                log.warning("key store: skipping an unreadable entry %s", d[:16])
                continue
            old = self.keys.get(d)
            if old is not None:
                rec.usage = old.usage  # keep the rate window across reloads
            fresh[d] = rec
        self.keys = fresh
        self._ver = ver

    async def _reseed(self) -> None:
        """Redis lost the keys (restart without persistence): write back this replica's copy."""
        p = self.redis.pipeline(transaction=True)
        for d, rec in self.keys.items():
            p.hsetnx(self.hash_key, d, rec.to_json())
        p.set(self.ver_key, 1, nx=True)
        await p.execute()
        log.warning("key store: redis had no keys; restored %d from this replica's copy", len(self.keys))
        self._ver = None  # reload (and merge with what other replicas wrote back) next cycle

