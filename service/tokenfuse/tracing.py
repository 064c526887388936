"""OpenTelemetry traces: one span per request the processor decides (docs/design.md,
"Traces").

Off unless `config.TracingSettings.enabled` (an OTLP endpoint is set): then nothing of the
SDK is imported and each hook in `extproc/` is one `ex.trace is not None` test. On: a
SERVER span per request, a child of the client's span when its `traceparent` is valid
(W3C Trace Context; a malformed one is ignored: a new root), named `{operation} {model}`
(the GenAI conventions' inference span), with the GenAI attributes and tokenfuse's own
(`tokenfuse.*`); events for the reservation and the settlement (with their durations),
the first response byte and a stream cut. Spans are batched (BatchSpanProcessor) and
exported over OTLP/HTTP protobuf by each worker process (the attribute list is long,
hence its length).

What is never recorded: keys (only the keyed hash's prefix, `identity.PREFIX_CHARS`), the
prompt, the answer, headers, paths (a path may hold a model id or, before tokenfuse moves
it, a key in its query).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tokenfuse.config import ConfigError, TracingSettings
from tokenfuse.identity import PREFIX_CHARS
from tokenfuse.state.results import LoopRefusal, Refusal, Reservation

if TYPE_CHECKING:
    from tokenfuse.extproc.exchange import Exchange

log = logging.getLogger("tokenfuse.tracing")

#: The W3C Trace Context headers tokenfuse reads from the client and sets upstream.
TRACE_HEADERS = ("traceparent", "tracestate")
SERVICE_NAME = "tokenfuse"
#: Model names and finish reasons are the client's (or the upstream's) text: cut to this
#: in a span, so a megabyte model name cannot make every export batch it sits in too large
#: for the collector (the other callers' spans would be dropped with it).
TEXT_CHARS = 256


def _bounded(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 3] + "..."


class Tracing:
    """The SDK of one processor process: tracer, W3C propagator, batch exporter."""

    def __init__(self, settings: TracingSettings, worker: int | None = None,
                 processor: Any = None) -> None:
        """`processor`: a span processor instead of the OTLP batch exporter (benchmarks)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError as exc:
            # xds-protos ships an older opentelemetry/proto/ over opentelemetry-proto's
            # files when pip installs it last (scripts/setup.sh repairs that).
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter cannot load "
                f"({exc}); reinstall opentelemetry-proto after xds-protos: pip install "
                "--force-reinstall --no-deps opentelemetry-proto") from None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (read by the SDK) win over these.
        resource = Resource.create()
        named = not str(resource.attributes.get("service.name", "")).startswith(
            "unknown_service")
        try:
            release = version("tokenfuse")
        except PackageNotFoundError:
            release = "unknown"
        attributes: dict[str, Any] = {"service.version": release,
                                      "service.instance.id": uuid.uuid4().hex}
        if worker is not None:
            attributes["tokenfuse.worker"] = worker
        attributes.update(resource.attributes)  # the operator's values win
        if not named:
            attributes["service.name"] = SERVICE_NAME
        self.provider = TracerProvider(resource=Resource(attributes, resource.schema_url))
        # The endpoint config.py chose; headers, timeout, compression, TLS files and the
        # batch sizes/delays are the SDK's reading of the standard OTEL_* variables.
        self.provider.add_span_processor(processor or BatchSpanProcessor(
            OTLPSpanExporter(endpoint=settings.endpoint)))
        self.tracer = self.provider.get_tracer("tokenfuse", release)
        self.propagator = TraceContextTextMapPropagator()
        self.in_context = set_span_in_context
        self.error = lambda description: Status(StatusCode.ERROR, description)
        self._server = SpanKind.SERVER

    def begin(self, headers: Mapping[str, str]) -> CallTrace:
        """The span of one request, from its headers (the client's trace context)."""
        carrier = {h: headers[h] for h in TRACE_HEADERS if h in headers}
        parent = self.propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span("tokenfuse", context=parent, kind=self._server)
        return CallTrace(self, span)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        try:
            self.provider.shutdown()
        except Exception as exc:  # never let telemetry stop a shutdown
            log.warning("trace export at shutdown failed: %s", type(exc).__name__)


