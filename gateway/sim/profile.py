"""Step-time cost models of the simulated GPU engine and the presets calibrated to published profiles.

One engine step runs every scheduled sequence through the model once: decode sequences contribute 1 token
(1 + k with speculative decoding), prefill chunks their chunk's tokens. Its time has two parts:

- *linear layers* (weights): read once per step whatever the batch, so a small batch is memory-bound and
  costs ~ the weight read; past a few hundred batched tokens the matmuls become compute-bound and time
  grows ~linearly with batched tokens. Modelled by piecewise-linear interpolation through measured points
  (extrapolated with the last slope);
- *attention*: reads the KV of every context token of every scheduled sequence, so it grows with KV tokens
  read (= the sum of the scheduled sequences' context lengths), ms per 1,000 KV tokens.

Presets (`--preset`):
- `h100-llama8b`: Vidur's H100 profile of Llama-2-7B linear layers (~5.6 ms for 1 batched token, ~6.4 ms for
  128, ~21 ms for 1,024); attention from bandwidth: Llama-3-8B KV is 128 KiB/token (32 layers x 8 KV heads x
  128 dims x K,V x fp16), read at 3.35 TB/s = 0.039 ms per 1k tokens; KV capacity 80 GB x 0.9 - 16 GB of
  weights = ~56 GB = ~427k tokens.
- `a10g-llama8b`: *derived*, not measured: the H100 profile scaled by bandwidth (600 GB/s vs 3.35 TB/s, x5.58)
  where memory-bound (1 and 128 tokens) and by fp16 tensor throughput (125 vs 990 TFLOPS, x7.9) where
  compute-bound (1,024 tokens); ~31 ms single-stream steps agree with the ~30 tok/s reported for Llama-3-8B
  fp16 on an A10G. KV capacity 24 GB x 0.9 - 16 GB = ~5.6 GB = ~42k tokens.
- `dynamo-mocker`: NVIDIA Dynamo's mocker formulas: decode step_ms = -25.74u^2 + 54.01u + 5.74 with u = active
  KV tokens / capacity, prefill_ms = 4.21e-7 n^2 + 0.0152 n + 16.5 for n new prompt tokens; a mixed step
  costs the sum.

Speculative decoding adds k draft passes per step, each `spec_draft_cost` x the target's linear-layer time
for the same number of sequences (a draft model ~1/10 the size scales the same way).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Literal

CostKind = Literal["simple", "table", "dynamo"]


@dataclass(frozen=True)
class StepLoad:
    """What one engine step computes."""

    seqs: int = 0  # sequences scheduled (decode + prefill)
    decode_seqs: int = 0
    batched_tokens: int = 0  # decode tokens (1 + k each) + prefill chunk tokens
    prefill_tokens: int = 0  # of which prefill
    kv_read: int = 0  # context tokens attended over, summed over scheduled sequences
    active_kv: int = 0  # tokens held in the KV cache by running sequences
    spec_k: int = 0  # draft tokens per decode sequence (0 = off)


@dataclass(frozen=True)
class Preset:
    name: str
    cost: CostKind
    table: tuple[tuple[int, float], ...] = ()  # (batched tokens, linear-layer ms)
    kv_ms_per_1k: float = 0.0  # attention ms per 1,000 KV tokens read
    kv_cache_tokens: int = 0
    max_batched_tokens: int = 2048
    help: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("h100-llama8b", "table", ((1, 5.6), (128, 6.4), (1024, 21.0)), 0.039, 427_000, 2048,
           "H100 80GB, Llama-3-8B fp16 (Vidur linear-layer profile + KV bandwidth)"),
    Preset("a10g-llama8b", "table", ((1, 31.3), (128, 35.7), (1024, 166.0)), 0.218, 42_000, 2048,
           "A10G 24GB, Llama-3-8B fp16 (H100 profile scaled by bandwidth / FLOPS)"),
    Preset("dynamo-mocker", "dynamo", (), 0.0, 427_000, 2048,
           "NVIDIA Dynamo mocker formulas (decode by KV usage, quadratic prefill)"),
)}


def interp_ms(table: tuple[tuple[int, float], ...], tokens: float) -> float:
    """Piecewise-linear through `table`, extrapolated with the first / last segment's slope."""
    xs = [x for x, _ in table]
    i = min(max(bisect_left(xs, tokens), 1), len(table) - 1)
    (x0, y0), (x1, y1) = table[i - 1], table[i]
    return max(0.0, y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))


def dynamo_decode_ms(u: float) -> float:
    return -25.74 * u * u + 54.01 * u + 5.74


def dynamo_prefill_ms(n: int) -> float:
    return 4.21e-7 * n * n + 0.0152 * n + 16.5


@dataclass(frozen=True)
class CostModel:
    """Step time in seconds for a StepLoad. `simple` is the old formula (base + per_seq*seqs + prefill)."""

    kind: CostKind
    table: tuple[tuple[int, float], ...] = ()
    kv_ms_per_1k: float = 0.0
    kv_capacity: int = 1
    base_step: float = 0.01
    per_seq: float = 0.0005
    prefill_per_token: float = 0.00002
    spec_draft_cost: float = 0.1

    def step_seconds(self, load: StepLoad) -> float:
        if load.seqs == 0:
            return 0.0
        if self.kind == "simple":
            s = self.base_step + self.per_seq * load.seqs + self.prefill_per_token * load.prefill_tokens
            return s * (1.0 + self.spec_draft_cost * load.spec_k if load.spec_k and load.decode_seqs else 1.0)
        if self.kind == "dynamo":
            ms = dynamo_decode_ms(load.active_kv / self.kv_capacity) if load.decode_seqs else 0.0
            ms += dynamo_prefill_ms(load.prefill_tokens) if load.prefill_tokens else 0.0
        else:
            ms = interp_ms(self.table, load.batched_tokens) + self.kv_ms_per_1k * load.kv_read / 1000.0
        if load.spec_k and load.decode_seqs:
            ms += load.spec_k * self.spec_draft_cost * self._draft_base_ms(load.decode_seqs)
        return ms / 1000.0

    def _draft_base_ms(self, seqs: int) -> float:
        if self.kind == "dynamo":
            return dynamo_decode_ms(0.0)
        return interp_ms(self.table, seqs)
