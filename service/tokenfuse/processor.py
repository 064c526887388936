"""The ext_proc service: one gRPC stream per HTTP request.

Request headers identify the caller and the provider; the request body is priced and
reserved in one Lua call. Responses arrive in FULL_DUPLEX_STREAMED mode: the processor
echoes what the client may see. JSON bodies are echoed chunk by chunk and settled from
their usage at the end. SSE bodies are metered event by event: before an event whose
tokens the reservation does not cover is forwarded, the reservation is extended; if that
is refused the stream ends with a provider-native error event (Envoy then closes the
upstream, so the provider stops generating).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tokenfuse import metrics
from tokenfuse.config import Settings
from tokenfuse.control import ControlWatcher
from tokenfuse.envoy_config import (
    EXT_PROC_FILTER,
    GRANT_HEADER,
    POOL_HEADER,
    POOL_KEY_HEADER,
    STAGE_METADATA,
)
from tokenfuse.failover import PoolAttempts, grant, headers_of
from tokenfuse.identity import PREFIX_CHARS, VIRTUAL_KEY_PREFIX, api_key_from_headers, key_id
from tokenfuse.loopguard import fingerprint, repeated_tool_call
from tokenfuse.money import nano_to_usd
from tokenfuse.pools import PoolSecrets, PoolStore
from tokenfuse.pricing import TOKENS_PER_PRICE_UNIT, ModelPrice, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import PROVIDERS, Call, RequestRejected, provider_for_path
from tokenfuse.responses import (
    CONTINUE,
    CONTINUE_REQUEST_BODY,
    CONTINUE_REQUEST_HEADERS,
    CONTINUE_RESPONSE_HEADERS,
    continue_request,
    header_mutation_response,
    immediate,
    stream_chunk,
)
from tokenfuse.store import REDIS_FAILURES, BudgetStore, LoopRefusal, Refusal
from tokenfuse.streaming import StreamMeter
from tokenfuse.tokens import estimate_input_tokens
from tokenfuse.webhooks import WebhookSink

log = logging.getLogger("tokenfuse.processor")

VKEY_CACHE_SECONDS = 5.0
INTERNAL_HEADER_PREFIX = "x-tokenfuse-"


@dataclass
class Exchange:
    """What the processor knows about one HTTP request/response."""

    provider: str = ""
    path: str = ""
    caller: str = ""
    request_id: str = ""
    call: Call | None = None
    price: ModelPrice | None = None
    input_nano: int = 0  # estimated input cost inside the reservation
    reserved_nano: int = 0
    open_reservation: bool = False
    status: int = 0
    usage: TokenUsage | None = None
    body_chunks: list[bytes] = field(default_factory=list)
    meter: StreamMeter | None = None
    output_allowance: int = 0  # output tokens the reservation covers
    output_cap: int | None = None  # the request's own output limit
    counted_output: int = 0  # output tokens seen so far (delivered or cut)
    ended: bool = False  # the processor ended the response itself
    control_version: int = 0  # operator changes to this caller already checked
    pool: str = ""  # the caller used a gateway key bound to this pool
    pool_key: str = ""  # id of the provider key chosen from the pool
    response_started: bool = False  # the first response message has been seen


class Processor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, settings: Settings, secret: bytes, store: BudgetStore,
                 prices: PriceTable, control: ControlWatcher | None = None,
                 webhooks: WebhookSink | None = None, pools: PoolStore | None = None,
                 pool_secrets: PoolSecrets | None = None) -> None:
        self._pools = pools
        self._vkey_cache: dict[str, tuple[str | None, float]] = {}
        self._control = control
        self._webhooks = webhooks
        self._settings = settings
        self._secret = secret
        self._store = store
        self._prices = prices
        self._redis_timeout = settings.redis_timeout_ms / 1000
        self._attempts = (PoolAttempts(secret, pools, pool_secrets, self._redis_timeout)
                          if pools is not None and pool_secrets is not None else None)

    async def Process(  # gRPC method name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        if self._attempts is not None and _is_upstream_stage(context):
            # The pooled cluster's upstream filter: one provider attempt.
            async for answer in self._attempts.process(request_iterator):
                yield answer
            return
        ex = Exchange()
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    yield await self._on_request_headers(ex, message.request_headers)
                elif kind == "request_body":
                    yield await self._on_request_body(ex, message.request_body)
                elif kind == "response_headers":
                    yield await self._on_response_headers(ex, message.response_headers)
                elif kind == "response_body":
                    if not ex.response_started:
                        self._start_response(ex, message)
                    for answer in await self._on_response_body(ex, message.response_body):
                        yield answer
                elif kind == "request_trailers":
                    yield CONTINUE["request_trailers"]
                elif kind == "response_trailers":
                    if not ex.response_started:
                        self._start_response(ex, message)
                    await self._settle_from(ex)
                    yield CONTINUE["response_trailers"]
        finally:
            if ex.open_reservation:
                # Ended without a settlement (client gone, Envoy reset, upstream cut).
                await self._settle_unfinished(ex)

    # -- request -----------------------------------------------------------------------

    async def _on_request_headers(self, ex: Exchange,
                                  msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = headers_of(msg)
        path = headers.get(":path", "")
        routed = provider_for_path(path)
        if routed is None:
            return self._refuse_plain(404, "unknown_route",
                                      "no provider is routed at this path")
        ex.provider, ex.path = routed
        ex.request_id = headers.get("x-request-id") or uuid.uuid4().hex
        api_key = api_key_from_headers(headers)
        if api_key is None:
            return self._refuse(ex, 401, "authentication_error", "missing_api_key",
                                "no API key: send 'Authorization: Bearer <key>' or 'x-api-key'")
        ex.caller = key_id(self._secret, api_key)
        if api_key.startswith(VIRTUAL_KEY_PREFIX):
            refusal = await self._bind_pool(ex)
            if refusal is not None:
                return refusal
        if self._control is not None:
            ex.control_version = self._control.version(ex.caller)
        if msg.end_of_stream:
            metrics.DECISIONS.labels("allowed", "no_body", ex.provider).inc()
        forged = tuple(h for h in headers if h.startswith(INTERNAL_HEADER_PREFIX))
        if ex.pool:
            # Route to the pooled cluster; its upstream filter puts a provider key on
            # every attempt. The gateway key itself never leaves Envoy.
            route = f"{ex.provider}:{ex.pool}"
            return header_mutation_response(
                "request_headers",
                ((POOL_HEADER, route),
                 (GRANT_HEADER, grant(self._secret, route, ex.request_id))),
                ("authorization", "x-api-key", *forged), clear_route_cache=True)
        if forged:  # only tokenfuse sets these: drop them and re-pick the route
            return header_mutation_response("request_headers", (), forged,
                                            clear_route_cache=True)
        return CONTINUE_REQUEST_HEADERS

    async def _on_request_body(self, ex: Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        started = time.perf_counter()
        try:
            return await self._decide(ex, msg.body)
        finally:
            metrics.DECISION_SECONDS.observe(time.perf_counter() - started)

    async def _decide(self, ex: Exchange, raw: bytes) -> pb.ProcessingResponse:
        provider = PROVIDERS[ex.provider]
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return self._refuse(ex, 400, "invalid_request_error", "invalid_json",
                                "the request body is not valid JSON")
        if not isinstance(body, dict):
            return self._refuse(ex, 400, "invalid_request_error", "invalid_json",
                                "the request body must be a JSON object")
        try:
            call = provider.parse_request(ex.path, body)
        except RequestRejected as exc:
            return self._refuse(ex, exc.status, "invalid_request_error", exc.code, exc.message)
        ex.call = call
        if not call.priced:
            metrics.DECISIONS.labels("allowed", "free_endpoint", ex.provider).inc()
            return CONTINUE_REQUEST_BODY
        price = self._price(call.model)
        if price is None:
            return self._refuse(ex, 400, "invalid_request_error", "unknown_model",
                                f"model '{call.model}' has no price in tokenfuse; refused "
                                "(set TOKENFUSE_UNKNOWN_MODEL=price or add it to "
                                "TOKENFUSE_PRICES_FILE)")
        ex.price = price
        history = call.messages or call.prompt_parts
        tool_loop = self._tool_loop(ex, history)
        if tool_loop is not None:
            return tool_loop
        fp = None
        if self._settings.loop_max_hits > 0:
            fp = fingerprint(ex.caller, call.model, history, self._settings.loop_normalize)
        desired, minimum = self._reservation_bounds(ex, call, price)
        try:
            async with asyncio.timeout(self._redis_timeout):
                result = await self._store.reserve(ex.caller, ex.request_id, desired, minimum,
                                                   fp)
        except REDIS_FAILURES as exc:
            return self._store_unavailable(ex, "reserve", exc)
        if isinstance(result, LoopRefusal):
            return self._refuse_loop(ex, result, fp or "", call.model)
        if isinstance(result, Refusal):
            return self._refuse_budget(ex, result, desired)
        granted = result.granted_nano
        for window in result.crossed_threshold:
            self._emit(ex, "budget.threshold", {
                "window": window, "threshold_percent": self._settings.threshold_percent,
                "model": call.model})
        ex.reserved_nano = granted
        ex.open_reservation = True
        ex.output_allowance = self._allowance(ex)
        metrics.DECISIONS.labels("allowed", "within_budget", ex.provider).inc()
        log.debug("reserved caller=%s rid=%s nano=%d output_allowance=%d",
                  ex.caller[:PREFIX_CHARS], ex.request_id, granted, ex.output_allowance)
        if call.new_body is None:
            return CONTINUE_REQUEST_BODY
        return continue_request(json.dumps(call.new_body).encode())

    async def _bind_pool(self, ex: Exchange) -> pb.ProcessingResponse | None:
        """A gateway key: find its pool (cached briefly), or refuse it."""
        if self._pools is None:
            return None
        cached = self._vkey_cache.get(ex.caller)
        if cached is not None and cached[1] > time.monotonic():
            pool = cached[0]
        else:
            try:
                async with asyncio.timeout(self._redis_timeout):
                    pool = await self._pools.virtual_key_pool(ex.caller)
            except REDIS_FAILURES as exc:
                return self._store_unavailable(ex, "vkey", exc)
            self._vkey_cache[ex.caller] = (pool, time.monotonic() + VKEY_CACHE_SECONDS)
        if pool is None:
            return self._refuse(ex, 401, "authentication_error", "invalid_virtual_key",
                                "unknown tokenfuse gateway key")
        ex.pool = pool
        return None

    def _price(self, model: str) -> ModelPrice | None:
        price = self._prices.lookup(model)
        if price is None and self._settings.unknown_model_policy == "price":
            price = ModelPrice(
                model=model,
                input=self._settings.unknown_input_nano_per_mtok,
                output=self._settings.unknown_output_nano_per_mtok,
                cache_read=self._settings.unknown_input_nano_per_mtok,
                cache_write=self._settings.unknown_input_nano_per_mtok,
                max_output_tokens=0,
            )
        return price

    def _estimate(self, call: Call, price: ModelPrice) -> int:
        """Upper bound of a non-streamed call's cost: input plus the whole output cap."""
        return self._input_cost(call, price) + cost_nano(
            price, TokenUsage(output=self._output_cap(call, price) * call.choices))

    def _input_cost(self, call: Call, price: ModelPrice) -> int:
        tokens = estimate_input_tokens(
            call.prompt_parts, call.messages, self._settings.input_margin_percent
        )
        # Input may be billed at the cache-write rate, which can exceed the input rate.
        rate_usage = (TokenUsage(cache_write=tokens) if price.cache_write > price.input
                      else TokenUsage(input=tokens))
        return cost_nano(price, rate_usage)

    def _output_cap(self, call: Call, price: ModelPrice) -> int:
        if call.max_output_tokens is not None:
            return call.max_output_tokens
        cap = self._settings.default_output_tokens
        return min(cap, price.max_output_tokens) if price.max_output_tokens else cap

    def _reservation_bounds(self, ex: Exchange, call: Call, price: ModelPrice) -> tuple[int, int]:
        """(desired, minimum) nano-USD. Non-streamed calls need their whole estimate;
        streams start with an allowance (or what fits, down to the grace) and extend."""
        ex.input_nano = self._input_cost(call, price)
        if not call.stream:
            estimate = self._estimate(call, price)
            return estimate, estimate
        ex.output_cap = (call.max_output_tokens * call.choices
                         if call.max_output_tokens is not None else None)
        initial = self._settings.stream_initial_tokens
        minimum = self._settings.stream_grace_tokens + 1
        if ex.output_cap is not None:
            initial, minimum = min(initial, ex.output_cap), min(minimum, ex.output_cap)
        return (ex.input_nano + cost_nano(price, TokenUsage(output=initial)),
                ex.input_nano + cost_nano(price, TokenUsage(output=minimum)))

    def _allowance(self, ex: Exchange) -> int:
        """Output tokens the reservation covers beyond the input estimate."""
        assert ex.price is not None
        if ex.price.output == 0:
            return 1 << 62
        return (ex.reserved_nano - ex.input_nano) * TOKENS_PER_PRICE_UNIT // ex.price.output

    # -- response ----------------------------------------------------------------------

    async def _on_response_headers(self, ex: Exchange,
                                   msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        # Only gateway-key requests send response headers (envoy_config.PROCESSING_MODE).
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

    def _start_response(self, ex: Exchange, message: pb.ProcessingRequest) -> None:
        """First response message: its status (an attribute, as response headers are not
        sent) and whether it is an event stream to meter."""
        ex.response_started = True
        if not ex.status:
            ex.status = _response_code(message)
            if ex.pool:  # the gateway-key route match in envoy_config missed this key
                log.warning("gateway-key response without headers; its pool key is unknown "
                            "(rid=%s)", ex.request_id)
        if (ex.open_reservation and ex.call is not None and ex.call.stream
                and _may_be_success(ex.status)
                and not message.response_body.body.lstrip().startswith(b"{")):
            # A stream was asked for and this is not a JSON document (an error): events.
            ex.meter = StreamMeter(ex.provider, ex.call.hide_usage_chunk)

    async def _on_response_body(self, ex: Exchange,
                                msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if ex.ended:
            return []  # the processor already ended this response
        if ex.meter is None:
            if ex.open_reservation:
                ex.body_chunks.append(msg.body)
                if msg.end_of_stream:
                    self._read_json(ex, b"".join(ex.body_chunks))
                    await self._settle_from(ex)
            return [stream_chunk(msg.body, msg.end_of_stream)]
        return await self._meter_stream(ex, ex.meter, msg)

    async def _meter_stream(self, ex: Exchange, meter: StreamMeter,
                            msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        out = bytearray()
        if self._control is not None and (
                self._control.version(ex.caller) != ex.control_version):
            # An operator changed this caller (kill switch, lower budget): re-check now.
            ex.control_version = self._control.version(ex.caller)
            refusal = await self._recheck(ex)
            if refusal is not None:
                # Nothing of this chunk is delivered; its tokens were generated all the same.
                events = meter.feed(msg.body, msg.end_of_stream)
                ex.counted_output += sum(e.output_tokens for e in events)
                return await self._end_stream(ex, out, refusal)
        for event in meter.feed(msg.body, msg.end_of_stream):
            if event.usage is not None:
                ex.usage = _merge_usage(ex.usage, event.usage)
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
                # Settled before the client gets the last event: when the SDK's call
                # returns, the budget already shows what the call cost.
                await self._settle_from(ex)
        if msg.end_of_stream:
            out += meter.rest()
            await self._settle_from(ex)
        else:
            # Forward every complete event; keep a partial one until it completes.
            out += meter.take(meter.complete_end)
        if not out and not msg.end_of_stream:
            return []
        return [stream_chunk(bytes(out), msg.end_of_stream)]

    async def _end_stream(self, ex: Exchange, out: bytearray,
                          refusal: Refusal) -> list[pb.ProcessingResponse]:
        """Send what may be delivered, then the provider-native error event, and end."""
        out += self._cut_event(ex, refusal)
        ex.ended = True
        await self._settle_unfinished(ex)
        return [stream_chunk(bytes(out), True)]

    async def _recheck(self, ex: Exchange) -> Refusal | None:
        """Is this stream still allowed (not killed, not over a lowered limit)?"""
        if not ex.open_reservation:
            return None
        try:
            async with asyncio.timeout(self._redis_timeout):
                result = await self._store.extend(ex.caller, ex.request_id, 0, 0)
        except REDIS_FAILURES:
            metrics.REDIS_ERRORS.labels("recheck").inc()
            return None  # the next extension decides
        return result if isinstance(result, Refusal) else None

    async def _cover(self, ex: Exchange, tokens: int) -> Refusal | None:
        """Make sure the reservation covers `tokens` more output, plus the grace for what
        the provider generates after a cut. Extends in steps; None when covered."""
        grace = self._settings.stream_grace_tokens
        needed = ex.counted_output + tokens
        cap = ex.output_cap
        if cap is not None and ex.output_allowance >= cap:
            return None  # the provider cannot generate beyond the cap we already hold
        if needed + grace <= ex.output_allowance:
            return None
        if not ex.open_reservation or ex.price is None:
            return Refusal("reservation_gone", "total", 0, 0, 0)
        target = needed + grace + self._settings.stream_step_tokens
        minimum_target = needed + grace
        if cap is not None:
            target, minimum_target = min(target, cap), min(minimum_target, cap)
        current_out = ex.reserved_nano - ex.input_nano
        desired = ex.input_nano + cost_nano(ex.price, TokenUsage(output=target)) \
            - ex.reserved_nano
        minimum = ex.input_nano + cost_nano(ex.price, TokenUsage(output=minimum_target)) \
            - ex.reserved_nano
        if minimum <= 0:
            return None
        try:
            async with asyncio.timeout(self._redis_timeout):
                granted = await self._store.extend(ex.caller, ex.request_id,
                                                   max(desired, minimum), minimum)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("extend").inc()
            log.warning("redis unavailable on extend (rid=%s): %s", ex.request_id,
                        type(exc).__name__)
            return Refusal("state_store_unavailable", "total", 0, 0, 0)
        if isinstance(granted, Refusal):
            return granted
        metrics.EXTENSIONS.inc()
        ex.reserved_nano += granted
        ex.output_allowance = self._allowance(ex)
        log.debug("extended rid=%s by %d nano (was %d for output) to %d output tokens",
                  ex.request_id, granted, current_out, ex.output_allowance)
        return None

    def _cut_event(self, ex: Exchange, refusal: Refusal) -> bytes:
        metrics.STREAMS_CUT.labels(refusal.reason).inc()
        if refusal.reason == "killed":
            message = "stream ended: this API key was blocked by the tokenfuse kill switch"
        elif refusal.reason == "state_store_unavailable":
            message = "stream ended: tokenfuse cannot reach its state store"
        elif refusal.reason == "reservation_gone":
            message = "stream ended: its budget reservation expired"
        else:
            message = (f"stream ended: tokenfuse {refusal.window} budget exhausted "
                       f"(${nano_to_usd(refusal.used_nano)} of "
                       f"${nano_to_usd(refusal.limit_nano)} used)")
        details = {"reason": refusal.reason, "window": refusal.window,
                   "limit_nano_usd": refusal.limit_nano, "used_nano_usd": refusal.used_nano,
                   "resets_at": refusal.resets_at or None,
                   "output_tokens_delivered": ex.counted_output}
        log.info("stream cut rid=%s reason=%s after %d output tokens", ex.request_id,
                 refusal.reason, ex.counted_output)
        provider = PROVIDERS[ex.provider]
        error_type = "insufficient_quota" if ex.provider == "openai" else "budget_exceeded"
        return provider.stream_error_event(error_type, refusal.reason, message, details)

    def _read_json(self, ex: Exchange, raw: bytes) -> None:
        if not _may_be_success(ex.status):
            return
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            log.warning("unparseable JSON response from %s (rid=%s)", ex.provider, ex.request_id)
            return
        if isinstance(payload, dict):
            ex.usage = PROVIDERS[ex.provider].usage(payload)

    async def _settle_from(self, ex: Exchange) -> None:
        """End of a response: settle to the provider's usage; a failed call bills nothing."""
        if not ex.open_reservation:
            return
        if not _may_be_success(ex.status):
            await self._settle_safely(ex, 0, "failed")
        elif ex.usage is not None and ex.price is not None and (
                ex.meter is None or ex.usage.output >= ex.counted_output):
            await self._settle_usage(ex, ex.usage, "usage")
        else:
            log.warning("no usage in response (rid=%s)", ex.request_id)
            await self._settle_unfinished(ex)

    async def _settle_unfinished(self, ex: Exchange) -> None:
        """No final usage: a stream is charged what was counted (plus the grace for tokens
        generated after the last one seen), anything else its whole reservation."""
        if not ex.open_reservation:
            return
        if ex.meter is None or ex.price is None:
            await self._settle_safely(ex, ex.reserved_nano, "reservation")
            return
        output = ex.counted_output + self._settings.stream_grace_tokens
        if ex.output_cap is not None:
            output = min(output, ex.output_cap)
        known = ex.usage
        if known is not None and (known.input or known.cache_read or known.cache_write):
            usage = TokenUsage(known.input, max(known.output, output), known.cache_read,
                               known.cache_write)
            actual = cost_nano(ex.price, usage)
        else:
            actual = ex.input_nano + cost_nano(ex.price, TokenUsage(output=output))
        await self._settle_safely(ex, min(actual, ex.reserved_nano), "counted")

    async def _settle_usage(self, ex: Exchange, usage: TokenUsage, basis: str) -> None:
        assert ex.price is not None
        actual = cost_nano(ex.price, usage)
        if await self._settle_safely(ex, actual, basis):
            model = ex.price.model
            metrics.SPEND_NANO.labels(ex.provider, model).inc(actual)
            for kind in ("input", "output", "cache_read", "cache_write"):
                count = getattr(usage, kind)
                if count:
                    metrics.TOKENS.labels(ex.provider, model, kind).inc(count)

    async def _report_pool_success(self, ex: Exchange, tokens: int, spend: int) -> None:
        assert self._pools is not None
        metrics.POOL_REQUESTS.labels(ex.pool, ex.pool_key[:PREFIX_CHARS], str(ex.status)).inc()
        try:
            async with asyncio.timeout(self._redis_timeout * 4):
                state = await self._pools.report(ex.pool, ex.pool_key, ex.status, -1, tokens,
                                                 spend)
        except REDIS_FAILURES:
            metrics.REDIS_ERRORS.labels("pool_report").inc()
            return
        metrics.set_pool_key_state(ex.pool, ex.pool_key[:PREFIX_CHARS], state)

    async def _settle_safely(self, ex: Exchange, actual_nano: int, basis: str) -> bool:
        ex.open_reservation = False
        if ex.pool_key and 200 <= ex.status < 300:
            usage = ex.usage
            tokens = (usage.input + usage.output + usage.cache_read + usage.cache_write
                      if usage else ex.counted_output)
            metrics.POOL_TOKENS.labels(ex.pool, ex.pool_key[:PREFIX_CHARS]).inc(tokens)
            metrics.POOL_SPEND.labels(ex.pool, ex.pool_key[:PREFIX_CHARS]).inc(actual_nano)
            await self._report_pool_success(ex, tokens, actual_nano)
        try:
            async with asyncio.timeout(self._redis_timeout * 4):
                await self._store.settle(ex.caller, ex.request_id, actual_nano)
        except REDIS_FAILURES as exc:
            # The reservation stays counted against the budget: the wallet is protected.
            metrics.REDIS_ERRORS.labels("settle").inc()
            log.warning("settlement failed (rid=%s): %s", ex.request_id, type(exc).__name__)
            return False
        metrics.SETTLEMENTS.labels(basis).inc()
        log.debug("settled rid=%s basis=%s nano=%d of %d reserved", ex.request_id, basis,
                  actual_nano, ex.reserved_nano)
        return True

    # -- refusals ----------------------------------------------------------------------

    def _store_unavailable(self, ex: Exchange, operation: str,
                           exc: BaseException) -> pb.ProcessingResponse:
        metrics.REDIS_ERRORS.labels(operation).inc()
        log.warning("redis unavailable on %s: %s", operation, type(exc).__name__)
        return self._refuse(ex, 503, "api_error", "state_store_unavailable",
                            "tokenfuse cannot reach its state store; nothing was forwarded",
                            headers=(("retry-after", "1"),))

    def _refuse(self, ex: Exchange, status: int, error_type: str, code: str, message: str,
                details: dict[str, Any] | None = None,
                headers: tuple[tuple[str, str], ...] = ()) -> pb.ProcessingResponse:
        outcome = "error" if status >= 500 else "refused"
        metrics.DECISIONS.labels(outcome, code, ex.provider).inc()
        body = PROVIDERS[ex.provider].error_body(error_type, code, message, details)
        return immediate(status, body, f"tokenfuse_{code}", headers)

    def _refuse_plain(self, status: int, code: str, message: str) -> pb.ProcessingResponse:
        metrics.DECISIONS.labels("refused", code, "none").inc()
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "code": code}}).encode()
        return immediate(status, body, f"tokenfuse_{code}")

    def _tool_loop(self, ex: Exchange, history: list[Any]) -> pb.ProcessingResponse | None:
        limit = self._settings.loop_max_tool_repeats
        if limit <= 0:
            return None
        repeated = repeated_tool_call(history)
        if repeated is None or repeated[1] <= limit:
            return None
        name, times = repeated
        metrics.LOOPS.labels("tool_loop").inc()
        message = (f"Blocked: tool '{name}' called {times} times with identical arguments in "
                   "this conversation. This usually indicates an agent stuck in a tool loop.")
        detail = {"error": "tool_loop_detected", "message": message, "tool": name,
                  "repeat_count": times, "max_repeats": limit}
        self._emit(ex, "loop.detected", {"kind": "tool_loop", "tool": name,
                                         "hit_count": times, "model": ex.call.model
                                         if ex.call else None, "cooldown_seconds": 0})
        return self._refuse_429(ex, "tool_loop_detected", message, detail,
                                self._settings.loop_cooldown_seconds)

    def _refuse_loop(self, ex: Exchange, refusal: LoopRefusal, fp: str,
                     model: str) -> pb.ProcessingResponse:
        retry_after = max(1, -(-refusal.retry_after_ms // 1000))
        if refusal.kind == "velocity":
            metrics.LOOPS.labels("velocity").inc()
            limit = self._settings.velocity_max_per_minute
            message = (f"Blocked: {refusal.hit_count} requests in the last minute exceed this "
                       f"key's limit of {limit} per minute. This usually indicates a runaway "
                       "agent.")
            detail = {"error": "velocity_limit_exceeded", "message": message,
                      "request_count": refusal.hit_count, "limit_per_minute": limit,
                      "retry_after_seconds": retry_after}
            return self._refuse_429(ex, "velocity_limit_exceeded", message, detail, retry_after)
        metrics.LOOPS.labels("recursive_loop").inc()
        window = self._settings.loop_window_seconds
        cooldown = self._settings.loop_cooldown_seconds
        message = (f"Blocked: identical request sent {refusal.hit_count} times in {window} "
                   "seconds. This usually indicates an agent retry loop, infinite recursion, "
                   "or misconfigured automation.")
        detail = {"error": "recursive_loop_detected", "message": message,
                  "fingerprint": fp[:12] + "...", "hit_count": refusal.hit_count,
                  "cooldown_seconds": cooldown}
        log.info("loop detected caller=%s fingerprint=%s hits=%d", ex.caller[:PREFIX_CHARS],
                 fp[:12], refusal.hit_count)
        if refusal.hit_count == self._settings.loop_max_hits + 1:  # the block starts now
            self._emit(ex, "loop.detected", {
                "kind": "recursive_loop", "fingerprint": detail["fingerprint"],
                "hit_count": refusal.hit_count, "model": model, "cooldown_seconds": cooldown})
        return self._refuse_429(ex, "recursive_loop_detected", message, detail, retry_after)

    def _refuse_429(self, ex: Exchange, code: str, message: str, detail: dict[str, Any],
                    retry_after: int) -> pb.ProcessingResponse:
        metrics.DECISIONS.labels("refused", code, ex.provider).inc()
        doc = json.loads(PROVIDERS[ex.provider].error_body("rate_limit_error", code, message))
        doc["detail"] = detail
        return immediate(429, json.dumps(doc).encode(), f"tokenfuse_{code}",
                         (("retry-after", str(retry_after)),))

    def _refuse_budget(self, ex: Exchange, refusal: Refusal,
                       estimate: int) -> pb.ProcessingResponse:
        if refusal.reason == "killed":
            message = "this API key is blocked by the tokenfuse kill switch"
        else:
            message = (
                f"tokenfuse {refusal.window} budget exhausted: "
                f"${nano_to_usd(refusal.used_nano)} of ${nano_to_usd(refusal.limit_nano)} used, "
                f"this request needs up to ${nano_to_usd(estimate)}"
            )
        details = {
            "reason": refusal.reason,
            "window": refusal.window,
            "limit_nano_usd": refusal.limit_nano,
            "used_nano_usd": refusal.used_nano,
            "request_estimate_nano_usd": estimate,
            "resets_at": refusal.resets_at or None,
            "key_id_prefix": ex.caller[:PREFIX_CHARS],
        }
        error_type = "insufficient_quota" if ex.provider == "openai" else "billing_error"
        if refusal.first_in_window:
            self._emit(ex, "budget.exceeded", {
                k: details[k] for k in ("window", "limit_nano_usd", "used_nano_usd",
                                        "request_estimate_nano_usd", "resets_at")})
        return self._refuse(ex, 402, error_type, refusal.reason, message, details)

    def _emit(self, ex: Exchange, event: str, data: dict[str, Any]) -> None:
        if self._webhooks is not None:
            self._webhooks.emit(event, ex.request_id, ex.caller[:PREFIX_CHARS], data)


def _merge_usage(old: TokenUsage | None, new: TokenUsage) -> TokenUsage:
    """Anthropic spreads usage over events (cumulative counts): keep the largest of each."""
    if old is None:
        return new
    return TokenUsage(
        input=max(old.input, new.input),
        output=max(old.output, new.output),
        cache_read=max(old.cache_read, new.cache_read),
        cache_write=max(old.cache_write, new.cache_write),
    )


def _response_code(message: pb.ProcessingRequest) -> int:
    """The `response.code` attribute Envoy attaches to the first response message."""
    attributes = message.attributes.get(EXT_PROC_FILTER)
    if attributes is None or "response.code" not in attributes.fields:
        return 0
    return int(attributes.fields["response.code"].number_value)


def _may_be_success(status: int) -> bool:
    """2xx, or unknown (0): a call is billed as failed only on a known error status."""
    return status == 0 or 200 <= status < 300


def _is_upstream_stage(context: Any) -> bool:
    """Streams from the pooled clusters' upstream filter carry this gRPC metadata."""
    return any(item[0] == STAGE_METADATA and item[1] == "upstream"
               for item in (context.invocation_metadata() or ()))
