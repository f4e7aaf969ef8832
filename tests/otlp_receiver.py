"""A real OTLP/HTTP (protobuf) receiver for tests.

    receiver = OTLPReceiver()
    endpoint = await receiver.start()          # "http://127.0.0.1:PORT"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    ...
    spans = await receiver.wait_for(lambda s: s["name"] == "chat m")
    await receiver.stop()

or use the ``otlp_receiver`` fixture (``from tests.otlp_receiver import otlp_receiver``).

Spans are stored as plain dicts::

    {"name", "trace_id" (32 hex), "span_id" (16 hex), "parent_span_id" (16 hex or ""),
     "kind" ("SERVER", "CLIENT", "INTERNAL", ...), "attributes": {key: python value},
     "status_code" ("UNSET" | "OK" | "ERROR"), "status_message", "start_time_unix_nano",
     "end_time_unix_nano", "events": [{"name", "attributes"}], "scope": name,
     "resource": {key: python value}}

Metrics (``receiver.metrics``) as ``{"name", "unit", "description", "type" ("sum" |
"gauge" | "histogram" | "exponential_histogram"), "data_points": [...], "resource"}``
with histogram points ``{"attributes", "count", "sum", "bucket_counts", "explicit_bounds"}``
and number points ``{"attributes", "value"}``.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OTLPReceiver", "otlp_receiver", "any_value"]

_PROTOBUF = "application/x-protobuf"


def any_value(v: common_pb2.AnyValue) -> Any:
    """OTLP AnyValue -> Python value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def _kind(k: int) -> str:
    return trace_pb2.Span.SpanKind.Name(k).removeprefix("SPAN_KIND_")


def _status(code: int) -> str:
    return trace_pb2.Status.StatusCode.Name(code).removeprefix("STATUS_CODE_")


def _hist_point(dp: Any) -> dict[str, Any]:
    return {
        "attributes": _attrs(dp.attributes),
        "count": dp.count,
        "sum": dp.sum if dp.HasField("sum") else None,
        "bucket_counts": list(dp.bucket_counts),
        "explicit_bounds": list(dp.explicit_bounds),
    }


def _number_point(dp: Any) -> dict[str, Any]:
    which = dp.WhichOneof("value")
    return {"attributes": _attrs(dp.attributes), "value": getattr(dp, which) if which else None}


class OTLPReceiver:
    """aiohttp OTLP/HTTP receiver on 127.0.0.1 (random port)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        #: (path, content-type, content-encoding) of every export request received.
        self.requests: list[tuple[str, str, str]] = []
        self.endpoint: str = ""
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Condition | None = None

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> str:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_post("/v1/logs", self._logs)
        # Bodies are decompressed here, per Content-Encoding, not by aiohttp.
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- waiting ---------------------------------------------------------------------
    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda s: True,
        timeout: float = 10.0,
        *,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` received spans satisfy ``predicate``; return them."""
        return await self._wait(lambda: [s for s in self.spans if predicate(s)], count, timeout, "spans")

    async def wait_for_metric(
        self,
        predicate: Callable[[dict[str, Any]], bool] = lambda m: True,
        timeout: float = 10.0,
        *,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """Same as :meth:`wait_for`, over received metrics."""
        return await self._wait(lambda: [m for m in self.metrics if predicate(m)], count, timeout, "metrics")

    async def _wait(self, select: Callable[[], list[dict[str, Any]]], count: int, timeout: float, what: str) -> list[dict[str, Any]]:
        assert self._changed is not None, "receiver not started"
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                found = select()
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    got = self.spans if what == "spans" else self.metrics
                    names = [x.get("name") for x in got]
                    raise TimeoutError(
                        f"OTLP receiver: {len(found)}/{count} matching {what} after {timeout}s; "
                        f"received {len(got)} {what}: {names[:50]}"
                    )
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    pass

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    # ---- handlers --------------------------------------------------------------------
    async def _body(self, request: web.Request) -> bytes | web.Response:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        enc = request.headers.get("Content-Encoding", "").strip().lower()
        self.requests.append((request.path, ctype, enc))
        if ctype != _PROTOBUF:
            return web.Response(status=415, text=f"unsupported content type {ctype!r}")
        raw = await request.read()
        try:
            if enc == "gzip":
                raw = gzip.decompress(raw)
            elif enc == "deflate":
                raw = zlib.decompress(raw)
            elif enc not in ("", "identity"):
                return web.Response(status=415, text=f"unsupported content encoding {enc!r}")
        except (OSError, zlib.error) as exc:
            return web.Response(status=400, text=f"bad {enc} body: {exc}")
        return raw

    async def _traces(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        req = trace_service_pb2.ExportTraceServiceRequest()
        try:
            req.ParseFromString(body)
        except Exception as exc:  # protobuf DecodeError
            return web.Response(status=400, text=f"cannot decode ExportTraceServiceRequest: {exc}")
        for rs in req.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    self.spans.append(
                        {
                            "name": sp.name,
                            "trace_id": sp.trace_id.hex(),
                            "span_id": sp.span_id.hex(),
                            "parent_span_id": sp.parent_span_id.hex(),
                            "kind": _kind(sp.kind),
                            "attributes": _attrs(sp.attributes),
                            "status_code": _status(sp.status.code),
                            "status_message": sp.status.message,
                            "start_time_unix_nano": sp.start_time_unix_nano,
                            "end_time_unix_nano": sp.end_time_unix_nano,
                            "events": [{"name": e.name, "attributes": _attrs(e.attributes)} for e in sp.events],
                            "scope": ss.scope.name,
                            "resource": resource,
                        }
                    )
        await self._notify()
        resp = trace_service_pb2.ExportTraceServiceResponse()
        return web.Response(body=resp.SerializeToString(), content_type=_PROTOBUF)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        req = metrics_service_pb2.ExportMetricsServiceRequest()
        try:
            req.ParseFromString(body)
        except Exception as exc:
            return web.Response(status=400, text=f"cannot decode ExportMetricsServiceRequest: {exc}")
        for rm in req.resource_metrics:
            resource = _attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    typ = m.WhichOneof("data") or ""
                    data = getattr(m, typ) if typ else None
                    if typ == "histogram":
                        points = [_hist_point(dp) for dp in data.data_points]
                    elif typ in ("sum", "gauge"):
                        points = [_number_point(dp) for dp in data.data_points]
                    elif typ == "exponential_histogram":
                        points = [{"attributes": _attrs(dp.attributes), "count": dp.count, "sum": dp.sum} for dp in data.data_points]
                    else:
                        points = []
                    self.metrics.append(
                        {
                            "name": m.name,
                            "unit": m.unit,
                            "description": m.description,
                            "type": typ,
                            "data_points": points,
                            "scope": sm.scope.name,
                            "resource": resource,
                        }
                    )
        await self._notify()
        resp = metrics_service_pb2.ExportMetricsServiceResponse()
        return web.Response(body=resp.SerializeToString(), content_type=_PROTOBUF)

    async def _logs(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        return web.Response(body=b"", content_type=_PROTOBUF)


@pytest_asyncio.fixture
async def otlp_receiver() -> AsyncIterator[OTLPReceiver]:
    """A started :class:`OTLPReceiver`; ``otlp_receiver.endpoint`` is its base URL."""
    receiver = OTLPReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()