class CallTrace:
    """One request's span. Attributes gather in a dict and are set once, at the end (the
    SDK cleans and locks per call); the reservation and the settlement are events with
    their duration, not child spans (a child span cost the request path and the exporter
    1.2-2x an event in paired runs: bench/tracing.py, docs/design.md "Traces")."""

    __slots__ = ("_attributes", "_ended", "_error", "_forwarded_ns", "_span", "_tracing")

    def __init__(self, tracing: Tracing, span: Any) -> None:
        self._tracing = tracing
        self._span = span
        self._attributes: dict[str, Any] = {}
        self._error = ""  # the span's status description when it ends in error
        self._forwarded_ns = 0
        self._ended = False  # a stream a drain cut may be ended by its handler and the drain

    def outgoing(self) -> tuple[tuple[str, str], ...]:
        """`traceparent` (and `tracestate`) for the upstream request: this span as its
        parent, so an instrumented upstream (vLLM, Ollama, a gateway) joins the trace."""
        carrier: dict[str, str] = {}
        tracing = self._tracing
        tracing.propagator.inject(carrier, context=tracing.in_context(self._span))
        return tuple((h, carrier[h]) for h in TRACE_HEADERS if h in carrier)

    def decided(self, started_ns: int, result: object) -> None:
        """The reservation's one Lua decision (an event at its start, with its duration)."""
        event: dict[str, Any] = {"tokenfuse.duration_us": (time.time_ns() - started_ns) // 1000}
        if isinstance(result, Reservation):
            event["tokenfuse.decision"] = "allowed"
            event["tokenfuse.reserved_nano_usd"] = result.granted_nano
        elif isinstance(result, Refusal):
            event["tokenfuse.decision"] = "refused"
            event["tokenfuse.refusal"] = result.reason
            event["tokenfuse.window"] = self._attributes["tokenfuse.window"] = result.window
        elif isinstance(result, LoopRefusal):
            event["tokenfuse.decision"] = "refused"
            event["tokenfuse.refusal"] = result.kind
        else:
            event["tokenfuse.decision"] = "error"  # the state store did not answer
        self._span.add_event("tokenfuse.reserve", event, timestamp=started_ns)

    def refused(self, status: int, code: str) -> None:
        """tokenfuse answered the client itself (a refusal or a fail-closed 503)."""
        self._attributes.update({"tokenfuse.decision": "error" if status >= 500
                                 else "refused", "tokenfuse.refusal": code,
                                 "error.type": code, "http.response.status_code": status})
        self._error = code

    def forwarded(self) -> None:
        """The body went on (the reservation event's end; no event of its own)."""
        self._forwarded_ns = time.time_ns()
        self._attributes["tokenfuse.decision"] = "allowed"

    def first_byte(self) -> None:
        """The first response message: time to first chunk, from the forwarding."""
        now = time.time_ns()
        self._span.add_event("tokenfuse.first_byte", timestamp=now)
        if self._forwarded_ns:
            self._attributes["gen_ai.response.time_to_first_chunk"] = (
                (now - self._forwarded_ns) / 1e9)

    def answered(self, model: str, finish_reasons: tuple[str, ...]) -> None:
        if model:
            self._attributes["gen_ai.response.model"] = _bounded(model)
        if finish_reasons:
            self._attributes["gen_ai.response.finish_reasons"] = tuple(
                _bounded(reason) for reason in finish_reasons)

    def streamed(self, model: str, finish_reasons: tuple[str, ...]) -> None:
        """One stream event's facts: the first model named; every finish reason, in the
        order the choices finished."""
        attributes = self._attributes
        if model and "gen_ai.response.model" not in attributes:
            attributes["gen_ai.response.model"] = _bounded(model)
        if finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = (
                attributes.get("gen_ai.response.finish_reasons", ())
                + tuple(_bounded(reason) for reason in finish_reasons))

    def cut(self, reason: str, window: str, counted_output: int) -> None:
        """tokenfuse ended a stream (budget, kill switch, state store gone)."""
        self._span.add_event("tokenfuse.stream_cut", {
            "tokenfuse.refusal": reason, "tokenfuse.window": window,
            "tokenfuse.output_tokens_counted": counted_output})
        self._attributes.update({"tokenfuse.refusal": reason, "tokenfuse.window": window,
                                 "error.type": reason,
                                 "gen_ai.response.finish_reasons": ("error",)})
        self._error = f"stream cut: {reason}"

    def settled(self, started_ns: int, basis: str, actual_nano: int, ok: bool) -> None:
        """The settlement (an event at its start, with its duration); the spend."""
        self._span.add_event("tokenfuse.settle", {
            "tokenfuse.settlement": basis, "tokenfuse.spend_nano_usd": actual_nano,
            "tokenfuse.settled": ok,
            "tokenfuse.duration_us": (time.time_ns() - started_ns) // 1000},
            timestamp=started_ns)
        self._attributes["tokenfuse.settlement"] = basis
        self._attributes["tokenfuse.spend_nano_usd"] = actual_nano

    def end(self, ex: Exchange) -> None:
        """The request is over: what the exchange learnt, then the span ends (once)."""
        if self._ended:
            return
        self._ended = True
        span = self._span
        try:
            if span.is_recording():
                attributes = _exchange_attributes(ex)
                attributes.update(self._attributes)
                if ex.status >= 400 and not self._error:
                    attributes["error.type"] = self._error = str(ex.status)
                span.set_attributes(attributes)
                call, provider = ex.call, ex.provider
                if call is not None and provider is not None:
                    span.update_name(f"{provider.genai_operation(call.endpoint)} "
                                     f"{_bounded(call.model)}".strip())
                if self._error:
                    span.set_status(self._tracing.error(self._error))
        finally:
            span.end()


def _exchange_attributes(ex: Exchange) -> dict[str, Any]:
    """GenAI and tokenfuse attributes from one exchange (never a key, prompt or answer)."""
    out: dict[str, Any] = {}
    provider, call, usage = ex.provider, ex.call, ex.usage
    if provider is not None:
        out["gen_ai.provider.name"] = provider.genai_provider or ex.provider_name
        out["tokenfuse.provider"] = ex.provider_name
    if ex.caller:
        out["tokenfuse.key_id_prefix"] = ex.caller[:PREFIX_CHARS]
    if ex.pool:
        out["tokenfuse.pool"] = ex.pool
    if ex.pool_key:
        out["tokenfuse.pool_key_id_prefix"] = ex.pool_key[:PREFIX_CHARS]
    if ex.status:
        out["http.response.status_code"] = ex.status
    if ex.reserved_nano:
        out["tokenfuse.reserved_nano_usd"] = ex.reserved_nano
    if call is not None and provider is not None:
        out["gen_ai.operation.name"] = provider.genai_operation(call.endpoint)
        if call.model:
            out["gen_ai.request.model"] = _bounded(call.model)
        if call.stream:
            out["gen_ai.request.stream"] = True
        if call.max_output_tokens is not None:
            out["gen_ai.request.max_tokens"] = call.max_output_tokens
        if call.choices != 1:
            out["gen_ai.request.choice.count"] = call.choices
        asked = (None if call.max_output_tokens is None
                 else call.max_output_tokens * call.choices)
        if ex.output_cap is not None and ex.output_cap != asked:
            # The output bound the call ran under (all choices): the model's when the
            # request gave none, the clamp tokenfuse wrote in when it lowered it.
            out["tokenfuse.output_cap"] = ex.output_cap
    if ex.meter is not None:
        out["tokenfuse.output_tokens_counted"] = ex.counted_output
    if usage is not None:
        # The conventions' input count includes cache reads and writes; output includes
        # reasoning (TokenUsage keeps reasoning reported apart out of `output`).
        out["gen_ai.usage.input_tokens"] = usage.total_input
        out["gen_ai.usage.output_tokens"] = usage.output + usage.reasoning
        if usage.cache_read:
            out["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read
        if usage.cache_write or usage.cache_write_1h:
            out["gen_ai.usage.cache_write.input_tokens"] = (usage.cache_write
                                                            + usage.cache_write_1h)
        if usage.reasoning:
            out["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning
    return out


def start_tracing(settings: TracingSettings, worker: int | None = None) -> Tracing | None:
    """The process's tracing, or None when it is off (no SDK is loaded)."""
    if not settings.enabled:
        return None
    tracing = Tracing(settings, worker)
    log.info("traces exported over OTLP/HTTP to %s", _origin(settings.endpoint))
    return tracing


def _origin(url: str) -> str:
    """scheme://host:port of the endpoint (a URL may carry credentials or a token)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
