"""The request phases: headers identify the caller and the provider; the body is priced,
loop-checked and reserved in one Lua call, or refused."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tokenfuse import metrics
from tokenfuse.contract import GRANT_HEADER, INTERNAL_HEADER_PREFIX, POOL_HEADER, grant
from tokenfuse.extproc.answers import (
    CONTINUE_REQUEST_BODY,
    CONTINUE_REQUEST_HEADERS,
    continue_request,
    header_mutation_response,
    headers_of,
)
from tokenfuse.extproc.exchange import Exchange
from tokenfuse.extproc.runtime import Runtime, log
from tokenfuse.identity import PREFIX_CHARS, VIRTUAL_KEY_PREFIX, key_id
from tokenfuse.policy import refusals, reservation
from tokenfuse.policy.loopguard import fingerprint, repeated_tool_call
from tokenfuse.providers import PROVIDERS, Call, RequestRejected, provider_for_path
from tokenfuse.state.connection import REDIS_FAILURES
from tokenfuse.state.results import LoopRefusal, Refusal

VKEY_CACHE_SECONDS = 5.0


class RequestPhase:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._vkey_cache: dict[str, tuple[str | None, float]] = {}

    async def on_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = headers_of(msg)
        routed = provider_for_path(headers.get(":path", ""))
        if routed is None:
            return self._rt.send(ex, refusals.unknown_route())
        ex.provider_name, ex.path = routed
        ex.provider = provider = PROVIDERS[ex.provider_name]
        ex.request_id = headers.get("x-request-id") or uuid.uuid4().hex
        api_key = provider.caller_key(headers)
        if api_key is None:
            hints = " or ".join(c.hint for c in provider.credentials)
            return self._rt.send(ex, refusals.refuse(
                provider, 401, "authentication", "missing_api_key", f"no API key: send {hints}"))
        ex.caller = key_id(self._rt.secret, api_key)
        if api_key.startswith(VIRTUAL_KEY_PREFIX):
            refusal = await self._bind_pool(ex)
            if refusal is not None:
                return refusal
        if self._rt.control is not None:
            ex.control_version = self._rt.control.version(ex.caller)
        if msg.end_of_stream:
            metrics.DECISIONS.labels("allowed", "no_body", ex.provider_name).inc()
        forged = tuple(h for h in headers if h.startswith(INTERNAL_HEADER_PREFIX))
        if ex.pool:
            # Route to the pooled cluster; its upstream filter puts a provider key on
            # every attempt. The gateway key itself never leaves Envoy.
            route = f"{ex.provider_name}:{ex.pool}"
            credentials = tuple(c.header for c in provider.credentials)
            return header_mutation_response(
                "request_headers",
                ((POOL_HEADER, route),
                 (GRANT_HEADER, grant(self._rt.secret, route, ex.request_id))),
                (*credentials, *forged), clear_route_cache=True)
        if forged:  # only tokenfuse sets these: drop them and re-pick the route
            return header_mutation_response("request_headers", (), forged,
                                            clear_route_cache=True)
        return CONTINUE_REQUEST_HEADERS

    async def on_body(self, ex: Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        started = time.perf_counter()
        try:
            return await self._decide(ex, msg.body)
        finally:
            metrics.DECISION_SECONDS.observe(time.perf_counter() - started)

    async def _decide(self, ex: Exchange, raw: bytes) -> pb.ProcessingResponse:
        rt, provider = self._rt, ex.provider
        assert provider is not None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return rt.send(ex, refusals.refuse(provider, 400, "invalid_request", "invalid_json",
                                               "the request body is not valid JSON"))
        if not isinstance(body, dict):
            return rt.send(ex, refusals.refuse(provider, 400, "invalid_request", "invalid_json",
                                               "the request body must be a JSON object"))
        try:
            call = provider.parse_request(ex.path, body)
        except RequestRejected as exc:
            return rt.send(ex, refusals.refuse(provider, exc.status, "invalid_request",
                                               exc.code, exc.message))
        ex.call = call
        if not call.priced:
            metrics.DECISIONS.labels("allowed", "free_endpoint", ex.provider_name).inc()
            return CONTINUE_REQUEST_BODY
        price = reservation.price_for(rt.prices, call.model, rt.settings.estimate)
        if price is None:
            return rt.send(ex, refusals.unknown_model(provider, call.model))
        ex.price = price
        history = call.messages or call.prompt_parts
        tool_loop = self._tool_loop(ex, call, history)
        if tool_loop is not None:
            return tool_loop
        loop = rt.settings.loop
        fp = fingerprint(ex.caller, call.model, history, loop.normalize) \
            if loop.max_hits > 0 else None
        plan = reservation.plan(call, price, rt.settings.estimate, rt.settings.streams)
        ex.input_nano, ex.output_cap = plan.input_nano, plan.output_cap
        try:
            async with asyncio.timeout(rt.redis_timeout):
                result = await rt.store.reserve(ex.caller, ex.request_id, plan.desired_nano,
                                                plan.minimum_nano, fp)
        except REDIS_FAILURES as exc:
            return rt.store_unavailable(ex, "reserve", exc)
        if isinstance(result, LoopRefusal):
            return self._refuse_loop(ex, result, fp or "", call.model)
        if isinstance(result, Refusal):
            return self._refuse_budget(ex, result, plan.desired_nano)
        for window in result.crossed_threshold:
            rt.emit(ex, "budget.threshold", {
                "window": window, "threshold_percent": rt.settings.budgets.threshold_percent,
                "model": call.model})
        ex.reserved_nano = result.granted_nano
        ex.open_reservation = True
        ex.output_allowance = reservation.allowance(ex.reserved_nano, ex.input_nano, price)
        metrics.DECISIONS.labels("allowed", "within_budget", ex.provider_name).inc()
        log.debug("reserved caller=%s rid=%s nano=%d output_allowance=%d",
                  ex.caller[:PREFIX_CHARS], ex.request_id, ex.reserved_nano,
                  ex.output_allowance)
        if call.new_body is None:
            return CONTINUE_REQUEST_BODY
        return continue_request(json.dumps(call.new_body).encode())

    async def _bind_pool(self, ex: Exchange) -> pb.ProcessingResponse | None:
        """A gateway key: find its pool (cached briefly), or refuse it."""
        rt = self._rt
        if rt.pools is None:
            return None
        cached = self._vkey_cache.get(ex.caller)
        if cached is not None and cached[1] > time.monotonic():
            pool = cached[0]
        else:
            try:
                async with asyncio.timeout(rt.redis_timeout):
                    pool = await rt.pools.virtual_key_pool(ex.caller)
            except REDIS_FAILURES as exc:
                return rt.store_unavailable(ex, "vkey", exc)
            self._vkey_cache[ex.caller] = (pool, time.monotonic() + VKEY_CACHE_SECONDS)
        if pool is None:
            assert ex.provider is not None
            return rt.send(ex, refusals.refuse(ex.provider, 401, "authentication",
                                               "invalid_virtual_key",
                                               "unknown tokenfuse gateway key"))
        ex.pool = pool
        return None

    def _tool_loop(self, ex: Exchange, call: Call,
                   history: list[object]) -> pb.ProcessingResponse | None:
        loop = self._rt.settings.loop
        if loop.max_tool_repeats <= 0:
            return None
        repeated = repeated_tool_call(history)
        if repeated is None or repeated[1] <= loop.max_tool_repeats:
            return None
        name, times = repeated
        metrics.LOOPS.labels("tool_loop").inc()
        self._rt.emit(ex, "loop.detected", {"kind": "tool_loop", "tool": name,
                                            "hit_count": times, "model": call.model,
                                            "cooldown_seconds": 0})
        assert ex.provider is not None
        return self._rt.send(ex, refusals.tool_loop(ex.provider, name, times,
                                                    loop.max_tool_repeats,
                                                    loop.cooldown_seconds))

    def _refuse_loop(self, ex: Exchange, refusal: LoopRefusal, fp: str,
                     model: str) -> pb.ProcessingResponse:
        loop = self._rt.settings.loop
        assert ex.provider is not None
        if refusal.kind == "velocity":
            metrics.LOOPS.labels("velocity").inc()
            return self._rt.send(ex, refusals.velocity(ex.provider, refusal,
                                                       loop.velocity_max_per_minute))
        metrics.LOOPS.labels("recursive_loop").inc()
        detail = refusals.loop_detail(refusal, fp, loop.window_seconds, loop.cooldown_seconds)
        log.info("loop detected caller=%s fingerprint=%s hits=%d", ex.caller[:PREFIX_CHARS],
                 fp[:12], refusal.hit_count)
        if refusal.hit_count == loop.max_hits + 1:  # the block starts now
            self._rt.emit(ex, "loop.detected", {
                "kind": "recursive_loop", "fingerprint": detail["fingerprint"],
                "hit_count": refusal.hit_count, "model": model,
                "cooldown_seconds": loop.cooldown_seconds})
        return self._rt.send(ex, refusals.loop(ex.provider, refusal, detail))

    def _refuse_budget(self, ex: Exchange, refusal: Refusal,
                       estimate: int) -> pb.ProcessingResponse:
        details = refusals.budget_details(refusal, estimate, ex.caller[:PREFIX_CHARS])
        if refusal.first_in_window:
            self._rt.emit(ex, "budget.exceeded", {
                k: details[k] for k in ("window", "limit_nano_usd", "used_nano_usd",
                                        "request_estimate_nano_usd", "resets_at")})
        assert ex.provider is not None
        return self._rt.send(ex, refusals.budget(ex.provider, refusal, details))
