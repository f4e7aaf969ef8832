"""Lean metric instruments for the request path: fixed-bucket histograms and labelled counters in plain Python,
and their Prometheus families.

Why not the OpenTelemetry SDK's instruments: one SDK histogram record costs ~10 us (a Measurement object,
attribute cleaning and hashing, view matching, a lock), and an attempt records up to four; a dict lookup, a bisect
and two additions keep the same figures. They are the source of ``GET /metrics``. The SDK instruments exist only
when metrics are also pushed over OTLP (:class:`gateway.observability.telemetry.Telemetry` creates them then): a
histogram forwards each record to its SDK twin, which keeps the SDK's exemplars on the pushed data; a counter is
read by an SDK observable counter at export time.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.metrics import Histogram as SdkHistogram
from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
#: OTel unit -> Prometheus name suffix; curly-brace units ("{token}") add none.
_UNIT_SUFFIX = {"s": "seconds"}


def prom_name(name: str, unit: str | None) -> str:
    """OTel instrument name -> Prometheus family name (dots to underscores, unit suffix, as the OTel mapping)."""
    base = _NAME_BAD.sub("_", name)
    suffix = _UNIT_SUFFIX.get(unit or "", "")
    return f"{base}_{suffix}" if suffix and not base.endswith("_" + suffix) else base


def prom_labels(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    """OTel attributes -> Prometheus labels (names sanitised, sequences as JSON), as the OTel mapping."""
    out: dict[str, str] = {}
    for k, v in (attributes or {}).items():
        out[_NAME_BAD.sub("_", str(k)).replace(":", "_")] = json.dumps(list(v)) if isinstance(v, (list, tuple)) else str(v)
    return out


#: A series' attributes as (name, value) pairs, in a fixed order: hashable, so it is the series' key as it is.
Attributes = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Spec:
    """One instrument: its OTel name, unit and description (the Prometheus name and HELP derive from them), and
    the bucket boundaries of a histogram."""

    name: str
    unit: str
    description: str
    buckets: tuple[float, ...] = ()


class Histogram:
    """Cumulative explicit-bucket histogram, one series per attribute set (in the order first recorded).

    A value equal to a boundary counts in that boundary's bucket, as in OTel (``bisect_left``). A series is a
    list: the count of each bucket (the last one past every boundary), then the sum."""

    __slots__ = ("spec", "series", "_bounds", "_sdk")

    def __init__(self, spec: Spec, sdk: SdkHistogram | None = None) -> None:
        self.spec = spec
        self.series: dict[Attributes, list[Any]] = {}
        self._bounds = spec.buckets
        self._sdk = sdk

    def record(self, value: float, attrs: Attributes) -> None:
        row = self.series.get(attrs)
        if row is None:
            row = self.series[attrs] = [0] * (len(self._bounds) + 2)
        row[bisect_left(self._bounds, value)] += 1
        row[-1] += value
        if self._sdk is not None:
            self._sdk.record(value, dict(attrs))

    def family(self) -> Metric | None:
        """The Prometheus histogram family; None before the first record (the SDK reports no metric then)."""
        if not self.series:
            return None
        name = prom_name(self.spec.name, self.spec.unit)
        fam = Metric(name, self.spec.description, "histogram")
        for key, row in list(self.series.items()):
            base = prom_labels(dict(key))
            cum = 0
            for bound, n in zip(self._bounds, row):
                cum += n
                fam.add_sample(f"{name}_bucket", {**base, "le": floatToGoString(bound)}, cum)
            count = cum + row[-2]
            fam.add_sample(f"{name}_bucket", {**base, "le": "+Inf"}, count)
            fam.add_sample(f"{name}_count", base, count)
            fam.add_sample(f"{name}_sum", base, row[-1])
        return fam


class Counter:
    """Monotonic counts keyed by a tuple of label values: a dict increment on the request path (~0.2 us)."""

    __slots__ = ("spec", "labels", "counts")

    def __init__(self, spec: Spec, labels: tuple[str, ...]) -> None:
        self.spec = spec
        self.labels = labels
        self.counts: dict[tuple[str, ...], int] = {}

    def add(self, key: tuple[str, ...]) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        """Callback of the SDK observable counter. Readers may call it from their own thread: ``dict(counts)`` is
        one C-level copy under the GIL, safe against concurrent increments."""
        return [Observation(n, dict(zip(self.labels, key))) for key, n in dict(self.counts).items()]

    def family(self) -> Metric | None:
        """The Prometheus counter family (samples ``<name>_total``); None before the first count."""
        if not self.counts:
            return None
        fam = Metric(prom_name(self.spec.name, self.spec.unit), self.spec.description, "counter")
        for key, n in list(self.counts.items()):
            fam.add_sample(f"{fam.name}_total", dict(zip(self.labels, key)), n)
        return fam
