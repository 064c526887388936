"""The request phases: headers identify the caller and the provider; the body is priced,
loop-checked and reserved in one Lua call, or refused. (The whole decision, from the
first header to the forwarded body, reads top to bottom in one class; hence its length.)"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tokenfuse import metrics
from tokenfuse.config import upstream_variable
from tokenfuse.contract import GRANT_HEADER, INTERNAL_HEADER_PREFIX, POOL_HEADER, grant
from tokenfuse.extproc.answers import (
    CONTINUE_REQUEST_BODY,
    CONTINUE_REQUEST_HEADERS,
    continue_request,
    header_mutation_response,
    header_values,
)
from tokenfuse.extproc.exchange import Exchange
from tokenfuse.extproc.reserving import Reserver
from tokenfuse.extproc.runtime import Runtime, log
from tokenfuse.identity import PREFIX_CHARS, VIRTUAL_KEY_PREFIX, key_id
from tokenfuse.policy import refusals, reservation
from tokenfuse.policy.loopguard import fingerprints, repeated_tool_call
from tokenfuse.policy.request_body import BodyRejected, parse
from tokenfuse.policy.request_encoding import EncodingRejected, decode, encodings
from tokenfuse.pricing import ModelPrice
from tokenfuse.providers import (
    PROVIDERS,
    Call,
    Provider,
    RequestRejected,
    caller_credential,
    moved_query_credentials,
    provider_for_path,
)
from tokenfuse.state.connection import REDIS_FAILURES
from tokenfuse.state.results import LoopRefusal, Refusal

VKEY_CACHE_SECONDS = 5.0
#: Bodies above this are parsed and bounded off the event loop (other requests go on).
LARGE_BODY_BYTES = 1 << 20

CREDENTIAL_REFUSALS = {
    "duplicate_credential": "a credential header was sent more than once; send exactly one "
                            "API key",
    "conflicting_credentials": "the request carries two different API keys; send exactly "
                               "one (the one the provider bills)",
    "gateway_key_with_credential": "a tokenfuse gateway key must be the request's only "
                                   "credential",
}


class RequestPhase:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._reserver = Reserver(runtime)
        # One large body at a time off the loop: each holds the interpreter for long C calls
        # (JSON), and the loop must still get its turns for every other request.
        self._large_bodies = asyncio.Semaphore(1)
        self._vkey_cache: dict[str, tuple[tuple[str, str] | None, float]] = {}

    async def on_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        ex.started_ns = time.monotonic_ns()
        values = header_values(msg)
        headers = {name: sent[-1] for name, sent in values.items()}
        if self._rt.tracing is not None:
            ex.trace = self._rt.tracing.begin(headers)
        path = headers.get(":path", "")
        routed = provider_for_path(path)
        if _ambiguous_path(path, routed is not None and PROVIDERS[routed[0]].for_path(
                routed[1]).escaped_slash_allowed(routed[1])):
            return self._rt.send(ex, refusals.ambiguous_path())
        if routed is None:
            return self._rt.send(ex, refusals.unknown_route())
        ex.provider_name, ex.path = routed
        ex.provider = provider = PROVIDERS[ex.provider_name].for_path(ex.path)
        if self._rt.draining:  # the request path's only drain check: one attribute read
            return self._rt.send(ex, refusals.draining(provider))
        if not self._rt.settings.envoy.upstreams.get(ex.provider_name):
            return self._rt.send(ex, refusals.provider_not_configured(
                provider, upstream_variable(ex.provider_name)))
        # Ids in Redis are tokenfuse's own: a client's x-request-id is for correlation only.
        ex.request_id = uuid.uuid4().hex
        ex.client_request_id = headers.get("x-request-id", "")
        ex.content_codings = encodings(values.get("content-encoding", []))
        refused = provider.header_refusal(headers)
        if refused is not None:
            return self._rt.send(ex, refusals.refuse(provider, refused.status,
                                                     "invalid_request", refused.code,
                                                     refused.message))
        api_key, problem = caller_credential(provider, values)
        if problem is not None:
            return self._rt.send(ex, refusals.refuse(provider, 400, "invalid_request", problem,
                                                     CREDENTIAL_REFUSALS[problem]))
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
        # A key in the query (Google's `?key=`) goes on in its header, never in the path.
        moved = moved_query_credentials(provider, path)
        path_set = ((":path", moved[0]),) if moved else ()
        if ex.trace is not None:  # the upstream's parent span is tokenfuse's
            path_set += ex.trace.outgoing()
        if ex.pool:
            # Route to the pooled cluster; its upstream filter puts a provider key on
            # every attempt. The gateway key itself never leaves Envoy.
            route = f"{ex.provider_name}:{ex.pool}"
            credentials = tuple(c.header for c in provider.credentials)
            return header_mutation_response(
                "request_headers",
                ((POOL_HEADER, route),
                 (GRANT_HEADER, grant(self._rt.secret, route, ex.client_request_id)),
                 *path_set),
                (*credentials, *forged), clear_route_cache=True)
        if forged or moved or path_set:  # only tokenfuse sets these: drop them, re-route
            return header_mutation_response("request_headers",
                                            (*path_set, *(moved[1] if moved else ())),
                                            forged, clear_route_cache=bool(forged))
        return CONTINUE_REQUEST_HEADERS

    async def release(self, ex: Exchange, basis: str) -> None:
        await self._reserver.release(ex, basis)

    async def on_body(self, ex: Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        started = time.perf_counter()
        try:
            return await self._decide(ex, msg.body, started)
        finally:
            metrics.DECISION_SECONDS.observe(time.perf_counter() - started)

    async def _decide(self, ex: Exchange, raw: bytes, started: float) -> pb.ProcessingResponse:
        rt, provider = self._rt, ex.provider
        assert provider is not None
        # A compressed body is decoded off the loop whatever its size: a few kB can decode
        # to TOKENFUSE_MAX_REQUEST_BYTES.
        if ex.content_codings or len(raw) > LARGE_BODY_BYTES:
            async with self._large_bodies:
                parsed = await asyncio.to_thread(self._understand, ex, provider, raw)
        else:
            parsed = self._understand(ex, provider, raw)
        if isinstance(parsed, pb.ProcessingResponse):
            return parsed
        body, call, price, plan, fp, repeated = parsed
        if price is None or plan is None:
            metrics.DECISIONS.labels("allowed", "free_endpoint", ex.provider_name).inc()
            return self._forward(ex, None)
        tool_loop = self._tool_loop(ex, call, repeated)
        if tool_loop is not None:
            return tool_loop
        ex.input_nano, ex.output_cap = plan.input_nano, plan.output_cap
        ex.bound_price = plan.price
        traced = time.time_ns() if ex.trace is not None else 0
        result = await self._reserver.reserve(ex, plan, fp)
        if ex.trace is not None:
            ex.trace.decided(traced, result)
        if isinstance(result, pb.ProcessingResponse):
            return result
        if isinstance(result, LoopRefusal):
            return self._refuse_loop(ex, result, fp or "", call.model)
        if isinstance(result, Refusal) and result.reason == "duplicate_reservation":
            log.error("reservation id %s already open; refused", ex.request_id)
            return rt.send(ex, refusals.store_unavailable(provider))
        if isinstance(result, Refusal):
            return self._refuse_budget(ex, result, plan.desired_nano)
        ex.reserved_nano = result.granted_nano
        ex.open_reservation = True
        if time.perf_counter() - started > rt.settings.processor.timeout_ms / 1000:
            # Envoy has answered 503 already (its per-message bound passed): nothing will
            # be forwarded, so nothing may stay reserved.
            await self._reserver.release(ex, "late")
            log.warning("decision later than Envoy's bound (rid=%s): released",
                        ex.request_id)
            return rt.send(ex, refusals.store_unavailable(provider))
        new_body = call.new_body
        cap = reservation.clamp(plan, call, ex.reserved_nano, price)
        if cap is not None:
            try:
                new_body = provider.with_output_cap(new_body or body, call, cap)
            except RequestRejected as exc:
                await self._reserver.release(ex, "refused")
                return rt.send(ex, refusals.refuse(provider, exc.status, "budget", exc.code,
                                                   exc.message))
            ex.output_cap = cap * call.choices
            metrics.CLAMPS.inc()
        ex.output_allowance = reservation.allowance(ex.reserved_nano, ex.input_nano,
                                                    plan.price or price)
        for window in result.crossed_threshold:
            rt.emit(ex, "budget.threshold", {
                "window": window, "threshold_percent": rt.settings.budgets.threshold_percent,
                "model": call.model})
        metrics.DECISIONS.labels("allowed", "within_budget", ex.provider_name).inc()
        log.debug("reserved caller=%s rid=%s client_rid=%s nano=%d output_allowance=%d "
                  "cap=%s", ex.caller[:PREFIX_CHARS], ex.request_id, ex.client_request_id,
                  ex.reserved_nano, ex.output_allowance, cap)
        return self._forward(ex, new_body)

    @staticmethod
    def _forward(ex: Exchange, new_body: dict | None) -> pb.ProcessingResponse:
        """Continue with the body as received, rewritten, or decoded: a compressed body is
        forwarded as the identity bytes that were priced (no second decoder can differ)."""
        if ex.trace is not None:
            ex.trace.forwarded()
        encoded = ("content-encoding",) if ex.content_codings else ()
        if new_body is not None:
            return continue_request(json.dumps(new_body).encode(), encoded)
        if ex.decoded_body is not None:
            decoded, ex.decoded_body = ex.decoded_body, None
            return continue_request(decoded, encoded)
        return CONTINUE_REQUEST_BODY

    def _understand(self, ex: Exchange, provider: Provider, raw: bytes
                    ) -> pb.ProcessingResponse | tuple[
                        dict, Call, ModelPrice | None, reservation.Plan | None, str | None,
                        tuple[str, int] | None]:
        """Parse, price, bound and fingerprint the request: (body, call, price, plan,
        loop fingerprint, most repeated tool call). Pure, so large bodies run it on a
        worker thread."""
        rt = self._rt
        if ex.content_codings:
            try:
                raw = ex.decoded_body = decode(raw, ex.content_codings,
                                               rt.settings.envoy.max_request_bytes)
            except EncodingRejected as exc:
                return rt.send(ex, refusals.refuse(provider, exc.status, "invalid_request",
                                                   exc.code, exc.message))
        try:
            body = parse(raw)
        except BodyRejected as exc:
            return rt.send(ex, refusals.refuse(provider, 400, "invalid_request", exc.code,
                                               exc.message))
        try:
            call = provider.parse_request(ex.path, body)
        except RequestRejected as exc:
            return rt.send(ex, refusals.refuse(provider, exc.status, "invalid_request",
                                               exc.code, exc.message))
        ex.call = call
        if not call.priced:
            return body, call, None, None, None, None
        price = reservation.price_for(rt.prices, call.model, rt.settings.estimate,
                                      provider)
        if price is None:
            return rt.send(ex, refusals.unknown_model(provider, call.model,
                                                      rt.prices.unpriced_reason(
                                                          call.model, provider.price_namespace)))
        ex.price = price
        call.hidden_output = call.hidden_output or (price.reasoning
                                                    and provider.reasoning_by_model)
        ex.hidden_output = call.hidden_output
        loop = rt.settings.loop
        history = call.messages or call.prompt_parts
        fp = None
        near = loop.near_duplicate and loop.near_max_hits > 0
        if loop.max_hits > 0 or near:
            exact, ex.near_fingerprint = fingerprints(ex.caller, call.model, history, near)
            fp = exact if loop.max_hits > 0 else None
        repeated = repeated_tool_call(history) if loop.max_tool_repeats > 0 else None
        return (body, call, price, reservation.plan(call, price, rt.settings.estimate,
                                                    rt.settings.streams, provider),
                fp, repeated)

    async def _bind_pool(self, ex: Exchange) -> pb.ProcessingResponse | None:
        """A gateway key: find its pool (cached briefly), or refuse it."""
        rt = self._rt
        if rt.pools is None:
            return None
        cached = self._vkey_cache.get(ex.caller)
        if cached is not None and cached[1] > time.monotonic():
            bound = cached[0]
        else:
            try:
                async with asyncio.timeout(rt.redis_timeout):
                    bound = await rt.pools.virtual_key_pool(ex.caller)
            except REDIS_FAILURES as exc:
                return rt.store_unavailable(ex, "vkey", exc)
            self._vkey_cache[ex.caller] = (bound, time.monotonic() + VKEY_CACHE_SECONDS)
        assert ex.provider is not None
        if bound is None:
            return rt.send(ex, refusals.refuse(ex.provider, 401, "authentication",
                                               "invalid_virtual_key",
                                               "unknown tokenfuse gateway key"))
        pool, pool_provider = bound
        if pool_provider != ex.provider_name:
            # A pool holds one provider's keys: never present them to another provider.
            return rt.send(ex, refusals.refuse(
                ex.provider, 403, "permission", "pool_provider_mismatch",
                f"this gateway key's pool '{pool}' holds {pool_provider or 'no'} keys; "
                f"call it at /{pool_provider}/, not /{ex.provider_name}/"))
        ex.pool = pool
        return None

    def _tool_loop(self, ex: Exchange, call: Call,
                   repeated: tuple[str, int] | None) -> pb.ProcessingResponse | None:
        loop = self._rt.settings.loop
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
        if refusal.kind == "near_loop":
            kind, fp, limit = "near_duplicate_loop", ex.near_fingerprint or "", loop.near_max_hits
            cooldown = loop.near_cooldown_seconds
            detail = refusals.near_loop_detail(refusal, fp, loop.near_window_seconds, cooldown)
        else:
            kind, limit, cooldown = "recursive_loop", loop.max_hits, loop.cooldown_seconds
            detail = refusals.loop_detail(refusal, fp, loop.window_seconds, cooldown)
        metrics.LOOPS.labels(kind).inc()
        log.info("%s detected caller=%s fingerprint=%s hits=%d", kind,
                 ex.caller[:PREFIX_CHARS], fp[:12], refusal.hit_count)
        if refusal.hit_count == limit + 1:  # the block starts now
            self._rt.emit(ex, "loop.detected", {
                "kind": kind, "fingerprint": detail["fingerprint"],
                "hit_count": refusal.hit_count, "model": model, "cooldown_seconds": cooldown})
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


def _ambiguous_path(path: str, escaped_slash_allowed: bool = False) -> bool:
    """A path the provider may read otherwise than tokenfuse: dot segments, empty segments,
    escaped dots or slashes (Envoy normalises these first; this holds without it too).
    `escaped_slash_allowed`: the provider reads the segment holding them as one value
    (`Provider.escaped_slash_allowed`: a model id that is an ARN)."""
    route = path.split("?", 1)[0]
    lowered = route.lower()
    return ("%2e" in lowered or ("%2f" in lowered and not escaped_slash_allowed)
            or "%5c" in lowered or "\\" in route
            or "//" in route or any(part in (".", "..") for part in route.split("/")))
