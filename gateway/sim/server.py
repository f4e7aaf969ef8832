"""aiohttp app for the upstream simulator: OpenAI / Azure / Anthropic wire formats over a sim model."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import re
import signal
import struct
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from aiohttp import web

from gateway.routing import prefix
from gateway.sim import batches as native_batches
from gateway.sim.engine import GpuEngine, PromptTooLong, RateLimited, SimModel, SimStopped, TokenStream
from gateway.sim.hosted import HostedModel, retry_after_header
from gateway.sim.kv_engine import KvEngine
from gateway.sim.profile import PRESETS
from gateway.tokens import count_text


@dataclass
class SimConfig:
    """Simulated upstream parameters. gpu: one continuous-batching loop; hosted: independent requests."""

    name: str = "sim"
    mode: Literal["gpu", "hosted"] = "gpu"
    # gpu: step_time = (base_step + per_seq*running + prefill_per_token*admitted prompt tokens) * slowdown
    base_step: float = 0.010
    per_seq: float = 0.0005
    prefill_per_token: float = 0.00002
    slots: int = 32  # max running sequences; the rest wait FIFO
    # hosted: first token after ttft*slowdown, then tok_s/slowdown tokens per second
    ttft: float = 0.3
    tok_s: float = 50.0
    rpm: int | None = None  # hosted: sliding-window limits -> 429 + Retry-After
    tpm: int | None = None  # cost = prompt tokens + max_tokens (or default_max_tokens)
    window: float = 60.0
    max_concurrency: int | None = None  # hosted: more in flight -> 429
    default_max_tokens: int = 128
    error_rate: float = 0.0  # fraction answered 500 before any output
    slowdown: float = 1.0
    slowdown_at: float | None = None  # seconds after app start when slowdown_factor kicks in
    slowdown_factor: float = 4.0
    api_key: str | None = None  # Bearer / api-key / x-api-key, else 401
    seed: int = 0
    # gpu KV engine (gateway/sim/kv_engine.py), selected by preset or kv_cache_tokens; unset -> the slot model
    preset: str | None = None  # gateway/sim/profile.py PRESETS: calibrated cost model + KV capacity
    kv_cache_tokens: int | None = None  # KV capacity in tokens (default: the preset's)
    block_size: int = 16  # tokens per KV block
    max_batched_tokens: int | None = None  # per-step token budget (default: the preset's, else 2048)
    chunked_prefill: bool = True  # False: prefill-only steps that stall decodes (vLLM v0)
    prefix_caching: bool = True  # automatic prefix caching of prompt blocks
    spec_k: int = 0  # speculative decoding: draft tokens per step (0 = off)
    spec_accept: float = 0.7  # probability each draft token is accepted
    spec_draft_cost: float = 0.1  # one draft pass / one target decode step, same batch
    # hosted: provider prompt caching (0 = off)
    prompt_cache_min_tokens: int = 0  # prompts at least this long may be served partly from cache
    prompt_cache_ttl: float = 300.0  # seconds a prefix stays cached after it was last seen
    prompt_cache_speedup: float = 0.8  # fraction of the TTFT saved for the cached share of the prompt

    @property
    def kv_engine(self) -> bool:
        """True when the GPU mode uses the KV-cache engine rather than the simple slot model."""
        return self.mode == "gpu" and (self.preset is not None or self.kv_cache_tokens is not None)


# Each is a single cl100k token with its leading space, so one chunk == one token.
WORDS: tuple[str, ...] = tuple(" " + w for w in (
    "the of and to in is that for it as with was on be at by this have from or an but not are can all"
    " which one we you they more will new time model data system token fast first good work world light"
    " water people number small large"
).split())
TOOL_ARGS = ('{"', "city", '":"', "Paris", '"}')  # each one cl100k token; joined: {"city":"Paris"}
_STOP_RE = re.compile(r"STOP_AFTER_(\d+)")

Api = Literal["chat", "completions", "messages"]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


# ------------------------------------------------------------------------------- errors
_OAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
              429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_ANT_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def error_body(api: Api | None, status: int, message: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI `{"error": {...}}` or, for /v1/messages, Anthropic `{"type": "error", ...}`."""
    if api == "messages":
        return {"type": "error", "error": {"type": _ANT_TYPES.get(status, "api_error"), "message": message}}
    return {"error": {"message": message, "type": _OAI_TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(api: Api | None, status: int, message: str, *, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(api, status, message, param=param, code=code), status=status, headers=headers)


# ------------------------------------------------------------------------------- request parsing
def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadRequest(f"'{key}' must be a positive integer", key)
    return v


@dataclass
class Job:
    """A parsed generation request: how many units to produce and how to render them."""

    api: Api
    model: str
    prompt_tokens: int
    n: int
    finish: str  # OpenAI terms: "stop" | "length" | "tool_calls"
    stream: bool
    include_usage: bool
    tool: str | None
    budget: int
    rid: int
    created: int
    hashes: list[int] = field(default_factory=list)  # chained prompt block hashes, when the model caches
    cached_tokens: int | None = None  # known once the model admitted the request

    def piece(self, i: int) -> str:
        if self.tool is not None:
            return "" if i == 0 else TOOL_ARGS[i - 1]
        return WORDS[(self.rid * 7 + i * 11) % len(WORDS)]

    def text(self, count: int) -> str:
        return "".join(self.piece(i) for i in range(count))

    @property
    def tool_id(self) -> str:
        return f"{'toolu' if self.api == 'messages' else 'call'}_sim_{self.rid}"


def parse_job(api: Api, body: Any, sim: SimModel, model_default: str) -> Job:
    """Validate a request body and decide the output plan."""
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    cfg = sim.cfg
    tools = body.get("tools")
    done: int | None = None  # tokens of the answer a continuation request already has
    if api == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            chars, last = len(prompt), prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            chars, last = sum(map(len, prompt)), prompt[-1]
        elif isinstance(prompt, list) and prompt:  # token ids
            flat = [t for p in prompt for t in (p if isinstance(p, list) else [p])]
            chars, last = 4 * len(flat), ""
        else:
            raise BadRequest("'prompt' is required", "prompt")
        max_tokens = _opt_int(body, "max_tokens")
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("'messages' must be a non-empty array of message objects", "messages")
        done = _continued(api, body, messages)
        head = messages[:-1] if done is not None else messages
        chars = sum(len(_text(m.get("content"))) for m in head) + len(_text(body.get("system")))
        users = [m for m in messages if m.get("role") == "user"]
        last = _text(users[-1].get("content")) if users else ""
        if api == "messages":
            max_tokens = _opt_int(body, "max_tokens")
            if max_tokens is None:
                raise BadRequest("max_tokens: Field required", "max_tokens")
        else:
            max_tokens = _opt_int(body, "max_completion_tokens") or _opt_int(body, "max_tokens")
    limit = max_tokens or cfg.default_max_tokens
    tool = None
    if api != "completions" and isinstance(tools, list) and tools and "CALL_TOOL" in last:
        t0 = tools[0] if isinstance(tools[0], dict) else {}
        tool = str(t0.get("name") or (t0.get("function") or {}).get("name") or "tool")
    m = _STOP_RE.search(last)
    written = done or 0  # a continuation: the answer's tokens already written count toward STOP_AFTER_n
    if tool is not None:
        n, finish = len(TOOL_ARGS) + 1, "tool_calls"
    elif m is not None and int(m.group(1)) - written <= limit:
        n, finish = max(0, int(m.group(1)) - written), "stop"
    else:
        n, finish = limit, "length" if max_tokens else "stop"
    prompt_tokens, hashes = max(1, chars // 4 + written), list[int]()
    block = sim.prefix_block_size
    if block is not None:  # real token ids only where a cache or a KV budget needs them
        count, hashes = prefix.prompt_block_hashes(body, block)
        prompt_tokens = max(1, count)
    elif sim.cfg.kv_engine:
        prompt_tokens = max(1, len(prefix.prompt_token_ids(body)))
    so = body.get("stream_options")
    return Job(api=api, model=str(body.get("model") or model_default), prompt_tokens=prompt_tokens,
               n=n, finish=finish, stream=bool(body.get("stream")),
               include_usage=isinstance(so, dict) and bool(so.get("include_usage")), tool=tool,
               budget=prompt_tokens + limit, rid=sim.next_id(), created=int(time.time()), hashes=hashes)


def _continued(api: Api, body: dict[str, Any], messages: list[dict[str, Any]]) -> int | None:
    """Tokens of the final assistant message a request continues (vLLM's `continue_final_message`), else None.

    As vLLM's OpenAI server: the final message must be the assistant's, and `add_generation_prompt` (default true)
    must be turned off, or the request is refused. The continued text is prompt (counted in tokens, as the engine
    tokenizes it) and the answer picks up from it: output up to the request's max_tokens, STOP_AFTER_n counting
    the tokens already written."""
    if api != "chat" or not body.get("continue_final_message"):
        return None
    if body.get("add_generation_prompt", True):
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    if messages[-1].get("role") != "assistant":
        raise BadRequest("continue_final_message requires the final message to be from the assistant", "messages")
    return count_text(_text(messages[-1].get("content")))


# ------------------------------------------------------------------------------- wire formats
def _sse(obj: Any, event: str | None = None) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def _usage(job: Job, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": job.prompt_tokens, "completion_tokens": count,
                           "total_tokens": job.prompt_tokens + count}
    if job.cached_tokens is not None:  # as OpenAI and vLLM (--enable-prompt-tokens-details) report it
        out["prompt_tokens_details"] = {"cached_tokens": job.cached_tokens}
    return out


def _ant_usage(job: Job, output_tokens: int) -> dict[str, int]:
    """Anthropic usage: input_tokens excludes what was read from the cache (cache_read_input_tokens)."""
    if job.cached_tokens is None:
        return {"input_tokens": job.prompt_tokens, "output_tokens": output_tokens}
    return {"input_tokens": job.prompt_tokens - job.cached_tokens, "cache_read_input_tokens": job.cached_tokens,
            "output_tokens": output_tokens}


_ANT_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class Wire:
    """Renders a Job as stream events (head / per-token / tail) or as one full response."""

    def __init__(self, job: Job) -> None:
        self.job = job
        j = job
        if j.api == "chat":
            self.id, self.obj = f"chatcmpl-sim-{j.rid}", "chat.completion"
        elif j.api == "completions":
            self.id, self.obj = f"cmpl-sim-{j.rid}", "text_completion"
        else:
            self.id, self.obj = f"msg_sim_{j.rid}", "message"

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
        obj = "chat.completion.chunk" if self.job.api == "chat" else "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.job.created,
                               "model": self.job.model, "system_fingerprint": None,
                               "choices": [choice] if choice else []}
        if usage is not None:
            out["usage"] = usage
        return _sse(out)

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        if self.job.api == "chat":
            return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})
        return self._chunk({"index": 0, "text": delta.get("content", ""), "logprobs": None,
                            "finish_reason": finish})

    def head(self) -> list[bytes]:
        j = self.job
        if j.api == "chat":
            return [self._delta({"role": "assistant", "content": ""})]
        if j.api == "completions":
            return []
        msg: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "content": [], "model": j.model,
                               "stop_reason": None, "stop_sequence": None, "usage": _ant_usage(j, 1)}
        block = ({"type": "tool_use", "id": j.tool_id, "name": j.tool, "input": {}} if j.tool
                 else {"type": "text", "text": ""})
        return [_sse({"type": "message_start", "message": msg}, "message_start"),
                _sse({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start"),
                _sse({"type": "ping"}, "ping")]

    def token(self, i: int) -> bytes:
        j, piece = self.job, self.job.piece(i)
        if j.api == "messages":
            delta = ({"type": "input_json_delta", "partial_json": piece} if j.tool
                     else {"type": "text_delta", "text": piece})
            return _sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
        if j.tool is not None:
            call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
            if i == 0:
                call = {"index": 0, "id": j.tool_id, "type": "function",
                        "function": {"name": j.tool, "arguments": ""}}
            return self._delta({"tool_calls": [call]})
        return self._delta({"content": piece})

    def tail(self, count: int) -> list[bytes]:
        j = self.job
        finish = j.finish if count >= j.n else "stop"
        if j.api == "messages":
            return [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                    _sse({"type": "message_delta", "delta": {"stop_reason": _ANT_STOP[finish], "stop_sequence": None},
                          "usage": {"output_tokens": count}}, "message_delta"),
                    _sse({"type": "message_stop"}, "message_stop")]
        out = [self._delta({}, finish)]
        if j.include_usage:
            out.append(self._chunk(None, _usage(j, count)))
        out.append(_sse("[DONE]"))
        return out

    def full(self, count: int) -> dict[str, Any]:
        j = self.job
        if j.api == "messages":
            content = ([{"type": "tool_use", "id": j.tool_id, "name": j.tool, "input": {"city": "Paris"}}]
                       if j.tool else [{"type": "text", "text": j.text(count)}])
            return {"id": self.id, "type": "message", "role": "assistant", "content": content,
                    "model": j.model, "stop_reason": _ANT_STOP[j.finish], "stop_sequence": None,
                    "usage": _ant_usage(j, count)}
        base: dict[str, Any] = {"id": self.id, "object": self.obj, "created": j.created, "model": j.model,
                                "system_fingerprint": None}
        if j.api == "completions":
            base["choices"] = [{"index": 0, "text": j.text(count), "logprobs": None, "finish_reason": j.finish}]
            return {**base, "usage": _usage(j, count)}
        msg: dict[str, Any] = {"role": "assistant", "content": j.text(count), "refusal": None}
        if j.tool:
            msg["content"] = None
            msg["tool_calls"] = [{"id": j.tool_id, "type": "function",
                                  "function": {"name": j.tool, "arguments": j.text(count)}}]
        base["choices"] = [{"index": 0, "message": msg, "logprobs": None, "finish_reason": j.finish}]
        return {**base, "usage": _usage(j, count)}


# ------------------------------------------------------------------------------- handlers
def _sim(request: web.Request) -> SimModel:
    sim: SimModel = request.app["sim"]
    return sim


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise BadRequest("Invalid JSON body") from None


class Refused(Exception):
    """A request answered with an error before any output: (status, error body, headers)."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _limit_headers(sim: SimModel) -> dict[str, str]:
    return sim.limiter.headers() if isinstance(sim, HostedModel) else {}


def _admit(sim: SimModel, api: Api, body: Any, model_default: str) -> tuple[Job, TokenStream]:
    """Parse and admit one generation request, or raise Refused (400, simulated 500, 429)."""
    try:
        job = parse_job(api, body, sim, model_default)
    except BadRequest as e:
        raise Refused(e.status, error_body(api, e.status, e.message, param=e.param)) from None
    if sim.roll_error():
        raise Refused(500, error_body(api, 500, "Simulated upstream failure", code="sim_error"))
    try:
        return job, sim.open(job.prompt_tokens, job.n, job.budget, job.hashes)
    except RateLimited as e:
        headers = {"Retry-After": retry_after_header(e.retry_after), **_limit_headers(sim)}
        raise Refused(429, error_body(api, 429, e.message, code="rate_limit_exceeded"), headers) from None
    except PromptTooLong as e:
        raise Refused(400, error_body(api, 400, str(e), param="messages", code="context_length_exceeded")) from None


async def _whole(sim: SimModel, job: Job, stream: TokenStream) -> dict[str, Any]:
    """Run an admitted request to its end: the full (non-streamed) response body."""
    try:
        count = 0
        async for _ in stream:
            count += 1
        job.cached_tokens = stream.cached_tokens
        return Wire(job).full(count)
    finally:
        stream.close()


async def answer(sim: SimModel, api: Api, body: Any, model_default: str) -> tuple[int, dict[str, Any]]:
    """One whole answer as (status, body): what a non-streamed request gets (the native batch API's lines)."""
    try:
        job, stream = _admit(sim, api, body, model_default)
        return 200, await _whole(sim, job, stream)
    except Refused as e:
        return e.status, e.body
    except SimStopped:
        return 503, error_body(api, 503, "Simulator shutting down")


async def _generate(request: web.Request, api: Api, model_default: str | None = None) -> web.StreamResponse:
    sim = _sim(request)
    try:
        job, stream = _admit(sim, api, await _read_json(request), model_default or sim.cfg.name)
    except BadRequest as e:
        return error_response(api, e.status, e.message, param=e.param)
    except Refused as e:
        return web.json_response(e.body, status=e.status, headers=e.headers)
    try:
        if job.stream:
            try:
                return await _stream(request, sim, Wire(job), stream, _limit_headers(sim))
            finally:
                stream.close()
        return web.json_response(await _whole(sim, job, stream), headers=_limit_headers(sim))
    except SimStopped:
        return error_response(api, 503, "Simulator shutting down")


async def _stream(request: web.Request, sim: SimModel, wire: Wire, stream: TokenStream,
                  headers: dict[str, str]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "x-request-id": wire.id, **headers})
    await resp.prepare(request)
    fail_after = sim.fail_streams_after
    count, started = 0, False
    try:
        while True:
            if fail_after is not None and count >= fail_after:
                _abort(request)
                return resp
            try:
                i = await stream.__anext__()
            except StopAsyncIteration:
                break
            wire.job.cached_tokens = stream.cached_tokens  # known once the model admitted it
            data = b"".join(wire.head()) if not started else b""
            started = True
            await resp.write(data + wire.token(i))
            count += 1
        wire.job.cached_tokens = stream.cached_tokens
        await resp.write(b"".join(([] if started else wire.head()) + wire.tail(count)))
        await resp.write_eof()
    except (ConnectionResetError, SimStopped):
        _abort(request)
    return resp


def _abort(request: web.Request) -> None:
    """Drop the TCP connection without finishing the chunked body (a mid-stream failure)."""
    tr = request.transport
    if tr is not None:
        tr.abort()


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def messages(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "messages")


async def azure(request: web.Request) -> web.StreamResponse:
    if not request.query.get("api-version"):
        return error_response("chat", 400, "Missing required query parameter 'api-version'", param="api-version")
    op, dep = request.match_info["op"], request.match_info["deployment"]
    if op == "embeddings":
        return await embeddings(request, dep)
    return await _generate(request, "chat" if op == "chat/completions" else "completions", dep)


def embed_vector(text: str, dim: int = 8) -> list[float]:
    """Deterministic unit vector derived from sha256(text)."""
    h = hashlib.sha256(text.encode()).digest()
    v = [(b / 127.5) - 1.0 for b in h[:dim]]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def embed_answer(sim: SimModel, body: Any, model_default: str) -> tuple[int, dict[str, Any]]:
    """An embeddings answer as (status, body): the HTTP handler's and the native batch API's."""
    inp = body.get("input") if isinstance(body, dict) else None
    if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
        inp = [inp]
    if not isinstance(inp, list) or not inp:
        return 400, error_body(None, 400, "'input' is required", param="input")
    if sim.roll_error():
        return 500, error_body(None, 500, "Simulated upstream failure", code="sim_error")
    texts = [x if isinstance(x, str) else json.dumps(x) for x in inp]
    tokens = sum(max(1, len(t) // 4) if isinstance(x, str) else len(x) for t, x in zip(texts, inp))
    sim.prompt_tokens_total += tokens
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, t in enumerate(texts):
        vec = embed_vector(t)
        emb: Any = base64.b64encode(struct.pack("<8f", *vec)).decode() if b64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return 200, {"object": "list", "data": data, "model": body.get("model") or model_default,
                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def embeddings(request: web.Request, model_default: str | None = None) -> web.Response:
    sim = _sim(request)
    try:
        body = await _read_json(request)
    except BadRequest as e:
        return error_response(None, 400, e.message, param=e.param)
    status, out = embed_answer(sim, body, model_default or sim.cfg.name)
    return web.json_response(out, status=status)


async def models(request: web.Request) -> web.Response:
    sim = _sim(request)
    return web.json_response({"object": "list", "data": [
        {"id": sim.cfg.name, "object": "model", "created": 0, "owned_by": "sim"}]})


async def metrics(request: web.Request) -> web.Response:
    sim = _sim(request)
    lbl = '{model_name="%s"}' % sim.cfg.name.replace("\\", "\\\\").replace('"', '\\"')
    usage = sim.kv_usage()
    rows: list[tuple[str, str, float]] = [
        ("num_requests_running", "gauge", sim.running), ("num_requests_waiting", "gauge", sim.waiting),
        ("kv_cache_usage_perc", "gauge", usage), ("gpu_cache_usage_perc", "gauge", usage),
        ("num_preemptions_total", "counter", sim.preemptions),
        ("prefix_cache_queries_total", "counter", sim.prefix_queries),
        ("prefix_cache_hits_total", "counter", sim.prefix_hits),
        ("generation_tokens_total", "counter", sim.tokens_generated),
        ("prompt_tokens_total", "counter", sim.prompt_tokens_total)]
    lines = []
    for name, kind, value in rows:
        lines += [f"# TYPE vllm:{name} {kind}", f"vllm:{name}{lbl} {value}"]
    if isinstance(sim, KvEngine):  # as vLLM: the KV capacity behind kv_cache_usage_perc, as info labels
        lines += ["# TYPE vllm:cache_config_info gauge",
                  f'vllm:cache_config_info{{block_size="{sim.kv.block_size}",num_gpu_blocks="{sim.kv.num_blocks}",'
                  f'enable_prefix_caching="{sim.kv.prefix_caching}"}} 1']
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(_sim(request).stats())


def _faults(sim: SimModel) -> dict[str, Any]:
    return {"slowdown": sim.cfg.slowdown, "error_rate": sim.cfg.error_rate,
            "fail_streams_after": sim.fail_streams_after}


async def faults(request: web.Request) -> web.Response:
    sim = _sim(request)
    if request.method == "GET":
        return web.json_response(_faults(sim))
    try:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise BadRequest("body must be an object")
        for key in ("slowdown", "error_rate"):
            if key in body:
                v = body[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise BadRequest(f"'{key}' must be a non-negative number", key)
        fsa = body.get("fail_streams_after")
        if fsa is not None and (isinstance(fsa, bool) or not isinstance(fsa, int) or fsa < 0):
            raise BadRequest("'fail_streams_after' must be a non-negative integer or null", "fail_streams_after")
    except BadRequest as e:
        return error_response(None, 400, e.message, param=e.param)
    if "slowdown" in body:
        sim.cfg.slowdown = float(body["slowdown"])
    if "error_rate" in body:
        sim.cfg.error_rate = float(body["error_rate"])
    if "fail_streams_after" in body:
        sim.fail_streams_after = fsa
    return web.json_response(_faults(sim))


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    key = _sim(request).cfg.api_key
    if key and request.path.startswith(("/v1/", "/openai/")):
        auth = request.headers.get("Authorization", "")
        given = {auth[7:].strip() if auth[:7].lower() == "bearer " else None,
                 request.headers.get("api-key"), request.headers.get("x-api-key")}
        if key not in given:
            api: Api | None = "messages" if request.path == "/v1/messages" else None
            return error_response(api, 401, "Incorrect API key provided", code="invalid_api_key")
    return await handler(request)


# ------------------------------------------------------------------------------- app
def create_app(cfg: SimConfig) -> web.Application:
    """Build the simulator app; app["sim"] is the live model (a copy of cfg is used)."""
    cfg = replace(cfg)
    sim: SimModel = HostedModel(cfg) if cfg.mode == "hosted" else KvEngine(cfg) if cfg.kv_engine else GpuEngine(cfg)
    app = web.Application(middlewares=[_auth], client_max_size=32 * 1024 * 1024)
    with warnings.catch_warnings():  # the public contract is the plain key app["sim"]
        warnings.simplefilter("ignore")
        app["sim"] = sim

    async def _start(_: web.Application) -> None:
        await sim.start()

    async def _stop(_: web.Application) -> None:
        await sim.stop()

    app.on_startup.append(_start)
    app.on_shutdown.append(_stop)
    app.on_cleanup.append(_stop)
    r = app.router
    r.add_post("/v1/chat/completions", chat)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/messages", messages)
    r.add_post("/v1/embeddings", embeddings)
    r.add_get("/v1/models", models)
    r.add_post(r"/openai/deployments/{deployment}/{op:chat/completions|completions|embeddings}", azure)
    if cfg.mode == "hosted":
        native_batches.add_routes(app, _batch_answer(sim))
    r.add_get("/metrics", metrics)
    r.add_get("/health", health)
    r.add_get("/sim/stats", stats)
    r.add_route("*", "/sim/faults", faults)
    return app


_BATCH_APIS: dict[str, Api] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


def _batch_answer(sim: SimModel) -> native_batches.Answer:
    """How the native batch API answers one line: the same generation as a non-streamed request."""
    async def run(endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if endpoint == "/v1/embeddings":
            return embed_answer(sim, body, sim.cfg.name)
        return await answer(sim, _BATCH_APIS[endpoint], body, sim.cfg.name)

    return run


async def start_sim(cfg: SimConfig, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start the sim on host:port (0 = free port); returns the runner (call .cleanup()) and port."""
    runner = web.AppRunner(create_app(cfg), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)


async def serve_forever(cfg: SimConfig, host: str, port: int) -> None:
    """Run the sim until SIGTERM or SIGINT (used by `gateway sim`). Both handlers are installed explicitly: a
    process started in the background by a non-interactive shell inherits SIGINT ignored, and `docker stop` sends
    SIGTERM, whose default would skip the cleanup."""
    try:
        runner, bound = await start_sim(cfg, host, port)
    except ValueError as e:  # an inconsistent configuration: say so instead of a traceback
        raise SystemExit(f"gateway sim: {e}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sim {cfg.name!r} ({cfg.mode}) listening on http://{host}:{bound}/v1", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------- CLI
_ARG_TYPES: dict[str, type] = {
    "name": str, "mode": str, "base_step": float, "per_seq": float, "prefill_per_token": float, "slots": int,
    "ttft": float, "tok_s": float, "rpm": int, "tpm": int, "window": float, "max_concurrency": int,
    "default_max_tokens": int, "error_rate": float, "slowdown": float, "slowdown_at": float,
    "slowdown_factor": float, "api_key": str, "seed": int, "preset": str, "kv_cache_tokens": int,
    "block_size": int, "max_batched_tokens": int, "chunked_prefill": bool, "prefix_caching": bool, "spec_k": int,
    "spec_accept": float, "spec_draft_cost": float, "prompt_cache_min_tokens": int, "prompt_cache_ttl": float,
    "prompt_cache_speedup": float,
}

_HELP: dict[str, str] = {
    "name": "model name served and reported in /metrics",
    "mode": "gpu: one continuous-batching engine; hosted: independent requests behind rate limits",
    "base_step": "gpu slot model: fixed seconds per engine step",
    "per_seq": "gpu slot model: extra seconds per step per running sequence",
    "prefill_per_token": "gpu slot model: seconds per prompt token prefilled in a step",
    "slots": "gpu: max running sequences (vLLM max_num_seqs); the rest wait FIFO",
    "ttft": "hosted: seconds to the first token",
    "tok_s": "hosted: tokens per second after the first",
    "rpm": "hosted: requests per window, then 429 + Retry-After",
    "tpm": "hosted: tokens (prompt + max tokens) per window, then 429",
    "window": "hosted: rate-limit window in seconds",
    "max_concurrency": "hosted: more requests in flight get a 429",
    "default_max_tokens": "output tokens when the request gives no max_tokens",
    "error_rate": "fraction of requests answered 500 before any output",
    "slowdown": "multiplier on every step / token time",
    "slowdown_at": "seconds after start when --slowdown-factor kicks in",
    "slowdown_factor": "slowdown multiplier applied from --slowdown-at",
    "api_key": "require this key (Bearer, api-key or x-api-key), else 401",
    "seed": "random seed (errors, speculative acceptance)",
    "preset": "gpu: KV-cache engine with a calibrated cost model and KV capacity: " + ", ".join(
        f"{n} ({p.help})" for n, p in PRESETS.items()),
    "kv_cache_tokens": "gpu: KV-cache capacity in tokens; alone (no --preset) selects the KV engine with the "
                       "slot model's step formula",
    "block_size": "gpu KV engine: tokens per KV block (prefix caching granularity)",
    "max_batched_tokens": "gpu KV engine: token budget per step (decode tokens + prefill chunks); "
                          "default: the preset's, else 2048",
    "chunked_prefill": "gpu KV engine: mix prefill chunks into decode steps (off: prefill-only steps stall "
                       "the running batch, as vLLM v0)",
    "prefix_caching": "gpu KV engine: reuse cached prompt blocks (automatic prefix caching)",
    "spec_k": "gpu KV engine: speculative decoding draft length (0 = off)",
    "spec_accept": "gpu KV engine: probability each draft token is accepted",
    "spec_draft_cost": "gpu KV engine: cost of one draft pass relative to a target decode step",
    "prompt_cache_min_tokens": "hosted: provider prompt caching for prompts of at least this many tokens "
                               "(0 = off; OpenAI: 1024)",
    "prompt_cache_ttl": "hosted: seconds a prompt prefix stays cached after it was last seen",
    "prompt_cache_speedup": "hosted: fraction of the TTFT saved for the cached share of the prompt",
}




def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per SimConfig field plus --host/--port."""
    defaults = SimConfig()
    for f in fields(SimConfig):
        default = getattr(defaults, f.name)
        kw: dict[str, Any] = {"default": default, "help": f"{_HELP[f.name]} (default: {default})"}
        if _ARG_TYPES[f.name] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _ARG_TYPES[f.name]
        if f.name == "mode":
            kw["choices"] = ["gpu", "hosted"]
        elif f.name == "preset":
            kw["choices"] = list(PRESETS)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9101, help="port to listen on")


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    """Build a SimConfig from parsed add_sim_arguments flags (missing ones keep defaults)."""
    return SimConfig(**{f.name: getattr(ns, f.name) for f in fields(SimConfig) if hasattr(ns, f.name)})
