"""OpenAI: chat completions, legacy completions, embeddings and the Responses API, and
which encoding counts each model's tokens. Four endpoints with their own caps, tools and
usage shapes, hence its length."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

from tiktoken.model import encoding_name_for_model

from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.base import (
    Call,
    Credential,
    ErrorKind,
    ProviderBase,
    Tokenizer,
    as_list,
    endpoint_of,
    input_count,
    int_field,
    model_of,
    unsupported,
)


class OpenAI(ProviderBase):
    name = "openai"
    genai_provider = "openai"
    default_upstream = "https://api.openai.com"
    sdk_base_path = "/v1"
    error_types: ClassVar[dict[str, str]] = {
        **ProviderBase.error_types, "budget": "insufficient_quota",
        "stream_cut": "insufficient_quota"}
    credentials = (Credential("authorization", "bearer"),)  # what api.openai.com reads
    # Content parts whose tokens are not their text.
    media_block_types = frozenset({"image_url", "input_image", "input_file", "file"})
    reasoning_by_model = True  # o-series and gpt-5 reason whether asked or not
    price_dataset_providers = ("openai",)
    #: Stream usage comes only when `stream_options.include_usage` asks for it: tokenfuse
    #: asks (and hides the extra chunk from a client that did not).
    asks_stream_usage = True

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        model = model_of(body)
        stream = body.get("stream") is True
        choices = int_field(body, "n") or 1
        if endpoint.endswith("/chat/completions"):
            return self._with_stream_usage(body, Call(
                endpoint="chat.completions", model=model, stream=stream, choices=choices,
                max_output_tokens=_largest_cap(body, "max_completion_tokens", "max_tokens"),
                prompt_parts=[_rest(body, "messages")],
                messages=as_list(body.get("messages")),
                hidden_output="reasoning_effort" in body,
                framing_tokens=_tool_framing(body),
            ))
        if endpoint.endswith("/completions"):
            best_of = int_field(body, "best_of") or 1
            return self._with_stream_usage(body, Call(
                endpoint="completions", model=model, stream=stream,
                # every prompt of a batch gets its own n (or best_of) completions
                choices=max(choices, best_of) * _prompt_count(body.get("prompt")),
                max_output_tokens=int_field(body, "max_tokens") or 16,
                prompt_parts=[_rest(body)],
            ))
        if endpoint.endswith("/embeddings"):
            return Call(endpoint="embeddings", model=model, stream=False, max_output_tokens=0,
                        prompt_parts=[_rest(body)], inputs=input_count(body.get("input")))
        if endpoint.endswith("/responses"):
            fee = max((_tool_call_fee(str(t.get("type", "")), model)
                       for t in as_list(body.get("tools")) if isinstance(t, dict)
                       and str(t.get("type", "")).startswith(BUILTIN_TOOL_PREFIXES)),
                      default=None)
            uses = 0
            if fee is not None:
                uses = int_field(body, "max_tool_calls") or DEFAULT_TOOL_CALLS
            call = Call(
                endpoint="responses", model=model, stream=stream,
                max_output_tokens=int_field(body, "max_output_tokens"),
                prompt_parts=[_rest(body, "input")],
                messages=as_list(body.get("input")),
                hidden_output="reasoning" in body,
                framing_tokens=_tool_framing(body),
                # Server-side conversation state, tool results: sizes not in the request.
                server_context=any(body.get(k) for k in SERVER_CONTEXT_FIELDS) or bool(uses),
                server_tool_uses=uses,
                server_tool_fee_nano=fee or 0,
            )
            if uses and body.get("max_tool_calls") is None:
                call.new_body = {**body, "max_tool_calls": uses}
            return call
        raise unsupported(endpoint)

    def _with_stream_usage(self, body: dict[str, Any], call: Call) -> Call:
        """OpenAI reports stream usage only when asked: ask, and hide the answer from a
        client that did not ask (settlement needs the provider's own count)."""
        if not call.stream or not self.asks_stream_usage:
            return call
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return call
        call.new_body = {**body, "stream_options": {
            **(options if isinstance(options, dict) else {}), "include_usage": True}}
        call.hide_usage_chunk = True
        return call

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        """Images by OpenAI's vision rules at their largest (the request may not show the
        dimensions); files (PDFs, file ids) are of unknown size."""
        kind = block.get("type")
        if kind not in ("image_url", "input_image"):
            return None
        image = block.get("image_url")
        detail = (image.get("detail") if isinstance(image, dict) else None) \
            or block.get("detail") or "auto"
        base, largest = _image_tokens(model)
        return base if detail == "low" else largest

    def tokenizer(self, model: str) -> Tokenizer:
        return _tokenizer(model)

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        if call.endpoint == "responses":
            return {**body, "max_output_tokens": cap}
        if call.endpoint == "chat.completions":
            # Every cap field the request sent (whichever the provider honours), else the
            # current one.
            sent = [f for f in ("max_completion_tokens", "max_tokens") if f in body]
            return {**body, **dict.fromkeys(sent or ["max_completion_tokens"], cap)}
        return {**body, "max_tokens": cap}

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        """Chat `tool_calls` of an assistant message; a Responses `function_call` item."""
        if not isinstance(message, dict):
            return []
        calls = []
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                calls.append((str(function.get("name")), function.get("arguments")))
        if message.get("type") == "function_call":
            calls.append((str(message.get("name")), message.get("arguments")))
        return calls

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """Usage from a response object or a stream chunk (None when absent, or when it
        cannot be the bill)."""
        holder: Any = payload
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            holder = payload.get("response")  # Responses API stream events
            usage = holder.get("usage") if isinstance(holder, dict) else None
            if not isinstance(usage, dict):
                return None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0
        output = usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0
        if output == 0 and _cut_by_output_cap(holder):
            # Recorded (gpt-4o, 2025-07): `response.incomplete` after 16 deltas, usage all
            # zero. A response stopped by its output cap generated output: no bill.
            return None
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        cached = min(prompt, details.get("cached_tokens") or 0)
        fees, searches, search_fee = _tool_fees(payload)  # reasoning is inside `output`
        return TokenUsage(input=prompt - cached, output=output, cache_read=cached,
                          tool_fees_nano=fees, web_searches=searches, web_search_nano=search_fee)

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

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        """Chat `message` content, refusal and tool calls; completions `text`; Responses
        `output` items (message text, function calls)."""
        out: list[str] = []
        for choice in as_list(payload.get("choices")):
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            parts = [choice.get("text")]
            if isinstance(message, dict):
                parts += [message.get("content"), message.get("refusal")]
                for name, arguments in self.tool_calls(message):
                    parts += [name, arguments]
            out += [p for p in parts if isinstance(p, str)]
        for item in as_list(payload.get("output")):
            if not isinstance(item, dict):
                continue
            for part in as_list(item.get("content")):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
            out += [v for name, args in self.tool_calls(item) for v in (name, args)
                    if isinstance(v, str)]
        return out

    def is_usage_only_chunk(self, payload: dict[str, Any]) -> bool:
        return payload.get("choices") == [] and isinstance(payload.get("usage"), dict)

    def is_final_event(self, event: str, data: str) -> bool:
        """The stream's last event: `[DONE]` (chat, completions) or a Responses API end."""
        return data == "[DONE]" or event in ("response.completed", "response.incomplete",
                                             "response.failed")

    def error_document(self, kind: ErrorKind, code: str, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": self.error_type(kind), "code": code,
                          "param": None}}

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        """The in-band error OpenAI sends mid-stream; the SDK raises APIError on it."""
        return b"data: " + self.error_body(kind, code, message, details) + b"\n\n"

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("authorization", f"Bearer {secret}"), ("x-api-key",)

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        return "/v1/models", {"authorization": f"Bearer {secret}"}


