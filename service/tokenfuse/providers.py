"""What tokenfuse must know of each provider's wire format.

Per provider: which endpoints are priced and how to read model, output cap and prompt
from a request; how to read usage from a response (JSON or SSE events); and how to
shape an error so the provider's official SDK surfaces it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenfuse.pricing import TokenUsage


class RequestRejected(Exception):
    """The request cannot be priced; it is refused with this status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Call:
    """What the budget decision needs from one request body."""

    endpoint: str
    model: str
    stream: bool
    max_output_tokens: int | None  # per choice; None = not given by the caller
    choices: int = 1
    prompt_parts: list[Any] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    priced: bool = True  # False for free endpoints (e.g. count_tokens)
    new_body: dict[str, Any] | None = None  # set when tokenfuse rewrites the body
    hide_usage_chunk: bool = False  # the usage-only stream chunk was added by tokenfuse


def _int_field(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestRejected(400, "invalid_request", f"'{name}' must be a positive integer")
        return value
    return None


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestRejected(400, "missing_model", "the request body has no 'model'")
    return model


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


class OpenAI:
    name = "openai"

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = path.split("?", 1)[0].rstrip("/")
        model = _model(body)
        stream = body.get("stream") is True
        choices = _int_field(body, "n") or 1
        if endpoint.endswith("/chat/completions"):
            return _with_stream_usage(body, Call(
                endpoint="chat.completions", model=model, stream=stream, choices=choices,
                max_output_tokens=_int_field(body, "max_completion_tokens", "max_tokens"),
                prompt_parts=[body.get("tools"), body.get("functions"),
                              body.get("response_format")],
                messages=_list(body.get("messages")),
            ))
        if endpoint.endswith("/completions"):
            best_of = _int_field(body, "best_of") or 1
            return _with_stream_usage(body, Call(
                endpoint="completions", model=model, stream=stream,
                choices=max(choices, best_of),
                max_output_tokens=_int_field(body, "max_tokens") or 16,
                prompt_parts=_list(body.get("prompt")),
            ))
        if endpoint.endswith("/embeddings"):
            return Call(endpoint="embeddings", model=model, stream=False, max_output_tokens=0,
                        prompt_parts=_list(body.get("input")))
        if endpoint.endswith("/responses"):
            return Call(
                endpoint="responses", model=model, stream=stream,
                max_output_tokens=_int_field(body, "max_output_tokens"),
                prompt_parts=[body.get("instructions"), body.get("tools")],
                messages=_list(body.get("input")),
            )
        raise RequestRejected(404, "unsupported_endpoint",
                              f"tokenfuse does not price {endpoint}; refused (fail-closed)")

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """Usage from a response object or a stream chunk (None when absent)."""
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            response = payload.get("response")  # Responses API stream events
            usage = response.get("usage") if isinstance(response, dict) else None
            if not isinstance(usage, dict):
                return None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
        output = usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = min(prompt, details.get("cached_tokens") or 0)
        return TokenUsage(input=prompt - cached, output=output, cache_read=cached)

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        """Generated text of one stream event: content, refusals, reasoning, tool calls."""
        out: list[str] = []
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            text = choice.get("text")  # legacy completions
            if isinstance(text, str):
                out.append(text)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for key in ("content", "refusal", "reasoning_content", "reasoning"):
                value = delta.get(key)
                if isinstance(value, str):
                    out.append(value)
            for call in delta.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    out.extend(v for v in (function.get("name"), function.get("arguments"))
                               if isinstance(v, str))
        kind = payload.get("type")
        if isinstance(kind, str) and kind.endswith(".delta"):  # Responses API events
            delta = payload.get("delta")
            if isinstance(delta, str):
                out.append(delta)
        return out

    def is_usage_only_chunk(self, payload: dict[str, Any]) -> bool:
        return payload.get("choices") == [] and isinstance(payload.get("usage"), dict)

    def is_final_event(self, event: str, data: str) -> bool:
        """The stream's last event: `[DONE]` (chat, completions) or a Responses API end."""
        return data == "[DONE]" or event in ("response.completed", "response.incomplete",
                                             "response.failed")

    def error_body(self, error_type: str, code: str, message: str,
                   details: dict[str, Any] | None = None) -> bytes:
        doc: dict[str, Any] = {
            "error": {"message": message, "type": error_type, "code": code, "param": None}
        }
        if details:
            doc["tokenfuse"] = details
        return json.dumps(doc).encode()

    def stream_error_event(self, error_type: str, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        """The in-band error OpenAI sends mid-stream; the SDK raises APIError on it."""
        return b"data: " + self.error_body(error_type, code, message, details) + b"\n\n"


class Anthropic:
    name = "anthropic"

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = path.split("?", 1)[0].rstrip("/")
        model = _model(body)
        if endpoint.endswith("/messages/count_tokens"):
            return Call(endpoint="messages.count_tokens", model=model, stream=False,
                        max_output_tokens=0, priced=False)
        if endpoint.endswith("/messages"):
            return Call(
                endpoint="messages", model=model, stream=body.get("stream") is True,
                max_output_tokens=_int_field(body, "max_tokens"),
                prompt_parts=[body.get("system"), body.get("tools")],
                messages=_list(body.get("messages")),
            )
        raise RequestRejected(404, "unsupported_endpoint",
                              f"tokenfuse does not price {endpoint}; refused (fail-closed)")

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

    def is_usage_only_chunk(self, payload: dict[str, Any]) -> bool:
        return False

    def is_final_event(self, event: str, data: str) -> bool:
        return event == "message_stop"

    def error_body(self, error_type: str, code: str, message: str,
                   details: dict[str, Any] | None = None) -> bytes:
        doc: dict[str, Any] = {
            "type": "error", "error": {"type": error_type, "message": message, "code": code},
        }
        if details:
            doc["tokenfuse"] = details
        return json.dumps(doc).encode()

    def stream_error_event(self, error_type: str, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        """Anthropic's mid-stream `event: error`; the SDK raises on it."""
        body = self.error_body(error_type, code, message, details)
        return b"event: error\ndata: " + body + b"\n\n"


def _with_stream_usage(body: dict[str, Any], call: Call) -> Call:
    """OpenAI reports stream usage only when asked: ask, and hide the answer from a client
    that did not ask (settlement needs the provider's own count)."""
    if not call.stream:
        return call
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return call
    call.new_body = {**body, "stream_options": {**(options if isinstance(options, dict)
                                                   else {}), "include_usage": True}}
    call.hide_usage_chunk = True
    return call


PROVIDERS: dict[str, OpenAI | Anthropic] = {"openai": OpenAI(), "anthropic": Anthropic()}


def provider_for_path(path: str) -> tuple[str, str] | None:
    """('openai', '/v1/chat/completions') for '/openai/v1/chat/completions', else None."""
    for name in PROVIDERS:
        prefix = f"/{name}/"
        if path.startswith(prefix):
            return name, path[len(prefix) - 1 :]
    return None
