"""Cohere: the v2 API (`/v2/chat`, streamed or not, and `/v2/embed`).

Facts from the cohere Python SDK 7.3.1 (Fern-generated from Cohere's API definition:
cohere/v2/raw_client.py, cohere/types/*.py, cohere/core/http_client.py) and
docs.cohere.com (v2 reference, "Streaming", "Errors", "Reasoning"):

- `ClientV2(base_url=B)` posts to `B/v2/chat` and `B/v2/embed` with
  `Authorization: Bearer <key>`; the chat body always says `"stream": true|false`;
- `max_tokens` absent means the model's maximum output ("If not set, max_tokens defaults
  to the model's maximum output token limit"); reasoning models think inside it (docs,
  "Reasoning": reason to the limit with a 31K budget, leaving 1K of the 32K for the
  answer) and the thinking streams as visible `content-delta` events of type
  `thinking`, so nothing billed is hidden;
- usage is `{billed_units: {input_tokens, output_tokens}, tokens: {...}, cached_tokens}`:
  `billed_units` is the bill (`tokens` counts the chat template too: 70 tokens for a
  bill of 5 in a recorded stream); a chat response carries it in `usage`, a stream once in
  `message-end.delta.usage`, an embedding in `meta.billed_units`;
- a stream is SSE, `event: <type>` plus a JSON `type`; the SDK reads only the JSON and
  stops at an optional `data: [DONE]`;
- errors are `{"message": "..."}` with the HTTP status (the SDK raises one class per
  status: 400 BadRequestError, 401 UnauthorizedError, 402 ApiError, 404 NotFoundError,
  422, 429 TooManyRequestsError, 498, 499, 500, 503), and inside a stream NOTHING raises
  (cohere/v2/raw_client.py `_iter` skips what it cannot parse): the native end of a failed
  stream is `message-end` with `finish_reason: "ERROR"` and `error: <message>`, which the
  client sees in `event.delta.error`.
"""

from __future__ import annotations

import json
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
    count_of,
    endpoint_of,
    input_count,
    int_field,
    model_of,
    unsupported,
)
from tokenfuse.providers.compatible import OPEN_WEIGHT_TOKENIZER

#: Chat request fields that are settings, not text the model reads.
_SETTINGS = frozenset({"model", "stream", "max_tokens", "temperature", "seed", "k", "p",
                       "frequency_penalty", "presence_penalty", "logprobs", "priority",
                       "safety_mode", "strict_tools", "thinking", "citation_options"})
#: A bound of the framing around each tool definition (names, the schema's wrapping).
PER_TOOL_TOKENS = 10
#: Dataset modes of the v2 API tokenfuse routes (`command-nightly` is the v1 generate
#: API's "completion" model: refused, so not priced).
_ROUTED_MODES = frozenset({"chat", "embedding"})


