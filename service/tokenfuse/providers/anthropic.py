"""Anthropic: the Messages API (and the free token counter)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, ClassVar

from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.base import (
    Call,
    Credential,
    ErrorKind,
    ProviderBase,
    RequestRejected,
    as_list,
    endpoint_of,
    int_field,
    model_of,
    unsupported,
)

API_VERSION = "2023-06-01"
#: The system prompt Anthropic adds when a request has tools (346 tokens for tool_choice
#: auto/none, 313 for any/tool: docs.anthropic.com, "Tool use" pricing), and a bound of the
#: framing around each tool definition.
TOOL_SYSTEM_PROMPT_TOKENS = 346
PER_TOOL_TOKENS = 10
#: Largest image input: images over 1568 px on the long edge or ~1,600 tokens are scaled
#: down first (docs.anthropic.com, "Vision": tokens = width * height / 750).
IMAGE_MAX_TOKENS = 1600
#: Extended thinking needs at least this budget, and budget_tokens < max_tokens.
MIN_THINKING_BUDGET = 1024
#: Server tools that bill per use (web search: $10 per 1,000 searches) or whose results
#: grow the input (web fetch); `max_uses` bounds both.
SERVER_TOOL_PREFIXES = ("web_search_", "web_fetch_")
#: `max_uses` tokenfuse sets on a server tool that has none (Anthropic's own default is
#: unlimited, which no reservation can cover).
DEFAULT_SERVER_TOOL_USES = 5
#: Web search: $10 per 1,000 searches (docs.anthropic.com pricing, checked 2026-12); web
#: fetch has no fee of its own.
WEB_SEARCH_NANO = 10_000_000


class Anthropic(ProviderBase):
    name = "anthropic"
    default_upstream = "https://api.anthropic.com"
    error_types: ClassVar[dict[str, str]] = {
        **ProviderBase.error_types, "budget": "billing_error", "stream_cut": "budget_exceeded"}
    credentials = (Credential("x-api-key"), Credential("authorization", "bearer"))
    media_block_types = frozenset({"image", "document", "container_upload"})

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        model = model_of(body)
        if endpoint.endswith("/messages/count_tokens"):
            return Call(endpoint="messages.count_tokens", model=model, stream=False,
                        max_output_tokens=0, priced=False)
        if endpoint.endswith("/messages"):
            thinking = body.get("thinking")
            tools, uses = self._server_tools(body)
            call = Call(
                endpoint="messages", model=model, stream=body.get("stream") is True,
                max_output_tokens=int_field(body, "max_tokens"),
                prompt_parts=[{k: v for k, v in body.items() if k != "messages"}],
                messages=as_list(body.get("messages")),
                hidden_output=isinstance(thinking, dict) and thinking.get("type") != "disabled",
                server_context=bool(body.get("mcp_servers") or body.get("container")
                                    or uses),
                server_tool_uses=uses,
                server_tool_fee_nano=WEB_SEARCH_NANO if uses else 0,
                framing_tokens=_tool_framing(body),
            )
            if tools is not None:
                call.new_body = {**body, "tools": tools}
            return call
        raise unsupported(endpoint)

    def _server_tools(self, body: dict[str, Any]) -> tuple[list[Any] | None, int]:
        """(the tools with `max_uses` set where a server tool had none, or None when
        unchanged; the most server-tool uses the request can bill)."""
        tools = as_list(body.get("tools"))
        changed, uses = False, 0
        out = []
        for tool in tools:
            if isinstance(tool, dict) and str(tool.get("type", "")).startswith(
                    SERVER_TOOL_PREFIXES):
                limit = int_field(tool, "max_uses")
                if limit is None:
                    limit, changed = DEFAULT_SERVER_TOOL_USES, True
                    tool = {**tool, "max_uses": limit}
                uses += limit
            out.append(tool)
        return (out if changed else None), uses

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        """Images at their largest; a text document is its text; PDFs, URLs and files are
        of unknown size."""
        if block.get("type") == "image":
            return IMAGE_MAX_TOKENS
        source = block.get("source")
        if block.get("type") == "document" and isinstance(source, dict):
            if source.get("type") == "text":
                return [source.get("data"), block.get("title"), block.get("context")]
            if source.get("type") == "content":
                return [source.get("content"), block.get("title"), block.get("context")]
        return None

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        """`max_tokens`, keeping extended thinking valid (budget_tokens < max_tokens)."""
        new = {**body, "max_tokens": cap}
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            budget = thinking.get("budget_tokens")
            if isinstance(budget, int) and budget >= cap:
                if cap - 1 < MIN_THINKING_BUDGET:
                    raise RequestRejected(
                        402, "budget_exceeded",
                        f"the budget covers {cap} output tokens, too few for extended "
                        f"thinking (budget_tokens >= {MIN_THINKING_BUDGET} < max_tokens)")
                new["thinking"] = {**thinking, "budget_tokens": cap - 1}
        return new

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
        server = usage.get("server_tool_use")
        searches = server.get("web_search_requests") if isinstance(server, dict) else 0
        return TokenUsage(
            input=usage.get("input_tokens") or 0,
            output=usage.get("output_tokens") or 0,
            cache_read=usage.get("cache_read_input_tokens") or 0,
            cache_write=usage.get("cache_creation_input_tokens") or 0,
            tool_fees_nano=(searches if isinstance(searches, int) else 0) * WEB_SEARCH_NANO,
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

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        """`text` blocks and `tool_use` blocks (name, input as JSON) of a message."""
        out: list[str] = []
        for block in as_list(payload.get("content")):
            if not isinstance(block, dict):
                continue
            if isinstance(block.get("text"), str):
                out.append(block["text"])
            elif block.get("type") == "tool_use":
                out += [str(block.get("name")),
                        json.dumps(block.get("input"), separators=(",", ":"))]
        return out

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


def _tool_framing(body: dict[str, Any]) -> int:
    tools = as_list(body.get("tools"))
    return TOOL_SYSTEM_PROMPT_TOKENS + PER_TOOL_TOKENS * len(tools) if tools else 0