#: Responses API fields that bring server-side content into the input.
#: The package that ships OpenAI's encoding files (`<package>/data/<name>.tiktoken.gz`).
ENCODINGS_PACKAGE = "bpe_openai"
#: The encodings tiktoken names for OpenAI models that tokenfuse counts with another one:
#: gpt-oss's harmony is o200k plus chat special tokens; the r50k/p50k models are retired.
_ENCODING_STANDS_IN = {"o200k_harmony": "o200k_base", "p50k_base": "cl100k_base",
                       "p50k_edit": "cl100k_base", "r50k_base": "cl100k_base",
                       "gpt2": "cl100k_base"}


@lru_cache(maxsize=1024)
def _tokenizer(model: str) -> Tokenizer:
    """OpenAI's own encoding of the model, by tiktoken's maintained model table (o200k for
    gpt-4o, gpt-4.1, gpt-4.5, gpt-5, the o-series; cl100k for gpt-4, gpt-4-turbo,
    gpt-3.5, the embeddings); a model it does not know yet is a newer one: o200k."""
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        name = "o200k_base"
    return Tokenizer(_ENCODING_STANDS_IN.get(name, name))


SERVER_CONTEXT_FIELDS = ("previous_response_id", "conversation", "prompt")
#: Built-in (server-side) tools of the Responses API: each call may bill a fee and adds
#: its results to the input. `max_tool_calls` bounds them; tokenfuse sets it when absent.
BUILTIN_TOOL_PREFIXES = ("web_search", "file_search", "code_interpreter", "image_generation",
                         "computer_use", "mcp")
