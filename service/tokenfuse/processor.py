"""The ext_proc service: one gRPC stream per HTTP request, one answer per message.

Request headers identify the caller and the provider; the request body is priced and
reserved in one Lua call; the response (JSON or SSE) is read for the provider's usage
and the reservation is settled to it.
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

import redis.exceptions
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tokenfuse import metrics
from tokenfuse.config import Settings
from tokenfuse.identity import PREFIX_CHARS, api_key_from_headers, key_id
from tokenfuse.money import nano_to_usd
from tokenfuse.pricing import ModelPrice, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import PROVIDERS, Call, RequestRejected, provider_for_path
from tokenfuse.responses import (
    CONTINUE_REQUEST_BODY,
    CONTINUE_REQUEST_HEADERS,
    CONTINUE_RESPONSE_BODY,
    CONTINUE_RESPONSE_HEADERS,
    immediate,
    replace_request_body,
)
from tokenfuse.sse import SseParser
from tokenfuse.store import BudgetStore, Refusal
from tokenfuse.tokens import estimate_input_tokens

log = logging.getLogger("tokenfuse.processor")

STREAM_BODY = pb.ProcessingResponse(
    response_headers=pb.HeadersResponse(),
    mode_override=processing_mode_pb2.ProcessingMode(
        response_body_mode=processing_mode_pb2.ProcessingMode.STREAMED
    ),
)
REDIS_FAILURES = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


@dataclass
class Exchange:
    """What the processor knows about one HTTP request/response."""

    provider: str = ""
    path: str = ""
    caller: str = ""
    request_id: str = ""
    call: Call | None = None
    price: ModelPrice | None = None
    reserved_nano: int = 0
    open_reservation: bool = False
    status: int = 0
    sse: SseParser | None = None
    usage: TokenUsage | None = None
    saw_body: bool = False
    body_chunks: list[bytes] = field(default_factory=list)


class Processor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, settings: Settings, secret: bytes, store: BudgetStore,
                 prices: PriceTable) -> None:
        self._settings = settings
        self._secret = secret
        self._store = store
        self._prices = prices
        self._redis_timeout = settings.redis_timeout_ms / 1000

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        ex = Exchange()
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    yield self._on_request_headers(ex, message.request_headers)
                elif kind == "request_body":
                    yield await self._on_request_body(ex, message.request_body)
                elif kind == "response_headers":
                    yield await self._on_response_headers(ex, message.response_headers)
                elif kind == "response_body":
                    yield await self._on_response_body(ex, message.response_body)
                elif kind == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif kind == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        finally:
            if ex.open_reservation:
                # The exchange ended without a settlement (client gone, Envoy reset, upstream
                # cut): the provider may have billed, so the reservation is charged in full.
                await self._settle_safely(ex, ex.reserved_nano, "reservation")

    # -- request -----------------------------------------------------------------------

    def _on_request_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = _header_dict(msg)
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
        if msg.end_of_stream:
            metrics.DECISIONS.labels("allowed", "no_body", ex.provider).inc()
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
        estimate = self._estimate(call, price)
        try:
            async with asyncio.timeout(self._redis_timeout):
                refusal = await self._store.reserve(ex.caller, ex.request_id, estimate)
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("reserve").inc()
            log.warning("redis unavailable on reserve: %s", type(exc).__name__)
            return self._refuse(ex, 503, "api_error", "state_store_unavailable",
                                "tokenfuse cannot reach its state store; nothing was "
                                "forwarded", headers=(("retry-after", "1"),))
        if refusal is not None:
            return self._refuse_budget(ex, refusal, estimate)
        ex.reserved_nano = estimate
        ex.open_reservation = True
        metrics.DECISIONS.labels("allowed", "within_budget", ex.provider).inc()
        log.debug("reserved caller=%s rid=%s nano=%d", ex.caller[:PREFIX_CHARS],
                  ex.request_id, estimate)
        if call.new_body is not None:
            return replace_request_body(json.dumps(call.new_body).encode())
        return CONTINUE_REQUEST_BODY

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
        """Upper bound of the call's cost: estimated input plus the output allowance."""
        input_tokens = estimate_input_tokens(
            call.prompt_parts, call.messages, self._settings.input_margin_percent
        )
        output = call.max_output_tokens
        if output is None:
            output = self._settings.default_output_tokens
            if price.max_output_tokens:
                output = min(output, price.max_output_tokens)
        # Input may be billed at the cache-write rate, which can exceed the input rate.
        input_rate_usage = (
            TokenUsage(cache_write=input_tokens)
            if price.cache_write > price.input
            else TokenUsage(input=input_tokens)
        )
        return cost_nano(price, input_rate_usage) + cost_nano(
            price, TokenUsage(output=output * call.choices)
        )

    # -- response ----------------------------------------------------------------------

    async def _on_response_headers(self, ex: Exchange,
                                   msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = _header_dict(msg)
        try:
            ex.status = int(headers.get(":status", "0"))
        except ValueError:
            ex.status = 0
        if msg.end_of_stream:
            await self._settle_from(ex)
            return CONTINUE_RESPONSE_HEADERS
        if ex.open_reservation and "text/event-stream" in headers.get("content-type", ""):
            ex.sse = SseParser()
            return STREAM_BODY
        return CONTINUE_RESPONSE_HEADERS

    async def _on_response_body(self, ex: Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        if not ex.open_reservation:
            return CONTINUE_RESPONSE_BODY
        if ex.sse is not None:
            self._read_events(ex, ex.sse.feed(msg.body))
            if msg.end_of_stream:
                self._read_events(ex, ex.sse.finish())
                await self._settle_from(ex)
            return CONTINUE_RESPONSE_BODY
        ex.body_chunks.append(msg.body)
        if msg.end_of_stream:
            self._read_json(ex, b"".join(ex.body_chunks))
            await self._settle_from(ex)
        return CONTINUE_RESPONSE_BODY

    def _read_json(self, ex: Exchange, raw: bytes) -> None:
        if not 200 <= ex.status < 300:
            return
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            log.warning("unparseable JSON response from %s (rid=%s)", ex.provider, ex.request_id)
            return
        if isinstance(payload, dict):
            ex.usage = PROVIDERS[ex.provider].usage(payload)

    def _read_events(self, ex: Exchange, events: list[Any]) -> None:
        provider = PROVIDERS[ex.provider]
        for event in events:
            if event.data == "[DONE]" or "usage" not in event.data:
                continue
            try:
                payload = json.loads(event.data)
            except ValueError:
                log.warning("unparseable SSE data from %s (rid=%s)", ex.provider, ex.request_id)
                continue
            if isinstance(payload, dict):
                usage = provider.usage(payload)
                if usage is not None:
                    ex.usage = _merge_usage(ex.usage, usage)

    async def _settle_from(self, ex: Exchange) -> None:
        """Settle to provider usage; a failed call bills nothing; no usage → reservation."""
        if not ex.open_reservation:
            return
        if not 200 <= ex.status < 300:
            await self._settle_safely(ex, 0, "failed")
        elif ex.usage is not None and ex.price is not None:
            actual = cost_nano(ex.price, ex.usage)
            if await self._settle_safely(ex, actual, "usage"):
                model = ex.price.model
                metrics.SPEND_NANO.labels(ex.provider, model).inc(actual)
                for kind in ("input", "output", "cache_read", "cache_write"):
                    count = getattr(ex.usage, kind)
                    if count:
                        metrics.TOKENS.labels(ex.provider, model, kind).inc(count)
        else:
            log.warning("no usage in response (rid=%s); charged the reservation",
                        ex.request_id)
            await self._settle_safely(ex, ex.reserved_nano, "reservation")

    async def _settle_safely(self, ex: Exchange, actual_nano: int, basis: str) -> bool:
        ex.open_reservation = False
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
        return self._refuse(ex, 402, error_type, refusal.reason, message, details)


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


def _header_dict(msg: pb.HttpHeaders) -> dict[str, str]:
    return {
        h.key.lower(): (h.raw_value.decode("latin-1") if h.raw_value else h.value)
        for h in msg.headers.headers
    }
