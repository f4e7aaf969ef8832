"""What tokens cost: one request's price, an upstream's live $/1M output tokens, pool and fleet figures.

Why. Operators ask "what does each token cost us, on which upstream, for which team?". Hosted APIs answer per
token (cached input and batch work cheaper); a GPU server costs the same per hour whether it idles or runs a full
batch, so its cost per token is its price per hour over the tokens it actually delivers: the busier and better
batched (the higher its measured tok/s), the cheaper each token. That is the gateway's throughput goal in money.

Units. Money is counted in integer micro-dollars (1e-6 USD): a price per 1M tokens times a token count *is* a
micro-dollar amount, so one request's cost is `sum(tokens_i * price_per_1m_i)` micro-dollars, computed with
Decimal from the configured prices and rounded half-up once per request. Integers add exactly in Redis (HINCRBY)
and in tests, so spend recomputed from responses' usage matches to the micro-dollar (far inside a cent).

Pure: no I/O, no clocks; callers pass the live figures (measured tok/s, the capacity curve's single-sequence speed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from gateway.config import Prices

MICROS_PER_USD = 1_000_000
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Tokens:
    """The billable tokens of one request: input (all of the prompt, cached included), the cached part, output.

    (Not the reported usage, where input may be unknown: callers resolve that to a count first.)"""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


def _d(v: float | None) -> Decimal:
    return _ZERO if v is None else Decimal(str(v))


def _round(x: Decimal) -> int:
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def token_rates(p: Prices, batch: bool = False) -> tuple[Decimal, Decimal, Decimal]:
    """(input, cached input, output) USD per 1M tokens for a per-token-priced upstream."""
    inp = _d(p.batch_input_per_1m if batch and p.batch_input_per_1m is not None else p.input_per_1m)
    out = _d(p.batch_output_per_1m if batch and p.batch_output_per_1m is not None else p.output_per_1m)
    cached = _d(p.cached_input_per_1m) if p.cached_input_per_1m is not None else inp
    return inp, cached, out


def gpu_usd_per_1m(per_hour: float, tok_s: float) -> float | None:
    """A server priced by the hour: USD per 1M output tokens at `tok_s` output tokens/s (None when idle)."""
    if tok_s <= 0:
        return None
    return per_hour / 3600.0 / tok_s * MICROS_PER_USD


def billing_tok_s(measured_tok_s: float, single_seq_tok_s: float) -> float:
    """The throughput an hourly server's request is billed at: what it delivers now, but never below one
    sequence's speed (an idle server's first request would otherwise be charged the whole idle hour)."""
    return max(measured_tok_s, single_seq_tok_s, 1e-9)


def request_cost_micros(p: Prices | None, u: Tokens, *, batch: bool = False, live_usd_per_1m: float | None = None) -> int:
    """The cost of one request in micro-dollars.

    Per-token prices win when configured (hosted APIs; a GPU server's chargeback rate). Otherwise an hourly
    server charges its output tokens at `live_usd_per_1m` (from gpu_usd_per_1m at the billing throughput); the
    prompt is inside the hour. No price: free (0)."""
    if p is None:
        return 0
    if p.per_token:
        inp, cached, out = token_rates(p, batch)
        cached_n = min(max(0, u.cached_tokens), max(0, u.input_tokens))
        fresh = max(0, u.input_tokens) - cached_n
        return _round(fresh * inp + cached_n * cached + max(0, u.output_tokens) * out)
    if live_usd_per_1m is not None:
        return _round(max(0, u.output_tokens) * _d(live_usd_per_1m))
    return 0


def estimate_micros(prices: Iterable[tuple[Prices | None, float | None]], prompt_tokens: int, output_tokens: int) -> int:
    """An upper estimate of a request's cost before routing: the dearest of the pool's upstreams.

    `prices` holds (Prices, live USD/1M output for hourly servers). Used to reserve budget at admission."""
    best = 0
    for p, live in prices:
        best = max(best, request_cost_micros(p, Tokens(prompt_tokens, 0, output_tokens), live_usd_per_1m=live))
    return best


def spent_usd_per_1m(micros: int, output_tokens: int) -> float | None:
    """What was spent per output token: micro-dollars per token is USD per 1M tokens (None before any token)."""
    return micros / output_tokens if output_tokens > 0 else None


def usd_per_1m_output(p: Prices | None, tok_s: float, spend_micros: int = 0, output_tokens: int = 0) -> float | None:
    """An upstream's live USD per 1M output tokens.

    Hourly: price per hour over measured tok/s. Per token: what its requests really cost per output token so far
    (input included: `spend_micros / output_tokens`), or the output price before any request finished."""
    if p is None:
        return None
    if p.per_token:
        spent = spent_usd_per_1m(spend_micros, output_tokens)
        return spent if spent is not None else float(_d(p.output_per_1m))
    hourly = p.hourly
    return gpu_usd_per_1m(hourly, tok_s) if hourly is not None else None


def usd_per_second(p: Prices | None, tok_s: float, usd_per_1m: float | None) -> float:
    """Spend rate of an upstream: an hourly server costs its price whether busy or idle."""
    if p is None:
        return 0.0
    if not p.per_token and p.hourly is not None:
        return p.hourly / 3600.0
    return (usd_per_1m or 0.0) * tok_s / MICROS_PER_USD


def blended_usd_per_1m(rows: Iterable[tuple[float, float]]) -> float | None:
    """Pool / fleet USD per 1M output tokens from (USD/s, output tok/s) per upstream: all spend over all tokens,
    so idle hourly servers make every delivered token dearer (None when nothing is delivered)."""
    usd = tok = 0.0
    for rate, tok_s in rows:
        usd += rate
        tok += tok_s
    if tok <= 0:
        return None
    return usd / tok * MICROS_PER_USD


def usd(micros: int) -> float:
    """Micro-dollars as USD (for JSON and metrics)."""
    return micros / MICROS_PER_USD
