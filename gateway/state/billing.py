"""Money per upstream (this replica's requests): what they cost and the output tokens they were charged for.
The prices and formulas are gateway/cost.py's; this keeps the running counters."""

from __future__ import annotations

from gateway import cost
from gateway.config import UpstreamConfig


class CostCounters:
    __slots__ = ("cfg", "spend_micros", "billed_output")

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg  # its price: read live (the config is its one source)
        self.spend_micros = 0
        self.billed_output = 0

    def live_usd_per_1m(self, tok_s: float) -> float | None:
        """Live USD per 1M output tokens: hourly servers from their measured tok/s."""
        return cost.usd_per_1m_output(self.cfg.price, tok_s, self.spend_micros, self.billed_output)

    def billing_usd_per_1m(self, tok_s: float, single_tok_s: float) -> float | None:
        """The rate an hourly server's output tokens are charged at now (None: per-token or no price)."""
        p = self.cfg.price
        if p is None or p.per_token or p.hourly is None:
            return None
        return cost.gpu_usd_per_1m(p.hourly, cost.billing_tok_s(tok_s, single_tok_s))

    def quote(self, usage: cost.Tokens, batch: bool, live_usd_per_1m: float | None) -> int:
        """What a request with this usage costs (micro-dollars), without booking it."""
        return cost.request_cost_micros(self.cfg.price, usage, batch=batch, live_usd_per_1m=live_usd_per_1m)

    def charge(self, usage: cost.Tokens, batch: bool, live_usd_per_1m: float | None) -> int:
        """Price one finished request (micro-dollars) and count it in the live figures."""
        micros = self.quote(usage, batch, live_usd_per_1m)
        self.spend_micros += micros
        self.billed_output += usage.output_tokens
        return micros
