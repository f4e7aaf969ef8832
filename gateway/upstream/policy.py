"""Translation policy: a request parameter the chosen upstream cannot honour is never dropped silently.

Each parameter is either translated (gateway/dialects/anthropic_wire.py, gateway/dialects/responses.py), or, when
the target has no equivalent, the request gets a 400 naming it, or, when the model's pool opts in
(`drop_unsupported_params: true` in its config), it is dropped and the response says so in the
`x-gateway-dropped-params` header.

What cannot be honoured: canonical (OpenAI chat) fields an upstream adapter lists (`Provider.unsupported`), and
fields of the client's own dialect that have no canonical equivalent (`ctx.extras["foreign"]`, e.g. an Anthropic
client's `thinking`) when the upstream does not speak that dialect (same dialect: the client's body is sent as is).
Fields at their default value (n=1, seed absent, response_format text ...) are not a problem and are not listed.
"""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.upstream.base import Provider

DROPPED_HEADER = "x-gateway-dropped-params"


def fit(ctx: RequestContext, prov: Provider, drop: bool) -> dict:
    """The canonical body to encode for `prov`: unchanged, or without what it cannot honour (when `drop`);
    a 400 naming the parameters otherwise."""
    body = ctx.body
    native = ctx.native is not None and prov.dialect == ctx.dialect
    if native:
        return body
    own = prov.unsupported(body)
    foreign = list(ctx.extras.get("foreign") or ())
    aliases = ctx.extras.get("param_names") or {}  # canonical name -> the name in the client's own request
    names = [aliases.get(n, n) for n in own] + foreign
    if not names:
        ctx.response_headers.pop(DROPPED_HEADER, None)
        return body
    if not drop:
        listed = ", ".join(names)
        raise GatewayError(
            400,
            f"{'This parameter is' if len(names) == 1 else 'These parameters are'} not supported by the "
            f"{prov.kind} upstream serving model '{ctx.model}': {listed}. Remove "
            f"{'it' if len(names) == 1 else 'them'}, or set drop_unsupported_params on the model to drop them "
            f"(the response then lists them in {DROPPED_HEADER}).",
            code="unsupported_parameter", param=names[0],
        )
    ctx.response_headers[DROPPED_HEADER] = ",".join(names)
    return {k: v for k, v in body.items() if k not in own}