class Cohere(ProviderBase):
    name = "cohere"
    genai_provider = "cohere"
    default_upstream = "https://api.cohere.com"
    sdk_base_path = ""  # ClientV2(base_url=<gateway>/cohere) adds /v2/chat itself
    credentials = (Credential("authorization", "bearer"),)
    error_types: ClassVar[dict[str, str]] = {
        **ProviderBase.error_types, "budget": "budget_exceeded", "stream_cut": "budget_exceeded"}
    media_block_types = frozenset({"image_url", "document"})
    # The dataset: `cohere_chat` (v2 chat models, bare keys) and `cohere` (embeddings,
    # some keys `cohere/`-prefixed).
    price_dataset_providers = ("cohere_chat", "cohere")
    price_namespace = "cohere"
    usage_marker = "usage"  # message-end's delta.usage

    def price_model_id(self, model: str, mode: str, prefixed: bool) -> str | None:
        return model if mode in _ROUTED_MODES else None

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        if endpoint == "/v2/chat":
            model = model_of(body)
            tools = as_list(body.get("tools"))
            return Call(
                endpoint="chat", model=model, stream=body.get("stream") is True,
                max_output_tokens=int_field(body, "max_tokens"),
                prompt_parts=[{k: v for k, v in body.items()
                               if k not in _SETTINGS and k != "messages"}],
                messages=as_list(body.get("messages")),
                framing_tokens=PER_TOOL_TOKENS * len(tools),
            )
        if endpoint == "/v2/embed":
            model = model_of(body)
            if body.get("images") or _has_images(body.get("inputs")):
                # embed-v4 bills an image by its image tokens, v3 per image: not in the
                # price table, so not priced (fail-closed).
                raise RequestRejected(400, "unsupported_input",
                                      "tokenfuse does not price image embeddings; refused "
                                      "(fail-closed)")
            return Call(endpoint="embed", model=model, stream=False, max_output_tokens=0,
                        prompt_parts=[{k: v for k, v in body.items()
                                       if k in ("texts", "inputs")}],
                        inputs=input_count(body.get("texts") or body.get("inputs")))
        # v1 (chat, generate, embed), rerank and classify (billed per search unit or
        # per classification), datasets, fine-tuning, connectors...: not metered. (A
        # request without a body, e.g. GET /v1/models, the probe, is not priced.)
        raise unsupported(endpoint)

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        """A `document` content block (tool results, RAG) is its text; an image
        (Command A Vision) is of a size the request does not bound."""
        if block.get("type") == "document":
            return [block.get("document"), block.get("id")]
        return None

    def tokenizer(self, model: str) -> Tokenizer:
        # Command models' tokenizer (a 255k vocabulary) is not shipped; cl100k x 1.5
        # bounds it as it bounds the open-weight families.
        return OPEN_WEIGHT_TOKENIZER

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        if cap < 1:
            raise RequestRejected(402, "budget_exceeded",
                                  "the budget covers no output token for this request")
        return {**body, "max_tokens": cap}

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        """`tool_calls` of an assistant message (function name, arguments JSON text)."""
        if not isinstance(message, dict) or message.get("role") != "assistant":
            return []
        calls = []
        for call in as_list(message.get("tool_calls")):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                calls.append((str(function.get("name")), function.get("arguments")))
        return calls

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """The bill of a chat response, a `message-end` event or an embedding."""
        usage: Any = payload.get("usage")
        if not isinstance(usage, dict):
            delta = payload.get("delta")
            usage = delta.get("usage") if isinstance(delta, dict) else None
        if not isinstance(usage, dict):
            usage = payload.get("meta")  # embed: meta.billed_units
        if not isinstance(usage, dict):
            return None
        billed = usage.get("billed_units")
        if not isinstance(billed, dict):
            billed = usage.get("tokens")  # no bill stated: the raw count (larger) instead
        if not isinstance(billed, dict):
            return None
        return TokenUsage(input=count_of(billed.get("input_tokens")),
                          output=count_of(billed.get("output_tokens")))

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        """Generated text of a stream event: answer and thinking deltas, the tool plan,
        tool names and argument deltas. (Citations quote the answer: not counted twice.)"""
        kind = payload.get("type")
        delta = payload.get("delta")
        message = delta.get("message") if isinstance(delta, dict) else None
        if not isinstance(message, dict):
            return []
        if kind in ("content-delta", "content-start"):
            content = message.get("content")
            if isinstance(content, dict):
                return [v for k in ("text", "thinking") if isinstance(v := content.get(k), str)]
        elif kind == "tool-plan-delta":
            plan = message.get("tool_plan")
            return [plan] if isinstance(plan, str) else []
        elif kind in ("tool-call-start", "tool-call-delta"):
            call = message.get("tool_calls")
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                return [v for k in ("name", "arguments")
                        if isinstance(v := function.get(k), str)]
        return []

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        """Text and thinking of the message's content, its tool plan and tool calls."""
        message = payload.get("message")
        if not isinstance(message, dict):
            return []
        out: list[str] = []
        for part in as_list(message.get("content")):
            if isinstance(part, dict):
                out += [v for k in ("text", "thinking") if isinstance(v := part.get(k), str)]
        if isinstance(message.get("tool_plan"), str):
            out.append(message["tool_plan"])
        for name, arguments in self.tool_calls(message):
            out += [name, arguments if isinstance(arguments, str)
                    else json.dumps(arguments, separators=(",", ":"))]
        return out

    def is_final_event(self, event: str, data: str) -> bool:
        """`message-end` (a `[DONE]` may follow it). Cohere names the event on its
        `event:` line; without one, the JSON `type` says it (what the SDK reads)."""
        if event == "message-end" or data == "[DONE]":
            return True
        if event != "message" or '"message-end"' not in data:
            return False
        try:
            payload = json.loads(data)
        except ValueError:
            return False
        return isinstance(payload, dict) and payload.get("type") == "message-end"

    def error_document(self, kind: ErrorKind, code: str, message: str) -> dict[str, Any]:
        """`{"message": ...}` (docs.cohere.com/reference/errors); the SDK keeps the whole
        body in the error it raises, `code` included."""
        return {"message": message, "code": code}

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        """Cohere's own end of a failed stream: `message-end` with `finish_reason`
        ERROR and the message in `delta.error` (ChatMessageEndEventDelta.error). The SDK
        raises nothing mid-stream, whatever is sent: the client reads `delta.error`."""
        event = {"type": "message-end",
                 "delta": {"finish_reason": "ERROR", "error": message},
                 "tokenfuse": {"code": code, **details}}
        return b"event: message-end\ndata: " + json.dumps(event).encode() + b"\n\n"

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("authorization", f"Bearer {secret}"), ()

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        return "/v1/models", {"authorization": f"Bearer {secret}"}


def _has_images(inputs: Any) -> bool:
    """Whether mixed `inputs` of /v2/embed hold an image part."""
    for item in as_list(inputs):
        content = item.get("content") if isinstance(item, dict) else None
        for part in as_list(content):
            if isinstance(part, dict) and part.get("type") not in (None, "text"):
                return True
    return False
