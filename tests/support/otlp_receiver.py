"""A local OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest
(protobuf, gzip or not), decoded with opentelemetry-proto; the spans are kept as plain
values for the tests to read (tests/test_tracing.py, bench/tracing.py)."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.support.background_server import BackgroundServer


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass
class Event:
    name: str
    attributes: dict[str, Any]
    time_ns: int = 0


@dataclass
class ReceivedSpan:
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root
    attributes: dict[str, Any]
    events: list[Event]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    resource: dict[str, Any]
    start_ns: int = 0
    end_ns: int = 0
    children: list[ReceivedSpan] = field(default_factory=list)

    def values(self) -> list[Any]:
        """Every attribute and event attribute value, and every name (for secret scans)."""
        out: list[Any] = [self.name, self.status_message, *self.attributes.values(),
                          *self.resource.values()]
        for event in self.events:
            out += [event.name, *event.attributes.values()]
        return out


class OtlpReceiver(BackgroundServer):
    thread_name = "otlp-receiver"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0  # export requests received

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT is set to (the exporter adds /v1/traces)."""
        return self.base_url

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self.requests = 0

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def request_span(self, attribute: str, value: Any) -> ReceivedSpan | None:
        """The SERVER span whose `attribute` is `value`, its child spans attached."""
        spans = self.spans
        for span in spans:
            if span.kind == 2 and span.attributes.get(attribute) == value:
                span.children = [s for s in spans if s.parent_span_id == span.span_id
                                 and s.trace_id == span.trace_id]
                return span
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST" or request.path != "/v1/traces":
            return web.Response(status=404)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        raw = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        export = ExportTraceServiceRequest.FromString(raw)
        spans = []
        for resource_spans in export.resource_spans:
            resource = {kv.key: _value(kv.value)
                        for kv in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    spans.append(ReceivedSpan(
                        name=span.name, kind=span.kind, trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        events=[Event(e.name, {kv.key: _value(kv.value)
                                               for kv in e.attributes}, e.time_unix_nano)
                                for e in span.events],
                        status_code=span.status.code, status_message=span.status.message,
                        resource=resource, start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano))
        with self._lock:
            self._spans += spans
            self.requests += 1
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")
