"""Refusals as values: what to answer a client, and why, in its provider's own shape.

Pure functions: they take the decision's facts and return a `Reply` (an immediate answer;
nothing is forwarded) or the bytes of an in-stream error event. Sending them, counting
them in metrics and emitting webhooks is the processor's job (`tokenfuse.extproc`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenfuse.money import nano_to_usd
from tokenfuse.providers import Provider, unrouted_error_body
from tokenfuse.providers.base import ErrorKind
from tokenfuse.state.results import LoopRefusal, Refusal


@dataclass(frozen=True)
class Reply:
    status: int
    code: str  # machine-readable reason (also Envoy's response code details)
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def refuse(provider: Provider, status: int, kind: ErrorKind, code: str, message: str,
           details: dict[str, Any] | None = None,
           headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(provider.refusal_status(kind, status), code,
                 provider.error_body(kind, code, message, details),
                 headers + provider.error_headers(kind, code))


def unknown_route() -> Reply:
    code = "unknown_route"
    return Reply(404, code, unrouted_error_body(code, "no provider is routed at this path"))


def ambiguous_path() -> Reply:
    code = "ambiguous_path"
    return Reply(400, code, unrouted_error_body(
        code, "the path has dot segments, empty segments or escaped dots or slashes: a "
              "provider could read it otherwise than tokenfuse prices it"))


def provider_not_configured(provider: Provider, variable: str) -> Reply:
    """A provider tokenfuse knows whose upstream the operator did not set (Azure: a
    resource's own host). Nothing is forwarded."""
    return refuse(provider, 404, "invalid_request", "provider_not_configured",
                  f"{provider.name} is not configured on this gateway: the operator sets "
                  f"{variable} to enable /{provider.name}/")


def store_unavailable(provider: Provider) -> Reply:
    return refuse(provider, 503, "unavailable", "state_store_unavailable",
                  "tokenfuse cannot reach its state store; nothing was forwarded",
                  headers=(("retry-after", "1"),))


def draining(provider: Provider) -> Reply:
    """The processor got SIGTERM: a new request is refused (another replica takes the
    retry); requests already admitted go on."""
    return refuse(provider, 503, "unavailable", "draining",
                  "this tokenfuse processor is shutting down; nothing was forwarded, retry",
                  headers=(("retry-after", "1"),))


def unknown_model(provider: Provider, model: str, why: str | None = None) -> Reply:
    """`why`: the price table's reason for leaving the model unpriced, if it has one."""
    return refuse(provider, 400, "invalid_request", "unknown_model",
                  f"model '{model}' has no price in tokenfuse"
                  + (f" ({why})" if why else "") + "; refused (set "
                  "TOKENFUSE_UNKNOWN_MODEL=price or add it to TOKENFUSE_PRICES_FILE)")


def budget_details(refusal: Refusal, estimate: int, key_prefix: str) -> dict[str, Any]:
    return {
        "reason": refusal.reason,
        "window": refusal.window,
        "limit_nano_usd": refusal.limit_nano,
        "used_nano_usd": refusal.used_nano,
        "request_estimate_nano_usd": estimate,
        "resets_at": refusal.resets_at or None,
        "key_id_prefix": key_prefix,
    }


def budget(provider: Provider, refusal: Refusal, details: dict[str, Any]) -> Reply:
    """402: the SDKs do not retry it."""
    if refusal.reason == "killed":
        message = "this API key is blocked by the tokenfuse kill switch"
    else:
        message = (
            f"tokenfuse {refusal.window} budget exhausted: "
            f"${nano_to_usd(refusal.used_nano)} of ${nano_to_usd(refusal.limit_nano)} used, "
            f"this request needs up to ${nano_to_usd(details['request_estimate_nano_usd'])}"
        )
    return refuse(provider, 402, "budget", refusal.reason, message, details)


def _rate_limited(provider: Provider, code: str, message: str, detail: dict[str, Any],
                  retry_after: int) -> Reply:
    """429 with retry-after, and `x-should-retry: false`: the Stainless SDKs (openai,
    anthropic, groq) otherwise retry a 429 by themselves after retry-after, and an agent
    loop retried by its SDK is still the loop."""
    doc = json.loads(provider.error_body("rate_limit", code, message))
    doc["detail"] = detail
    return Reply(provider.refusal_status("rate_limit", 429), code, json.dumps(doc).encode(),
                 (("retry-after", str(retry_after)), ("x-should-retry", "false"),
                  *provider.error_headers("rate_limit", code)))


def tool_loop(provider: Provider, name: str, times: int, limit: int,
              retry_after: int) -> Reply:
    message = (f"Blocked: tool '{name}' called {times} times with identical arguments in "
               "this conversation. This usually indicates an agent stuck in a tool loop.")
    detail = {"error": "tool_loop_detected", "message": message, "tool": name,
              "repeat_count": times, "max_repeats": limit}
    return _rate_limited(provider, "tool_loop_detected", message, detail, retry_after)


def retry_after_seconds(refusal: LoopRefusal) -> int:
    return max(1, -(-refusal.retry_after_ms // 1000))


def velocity(provider: Provider, refusal: LoopRefusal, limit: int) -> Reply:
    retry_after = retry_after_seconds(refusal)
    message = (f"Blocked: {refusal.hit_count} requests in the last minute exceed this "
               f"key's limit of {limit} per minute. This usually indicates a runaway agent.")
    detail = {"error": "velocity_limit_exceeded", "message": message,
              "request_count": refusal.hit_count, "limit_per_minute": limit,
              "retry_after_seconds": retry_after}
    return _rate_limited(provider, "velocity_limit_exceeded", message, detail, retry_after)


def _loop_detail(code: str, message: str, refusal: LoopRefusal, fingerprint: str,
                 cooldown_seconds: int) -> dict[str, Any]:
    return {"error": code, "message": message,
            "fingerprint": fingerprint[:12] + "...", "hit_count": refusal.hit_count,
            "cooldown_seconds": cooldown_seconds}


def loop_detail(refusal: LoopRefusal, fingerprint: str, window_seconds: int,
                cooldown_seconds: int) -> dict[str, Any]:
    message = (f"Blocked: identical request sent {refusal.hit_count} times in "
               f"{window_seconds} seconds. This usually indicates an agent retry loop, "
               "infinite recursion, or misconfigured automation.")
    return _loop_detail("recursive_loop_detected", message, refusal, fingerprint,
                        cooldown_seconds)


def near_loop_detail(refusal: LoopRefusal, fingerprint: str, window_seconds: int,
                     cooldown_seconds: int) -> dict[str, Any]:
    message = (f"Blocked: near-identical request sent {refusal.hit_count} times in "
               f"{window_seconds} seconds, answered identically each time (the prompts differ "
               "only in numbers, ids or timestamps). This usually indicates an agent loop "
               "that is not making progress.")
    return _loop_detail("near_duplicate_loop_detected", message, refusal, fingerprint,
                        cooldown_seconds)


def loop(provider: Provider, refusal: LoopRefusal, detail: dict[str, Any]) -> Reply:
    """Either loop tier's refusal: its code is the detail's."""
    return _rate_limited(provider, detail["error"], detail["message"], detail,
                         retry_after_seconds(refusal))


def cut_event(provider: Provider, refusal: Refusal, delivered_tokens: int) -> bytes:
    """The provider-native in-stream error that ends a stream tokenfuse cuts."""
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
               "output_tokens_delivered": delivered_tokens}
    return provider.stream_error_event("stream_cut", refusal.reason, message, details)
