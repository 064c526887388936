"""Anthropic: the Messages API (and the free token counter)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.base import (
    Call,
    ErrorKind,
    ProviderBase,
    as_list,
    endpoint_of,
    int_field,
    model_of,
    unsupported,
)

API_VERSION = "2023-06-01"


class Anthropic(ProviderBase):
    name = "anthropic"
    default_upstream = "https://api.anthropic.com"
    error_types: ClassVar[dict[str, str]] = {
        **ProviderBase.error_types, "budget": "billing_error", "stream_cut": "budget_exceeded"}
    media_block_types = frozenset({"image", "document"})
    binary_fields = frozenset({"data", "source", "url"})

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        model = model_of(body)
        if endpoint.endswith("/messages/count_tokens"):
            return Call(endpoint="messages.count_tokens", model=model, stream=False,
                        max_output_tokens=0, priced=False)
        if endpoint.endswith("/messages"):
            return Call(
                endpoint="messages", model=model, stream=body.get("stream") is True,
                max_output_tokens=int_field(body, "max_tokens"),
                prompt_parts=[body.get("system"), body.get("tools")],
                messages=as_list(body.get("messages")),
            )
        raise unsupported(endpoint)

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        """`tool_use` blocks of an assistant message."""
        if not isinstance(message, dict) or message.get("role") != "assistant":
            return []
        content = message.get("content")
        if not isinstance(content, list):
            return []
        return [(str(block.get("name")), block.get("input")) for block in content
                if isinstance(block, dict) and block.get("type") == "tool_use"]

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """Usage of a message object, or of a `message_start` / `message_delta` event."""
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if not isinstance(usage, dict):
                return None
        return TokenUsage(
            input=usage.get("input_tokens") or 0,
            output=usage.get("output_tokens") or 0,
            cache_read=usage.get("cache_read_input_tokens") or 0,
            cache_write=usage.get("cache_creation_input_tokens") or 0,
        )

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        """Generated text of a content_block_delta: text, tool input JSON, thinking."""
        if payload.get("type") != "content_block_delta":
            return []
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return []
        return [v for k in ("text", "partial_json", "thinking")
                if isinstance(v := delta.get(k), str)]

    def is_final_event(self, event: str, data: str) -> bool:
        return event == "message_stop"

    def error_document(self, kind: ErrorKind, code: str, message: str) -> dict[str, Any]:
        return {"type": "error",
                "error": {"type": self.error_type(kind), "message": message, "code": code}}

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        """Anthropic's mid-stream `event: error`; the SDK raises on it."""
        return b"event: error\ndata: " + self.error_body(kind, code, message, details) + b"\n\n"

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("x-api-key", secret), ("authorization",)

    def retry_after_ms(self, headers: dict[str, str]) -> int:
        """`retry-after` (seconds), else the earliest `anthropic-ratelimit-*-reset`
        (RFC 3339)."""
        said = super().retry_after_ms(headers)
        if said >= 0:
            return said
        resets = []
        for name, text in headers.items():
            if name.startswith("anthropic-ratelimit-") and name.endswith("-reset"):
                try:
                    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
                except ValueError:
                    continue
                resets.append(int((when - datetime.now(UTC)).total_seconds() * 1000))
        return max(0, min(resets)) if resets else -1

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        return "/v1/models", {"x-api-key": secret, "anthropic-version": API_VERSION}
