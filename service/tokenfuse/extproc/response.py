"""The response phases. Envoy streams responses in FULL_DUPLEX_STREAMED mode: the
processor echoes what the client may see. JSON bodies are echoed chunk by chunk and
settled from their usage at the end. Event streams are metered event by event: before an
event whose tokens the reservation does not cover is forwarded, the reservation is
extended; if that is refused the stream ends with a provider-native error event (Envoy
then closes the upstream, so the provider stops generating)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from decimal import Decimal

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tokenfuse import metrics
from tokenfuse.contract import EXT_PROC_FILTER, INTERNAL_HEADER_PREFIX, POOL_KEY_HEADER
from tokenfuse.extproc.answers import (
    CONTINUE_RESPONSE_HEADERS,
    header_mutation_response,
    headers_of,
    stream_chunk,
)
from tokenfuse.extproc.exchange import Exchange
from tokenfuse.extproc.runtime import Runtime, log
from tokenfuse.extproc.settlement import Settlement, may_be_success
from tokenfuse.metering.response_coding import CorruptBody, Transcoder, decode_whole, sniff
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.policy import refusals, reservation
from tokenfuse.policy.loopguard import answer_fingerprint
from tokenfuse.pricing import cost_nano
from tokenfuse.state.connection import REDIS_FAILURES
from tokenfuse.state.results import Refusal


class ResponsePhase:
    def __init__(self, runtime: Runtime, settlement: Settlement) -> None:
        self._rt = runtime
        self._settlement = settlement

    async def on_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        # Only gateway-key requests send response headers (contract.PROCESSING_MODE).
        headers = headers_of(msg)
        try:
            ex.status = int(headers.get(":status", "0"))
        except ValueError:
            ex.status = 0
        internal = tuple(h for h in headers if h.startswith(INTERNAL_HEADER_PREFIX))
        if not internal:
            return CONTINUE_RESPONSE_HEADERS
        # The pooled cluster named the key of the final attempt (failures were reported
        # per attempt by the upstream filter); the client sees none of this.
        ex.pool_key = headers.get(POOL_KEY_HEADER, "") if ex.pool else ""
        return header_mutation_response("response_headers", (), internal)

    def start(self, ex: Exchange, message: pb.ProcessingRequest) -> None:
        """First response message: its status (an attribute, as response headers are not
        sent)."""
        ex.response_started = True
        ex.first_byte_ns = time.monotonic_ns()
        if ex.trace is not None:
            ex.trace.first_byte()
        if not ex.status:
            ex.status = _response_code(message)
            if ex.pool:  # the gateway-key route match in the Envoy config missed this key
                log.warning("gateway-key response without headers; its pool key is unknown "
                            "(rid=%s)", ex.request_id)

    def _begin(self, ex: Exchange, first: bytes) -> None:
        """The first bytes are known: is the body compressed, and is it an event stream to
        meter?"""
        coding = ex.response_coding
        if coding and ex.open_reservation:
            log.warning("%s compressed its response (%s) although asked for identity; "
                        "decoded to count its tokens (rid=%s)", ex.provider_name, coding,
                        ex.request_id)
        if not (ex.open_reservation and ex.call is not None and ex.call.stream
                and ex.provider is not None and may_be_success(ex.status)):
            return
        if coding:
            ex.transcoder = Transcoder(coding)
        else:
            ex.provider = ex.provider.for_answer(first)
            if not ex.provider.is_event_stream(first):
                return
        ex.meter = StreamMeter(ex.provider, ex.call.hide_usage_chunk,
                               ex.provider.tokenizer(ex.call.model),
                               hash_answer=ex.near_fingerprint is not None,
                               facts=ex.trace is not None)

    async def on_body(self, ex: Exchange, msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if ex.ended:
            return []  # the processor already ended this response
        body, end = msg.body, msg.end_of_stream
        if ex.response_coding is None:
            head = ex.response_head + body
            coding = sniff(head)
            if coding is None and not end:
                ex.response_head = head  # a byte or two: wait for the magic number
                return []
            body, ex.response_head, ex.response_coding = head, b"", coding or ""
            self._begin(ex, body)
        if ex.meter is None:
            if ex.open_reservation:
                ex.body_chunks.append(body)
                if end:
                    self._read_json(ex, b"".join(ex.body_chunks))
                    await self._settlement.settle_from(ex)
            return [stream_chunk(body, end)]
        return await self._meter_stream(ex, ex.meter, body, end)

    def _read_json(self, ex: Exchange, raw: bytes) -> None:
        if not may_be_success(ex.status) or ex.provider is None:
            return
        if ex.response_coding:
            try:
                raw = decode_whole(raw, ex.response_coding, JSON_RESPONSE_LIMIT)
            except CorruptBody as exc:
                log.warning("undecodable response from %s (rid=%s): %s", ex.provider_name,
                            ex.request_id, exc)
                return
        try:
            payload = json.loads(raw, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            log.warning("unparseable JSON response from %s (rid=%s)", ex.provider_name,
                        ex.request_id)
            return
        if isinstance(payload, dict):
            ex.usage = ex.provider.usage(payload)
            if ex.trace is not None:
                ex.trace.answered(*ex.provider.response_facts(payload))
            if ex.near_fingerprint is not None:
                ex.answer = answer_fingerprint(ex.provider.response_output(payload))

    async def _meter_stream(self, ex: Exchange, meter: StreamMeter, body: bytes,
                            end: bool) -> list[pb.ProcessingResponse]:
        assert ex.provider is not None
        out = bytearray()
        if ex.transcoder is not None:
            try:
                body = ex.transcoder.decode(body)
            except CorruptBody as exc:
                # Nothing more can be read: deliver what was, end, settle from the count.
                log.warning("undecodable stream from %s (rid=%s): %s", ex.provider_name,
                            ex.request_id, exc)
                body, end, ex.ended = b"", True, True
        control = self._rt.control
        if control is not None and control.version(ex.caller) != ex.control_version:
            # An operator changed this caller (kill switch, lower budget): re-check now.
            ex.control_version = control.version(ex.caller)
            refusal = await self._recheck(ex)
            if refusal is not None:
                # Nothing of this chunk is delivered; its tokens were generated all the same.
                events = meter.feed(body, end)
                ex.counted_output += sum(e.output_tokens for e in events)
                return await self._end_stream(ex, out, refusal)
        for event in meter.feed(body, end):
            if event.facts is not None and ex.trace is not None:
                ex.trace.streamed(*event.facts)
            if event.usage is not None:
                ex.usage = ex.provider.merge_usage(ex.usage, event.usage)
                _input_reported(ex)
            if event.output_tokens:
                refusal = await self._cover(ex, event.output_tokens)
                if refusal is not None:
                    out += meter.take(event.start)
                    ex.counted_output += event.output_tokens  # generated, not delivered
                    return await self._end_stream(ex, out, refusal)
                ex.counted_output += event.output_tokens
            if event.hidden:
                out += meter.take(event.start)
                meter.drop(event.end)
            if event.final:
                ex.final_seen = True
                # Settled before the client gets the last event: when the SDK's call
                # returns, the budget already shows what the call cost.
                await self._settlement.settle_from(ex)
        if end:
            out += meter.rest()
            await self._settlement.settle_from(ex)
        else:
            # Forward every complete event; keep a partial one until it completes.
            out += meter.take(meter.complete_end)
        if not out and not end:
            return []
        return [stream_chunk(_wire(ex, bytes(out), end), end)]

    async def _end_stream(self, ex: Exchange, out: bytearray,
                          refusal: Refusal) -> list[pb.ProcessingResponse]:
        """Send what may be delivered, then the provider-native error event, and end."""
        assert ex.provider is not None
        metrics.STREAMS_CUT.labels(refusal.reason).inc()
        log.info("stream cut rid=%s reason=%s after %d output tokens", ex.request_id,
                 refusal.reason, ex.counted_output)
        out += refusals.cut_event(ex.provider, refusal, ex.counted_output)
        ex.ended = True
        ex.cut = refusal.reason
        self._rt.log_event(ex, "stream.cut", {
            "reason": refusal.reason, "window": refusal.window,
            "output_tokens_delivered": ex.counted_output})
        if ex.trace is not None:
            ex.trace.cut(refusal.reason, refusal.window, ex.counted_output)
        await self._settlement.settle_unfinished(ex)
        return [stream_chunk(_wire(ex, bytes(out), True), True)]

    async def _recheck(self, ex: Exchange) -> Refusal | None:
        """Is this stream still allowed (not killed, not over a lowered limit)?"""
        if not ex.open_reservation:
            return None
        try:
            async with asyncio.timeout(self._rt.redis_timeout):
                result = await self._rt.store.extend(ex.caller, ex.request_id, 0, 0)
        except REDIS_FAILURES:
            metrics.REDIS_ERRORS.labels("recheck").inc()
            return None  # the next extension decides
        return result if isinstance(result, Refusal) else None

    async def _cover(self, ex: Exchange, tokens: int) -> Refusal | None:
        """Make sure the reservation covers `tokens` more output, plus the grace for what
        the provider generates after a cut. Extends in steps; None when covered."""
        streams = self._rt.settings.streams
        if reservation.covered(ex.counted_output, tokens, ex.output_allowance, ex.output_cap,
                               streams.grace_tokens):
            return None
        if not ex.open_reservation or ex.price is None:
            return Refusal("reservation_gone", "total", 0, 0, 0)
        bound = ex.bound_price or ex.price  # the tier the reservation was priced at
        step = reservation.extension(ex.counted_output, tokens, ex.output_cap,
                                     ex.reserved_nano, ex.input_nano, bound, streams)
        if step is None:
            return None
        try:
            async with asyncio.timeout(self._rt.redis_timeout):
                granted = await self._rt.store.extend(ex.caller, ex.request_id,
                                                      step.desired_nano, step.minimum_nano)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("extend").inc()
            log.warning("redis unavailable on extend (rid=%s): %s", ex.request_id,
                        type(exc).__name__)
            return Refusal("state_store_unavailable", "total", 0, 0, 0)
        if isinstance(granted, Refusal):
            return granted
        metrics.EXTENSIONS.inc()
        ex.reserved_nano += granted
        ex.output_allowance = reservation.allowance(ex.reserved_nano, ex.input_nano, bound)
        log.debug("extended rid=%s by %d nano to %d output tokens", ex.request_id, granted,
                  ex.output_allowance)
        return None


def _input_reported(ex: Exchange) -> None:
    """The provider reported the input before the output (Anthropic `message_start`): the
    reservation's output allowance is what is left after the real input, not after its
    bound (Claude's is cl100k x 2.05), so a stream is not cut early for the bound's sake.
    Not when server-side work (tools, stored context) can still add input."""
    call, usage = ex.call, ex.usage
    if (ex.input_exact or call is None or ex.price is None or usage is None
            or not usage.total_input or usage.output > FIRST_OUTPUT_TOKENS
            or call.server_context or call.server_tool_uses):
        return
    ex.input_exact = True
    actual = cost_nano(ex.price, replace(usage, output=0, reasoning=0))
    if actual < ex.input_nano:
        ex.input_nano = actual
        ex.output_allowance = reservation.allowance(ex.reserved_nano, ex.input_nano,
                                                    ex.bound_price or ex.price)


#: A usage whose output is at most this is a start-of-stream report (Anthropic's
#: `message_start` says 1), not a final one.
FIRST_OUTPUT_TOKENS = 1

#: Largest compressed JSON response decoded for its usage (larger: settled as unreadable).
JSON_RESPONSE_LIMIT = 64 << 20


def _wire(ex: Exchange, plain: bytes, end: bool) -> bytes:
    """What the client gets: the plain bytes, in the upstream's coding if it used one."""
    return plain if ex.transcoder is None else ex.transcoder.encode(plain, end)


def _response_code(message: pb.ProcessingRequest) -> int:
    """The `response.code` attribute Envoy attaches to the first response message."""
    attributes = message.attributes.get(EXT_PROC_FILTER)
    if attributes is None or "response.code" not in attributes.fields:
        return 0
    return int(attributes.fields["response.code"].number_value)