DEFAULT_TOOL_CALLS = 5
# Upper bounds of one call's fee, nano-USD (platform.openai.com/docs/pricing, "Built-in
# tools", checked 2026-12): web search $25 per 1,000 calls on gpt-4o / gpt-4.1 search, $10
# on reasoning models; file search $2.50 per 1,000; code interpreter $0.03 per container
# (charged per call: a bound); image generation at most ~$0.25 per image (gpt-image-1, high
# quality, largest size).
_TOOL_FEES = {"web_search": 25_000_000, "file_search": 2_500_000,
              "code_interpreter": 30_000_000, "image_generation": 250_000_000}
_REASONING_WEB_SEARCH_NANO = 10_000_000


def _tool_call_fee(kind: str, model: str) -> int:
    for prefix, fee in _TOOL_FEES.items():
        if kind.startswith(prefix):
            if prefix == "web_search" and model.startswith(("o", "gpt-5")):
                return _REASONING_WEB_SEARCH_NANO
            return fee
    return 0


def _tool_fees(payload: dict[str, Any]) -> tuple[int, int, int]:
    """Built-in tool calls of a Responses object (or its stream event): (fees of the
    tools but web search, web searches, the fee of one search where the price table has
    no `web_search_per_call`)."""
    response = payload.get("response") if isinstance(payload.get("response"), dict) \
        else payload
    output = response.get("output")
    kinds = [str(item.get("type", "")).removesuffix("_call") for item in output
             if isinstance(item, dict) and str(item.get("type", "")).endswith("_call")] \
        if isinstance(output, list) else []
    model = str(response.get("model", ""))
    searches = sum(1 for kind in kinds if kind.startswith("web_search"))
    return (sum(_tool_call_fee(k, model) for k in kinds if not k.startswith("web_search")),
            searches, _tool_call_fee("web_search", model))

# Image input tokens (base for low detail, largest for high/auto) per model family, from
# OpenAI's vision pricing rules: tiles models bill base + per-512px-tile tokens for at
# most 2048x768 after scaling (8 tiles); patch models bill 32px patches, at most 1,536,
# times a multiplier. Checked 2026-12 against platform.openai.com/docs/guides/images-vision.
_IMAGE_TOKENS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("gpt-4o-mini", (2833, 2833 + 5667 * 8)),
    ("gpt-4.1-mini", (2489, 2489)),  # 1,536 patches x 1.62
    ("gpt-4.1-nano", (3779, 3779)),  # 1,536 patches x 2.46
    ("o4-mini", (2642, 2642)),  # 1,536 patches x 1.72
    ("o1", (75, 75 + 150 * 8)),
    ("o3", (75, 75 + 150 * 8)),
    ("gpt-4o", (85, 85 + 170 * 8)),
    ("gpt-4.1", (85, 85 + 170 * 8)),
    ("gpt-4.5", (85, 85 + 170 * 8)),
)
#: Models not in the table: the largest any model bills.
_IMAGE_TOKENS_UNKNOWN = (2833, 2833 + 5667 * 8)


def _image_tokens(model: str) -> tuple[int, int]:
    for prefix, tokens in _IMAGE_TOKENS:
        if model.startswith(prefix):
            return tokens
    return _IMAGE_TOKENS_UNKNOWN


#: A bound of the framing OpenAI adds around each tool / function definition.
PER_TOOL_TOKENS = 10


def _tool_framing(body: dict[str, Any]) -> int:
    """Framing of every tool definition and of a structured-output schema (`response_format`
    / Responses `text.format`: the schema is framed like a tool's)."""
    text = body.get("text")
    formats = (body.get("response_format"), text.get("format") if isinstance(text, dict)
               else None)
    schemas = sum(1 for f in formats if isinstance(f, dict) and f.get("type") != "text")
    return PER_TOOL_TOKENS * (len(as_list(body.get("tools")))
                              + len(as_list(body.get("functions"))) + schemas)


def _largest_cap(body: dict[str, Any], *names: str) -> int | None:
    """The largest of the cap fields present: a request with two bounds is priced at the
    one that lets the provider write more."""
    caps = [c for name in names if (c := int_field(body, name)) is not None]
    return max(caps) if caps else None


def _prompt_count(prompt: Any) -> int:
    """Prompts in a completions request: a string or a token list is one; a list of
    strings or of token lists is a batch."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


def _rest(body: dict[str, Any], *conversation: str) -> dict[str, Any]:
    """Everything the provider may tokenize besides the conversation."""
    return {k: v for k, v in body.items() if k not in conversation}


def _cut_by_output_cap(response: Any) -> bool:
    """A Responses object that ended `incomplete` because it reached `max_output_tokens`."""
    if not isinstance(response, dict) or response.get("status") != "incomplete":
        return False
    details = response.get("incomplete_details")
    return isinstance(details, dict) and details.get("reason") == "max_output_tokens"
