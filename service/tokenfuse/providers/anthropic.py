"""Anthropic: the Messages API (and the free token counter)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar

from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.base import (
    Call,
    Credential,
    ErrorKind,
    ProviderBase,
    RequestRejected,
    Tokenizer,
    as_list,
    asks_1h_cache,
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
#: Server tools that sample again over a context the request does not show, with no
#: `max_uses`: tool search loads deferred tool definitions and answers again (recorded:
#: input_tokens 727 in message_start, 1595 in message_delta; tests/fixtures/recorded).
SERVER_CONTEXT_TOOL_PREFIXES = ("tool_search_tool_",)
#: `max_uses` tokenfuse sets on a server tool that has none (Anthropic's own default is
#: unlimited, which no reservation can cover).
DEFAULT_SERVER_TOOL_USES = 5
#: Web search: $10 per 1,000 searches (docs.anthropic.com pricing, checked 2026-12); web
#: fetch has no fee of its own. The price table's `web_search_per_call` (from the dataset)
#: takes precedence; this is the fee of a model whose entry has none.
WEB_SEARCH_NANO = 10_000_000
#: 1-hour cache writes cost 2x base input, 5-minute ones 1.25x (platform.claude.com/docs/
#: en/build-with-claude/prompt-caching#pricing).
CACHE_WRITE_1H_INPUT_MULTIPLE = 2

#: Claude's tokenizer is not public: its tokens are bounded by cl100k's times 2.05. A
#: recorded real call (DataDog/dd-trace-py cassette, tests/fixtures/recorded/
#: anthropic_message_gzip_cache_write_1h) billed 2,056 input tokens for a prompt of 1,031
#: cl100k tokens (" farewell" repeated: one cl100k token, two Claude tokens): 1.99x, the
#: largest ratio seen, so the factor sits above it. The largest public measurement,
#: claude-opus-4-7 against cl100k over 2,500 prompts in five
#: formats, found every prompt above cl100k, median +41 %, least-squares slope 1.611
#: (llm-tokens-atlas 0.2.0); earlier Claude models count at most as many tokens as Opus
#: 4.7 (Anthropic: its new tokenizer uses 1.0-1.35x as many; measured 1.00x for
#: non-Latin scripts, up to 1.47x for English). docs/design.md, "Tokenizers".
TOKENIZER = Tokenizer("cl100k_base", 205)


class Anthropic(ProviderBase):
    name = "anthropic"
    genai_provider = "anthropic"
    default_upstream = "https://api.anthropic.com"
    error_types: ClassVar[dict[str, str]] = {
        **ProviderBase.error_types, "budget": "billing_error", "stream_cut": "budget_exceeded"}
    credentials = (Credential("x-api-key"), Credential("authorization", "bearer"))
    media_block_types = frozenset({"image", "document", "container_upload"})
    price_dataset_providers = ("anthropic",)
    cache_write_1h_input_multiple = CACHE_WRITE_1H_INPUT_MULTIPLE

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
                                    or uses or _has_tool(body, SERVER_CONTEXT_TOOL_PREFIXES)),
                server_tool_uses=uses,
                server_tool_fee_nano=WEB_SEARCH_NANO if uses else 0,
                framing_tokens=_tool_framing(body),
                long_cache_writes=asks_1h_cache(body, "cache_control"),
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

    def tokenizer(self, model: str) -> Tokenizer:
        return TOKENIZER

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
        writes = _count(usage, "cache_creation_input_tokens")
        by_ttl = usage.get("cache_creation")
        writes_1h = _count(by_ttl, "ephemeral_1h_input_tokens") if isinstance(by_ttl, dict) \
            else 0
        writes_5m = max(writes - writes_1h, _count(by_ttl, "ephemeral_5m_input_tokens")
                        if isinstance(by_ttl, dict) else 0)
        return TokenUsage(
            input=_count(usage, "input_tokens"),
            output=_count(usage, "output_tokens"),
            cache_read=_count(usage, "cache_read_input_tokens"),
            cache_write=writes_5m,
            cache_write_1h=writes_1h,
            web_searches=searches if isinstance(searches, int) else 0,
            web_search_nano=WEB_SEARCH_NANO,
        )

    def merge_usage(self, old: TokenUsage | None, new: TokenUsage) -> TokenUsage:
        """Cumulative counts; only `message_start` splits cache writes by lifetime
        (`message_delta` gives their total), so the total is kept and the 1-hour part
        taken from whichever event split it."""
        merged = super().merge_usage(old, new)
        if old is None:
            return merged
        writes = max(old.cache_write + old.cache_write_1h, new.cache_write + new.cache_write_1h)
        return replace(merged, cache_write=writes - merged.cache_write_1h)

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

    def response_facts(self, payload: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        """A stream names its model in `message_start`'s message, its stop reason in
        `message_delta`'s delta; a whole message says both at its top level."""
        kind = payload.get("type")
        if kind == "message_start" and isinstance(payload.get("message"), dict):
            return super().response_facts(payload["message"])
        if kind == "message_delta" and isinstance(payload.get("delta"), dict):
            return super().response_facts(payload["delta"])
        return super().response_facts(payload) if kind == "message" else ("", ())

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


def _count(usage: dict[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _has_tool(body: dict[str, Any], prefixes: tuple[str, ...]) -> bool:
    return any(isinstance(tool, dict) and str(tool.get("type", "")).startswith(prefixes)
               for tool in as_list(body.get("tools")))


def _tool_framing(body: dict[str, Any]) -> int:
    tools = as_list(body.get("tools"))
    return TOOL_SYSTEM_PROMPT_TOKENS + PER_TOOL_TOKENS * len(tools) if tools else 0
