"""The OpenAI-compatible family: vendors (and self-hosted servers) that speak OpenAI's chat
completions wire format with quirks of their own: where stream usage arrives, whether they
accept `stream_options`, what their usage holds (cache hits, reasoning, a reported cost),
which reset headers they send.

One class, `OpenAICompatible`, configured per vendor by a `Dialect`; the few vendors whose
usage needs more than the dialect say so in a subclass. Facts are checked against each
vendor's public API reference and SDK (source and date next to each dialect).
(One dialect per vendor with its sources, hence its length.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal
from typing import Any, ClassVar

from tokenfuse.money import reported_usd_to_nano
from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.base import Call, Credential, Tokenizer, count_of, int_field
from tokenfuse.providers.openai import OpenAI

#: Open-weight models' tokenizers (Llama, Mistral, Qwen, DeepSeek, Gemma: vocabularies of
#: 32k to 256k) are not shipped: cl100k times this bounds them. A 32k SentencePiece vocabulary
#: (Llama 2, Mistral 7B) needs up to ~1.4x cl100k's tokens on English and code; the 128k+
#: vocabularies need fewer. Settlement uses the provider's own count; this only bounds the
#: estimate and the mid-stream count.
OPEN_WEIGHT_TOKENIZER = Tokenizer("cl100k_base", 150)


@dataclass(frozen=True)
class Dialect:
    """What differs between OpenAI-compatible vendors."""

    #: "ask": the vendor reports stream usage only when `stream_options.include_usage` is
    #: set (tokenfuse sets it and hides the extra chunk); "always": the vendor reports it
    #: unasked (on its last chunk) and may reject `stream_options`: never injected.
    stream_usage: str = "ask"
    #: The vendor's models may bill reasoning they do not stream.
    reasoning_by_model: bool = False
    #: Output cap fields the vendor honours, the one tokenfuse writes first (a field it
    #: ignores bounds nothing: Ollama ignores `max_completion_tokens`, Mistral refuses it).
    cap_fields: tuple[str, ...] = ("max_tokens",)
    #: When the vendor says a key may be used again: `retry-after` (seconds) or
    #: `retry-after-ms` first, else the reset header of a limit whose remaining count is 0:
    #: (remaining header, reset header, format "seconds" | "duration" (`2m59.56s`)).
    reset_headers: tuple[tuple[str, str, str], ...] = ()
    #: The cheapest authenticated request that proves a key (path relative to the upstream).
    probe_path: str = "/v1/models"
    tokenizer: Tokenizer = OPEN_WEIGHT_TOKENIZER
    #: A fixed fee per request the vendor bills on top of tokens (bound, nano-USD).
    request_fee_nano: int = 0
    #: A cap value the vendor documents as "no limit" (Cerebras: -1): read as no cap.
    unlimited_cap: int | None = None


#: The vendors OpenTelemetry's GenAI conventions name (`gen_ai.provider.name`); the others
#: are traced under their route name.
GENAI_PROVIDERS = {"mistral": "mistral_ai", "xai": "x_ai", "groq": "groq",
                   "deepseek": "deepseek", "perplexity": "perplexity"}


class OpenAICompatible(OpenAI):
    """An OpenAI-compatible vendor or server, routed at `/<name>/<its own path>`."""

    credentials = (Credential("authorization", "bearer"),)

    def __init__(self, name: str, default_upstream: str, sdk_base_path: str,
                 dialect: Dialect, price_dataset_providers: tuple[str, ...] = (),
                 dataset_model_id: Callable[[str, str, bool], str | None] | None = None,
                 ) -> None:
        self.name = name
        self.default_upstream = default_upstream
        self.sdk_base_path = sdk_base_path
        self.dialect = dialect
        self.reasoning_by_model = dialect.reasoning_by_model
        self.asks_stream_usage = dialect.stream_usage == "ask"
        self.price_dataset_providers = price_dataset_providers
        #: Prices are looked up as `<name>/<model>` (a model id means another price at
        #: another vendor).
        self.price_namespace = name
        self._dataset_model_id = dataset_model_id
        self.genai_provider = GENAI_PROVIDERS.get(name, name)

    def price_model_id(self, model: str, mode: str, prefixed: bool) -> str | None:
        return (self._dataset_model_id(model, mode, prefixed) if self._dataset_model_id
                else model)

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        unlimited = self.dialect.unlimited_cap
        if unlimited is not None and any(body.get(f) == unlimited
                                         for f in self.dialect.cap_fields):
            # "No limit": bounded by the model's maximum, which the clamp writes in.
            body = {k: v for k, v in body.items()
                    if not (k in self.dialect.cap_fields and v == unlimited)}
        call = super().parse_request(path, body)
        if call.endpoint == "chat.completions":
            honoured = [c for f in self.dialect.cap_fields
                        if (c := int_field(body, f)) is not None]
            call.max_output_tokens = max(honoured) if honoured else None
        elif call.endpoint == "completions" and body.get("max_tokens") is None:
            # OpenAI's legacy default of 16 is OpenAI's: another vendor's (Mistral FIM,
            # Fireworks, Together) is not documented, so the model's maximum is reserved
            # and written in.
            call.max_output_tokens = None
        call.request_fee_nano = self.dialect.request_fee_nano if call.priced else 0
        # Reasoning asked to be billed but not shown: Groq `reasoning_format: hidden` /
        # `include_reasoning: false`, OpenRouter `reasoning.exclude`.
        reasoning = body.get("reasoning")
        call.hidden_output = call.hidden_output or body.get("reasoning_format") == "hidden" \
            or body.get("include_reasoning") is False \
            or (isinstance(reasoning, dict) and reasoning.get("exclude") is True)
        return call

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        if call.endpoint != "chat.completions":
            return super().with_output_cap(body, call, cap)
        fields = self.dialect.cap_fields
        return {**body, **dict.fromkeys([f for f in fields if f in body] or fields[:1], cap)}

    def tokenizer(self, model: str) -> Tokenizer:
        return self.dialect.tokenizer

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        return None  # another vendor's vision rules are not OpenAI's: size unknown

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        raw = _usage_object(payload)
        if raw is None:
            return None
        usage = super().usage(payload if payload.get("usage") is raw
                              else {**payload, "usage": raw})
        if usage is None:
            return None
        cached = count_of(raw.get("prompt_cache_hit_tokens"))  # DeepSeek's name for cache reads
        if cached and not usage.cache_read:
            total = usage.input
            usage = replace(usage, input=max(0, total - cached), cache_read=min(total, cached))
        billed = reported_cost(raw)
        if billed is not None:
            usage = replace(usage, billed_nano=billed)
        return usage

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        out = super().stream_output(event, payload)
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and isinstance(delta.get("content"), list):
                out.extend(_texts(delta["content"]))  # Mistral's content chunks
        return out

    def is_usage_only_chunk(self, payload: dict[str, Any]) -> bool:
        return payload.get("choices") == [] and _usage_object(payload) is not None

    def retry_after_ms(self, headers: dict[str, str]) -> int:
        said = _reset_ms(headers.get("retry-after-ms", ""), "ms")
        if said < 0:
            said = _reset_ms(headers.get("retry-after", ""), "seconds")
        if said >= 0:
            return said
        resets = [_reset_ms(headers.get(reset, ""), form)
                  for remaining, reset, form in self.dialect.reset_headers
                  if headers.get(remaining, "").strip() == "0"]
        return max(resets, default=-1)

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("authorization", f"Bearer {secret}"), ()

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        return self.dialect.probe_path, {"authorization": f"Bearer {secret}"}


def _usage_object(payload: dict[str, Any]) -> dict[str, Any] | None:
    """The usage object of a response or chunk: top level, or Groq's `x_groq.usage` (its
    stream reports usage there, on the last chunk: console.groq.com/docs/api-reference)."""
    usage = payload.get("usage")
    if isinstance(usage, dict):
        return usage
    extra = payload.get("x_groq")
    usage = extra.get("usage") if isinstance(extra, dict) else None
    return usage if isinstance(usage, dict) else None


def reported_cost(usage: dict[str, Any]) -> int | None:
    """The bill a vendor reports in its usage, nano-USD rounded up: OpenRouter's `cost`
    (credits, USD: openrouter.ai/docs/use-cases/usage-accounting), Perplexity's
    `cost.total_cost` (docs.perplexity.ai/api-reference/chat-completions-post)."""
    cost = usage.get("cost")
    if isinstance(cost, dict):
        cost = cost.get("total_cost")
    if isinstance(cost, bool) or not isinstance(cost, int | Decimal | str):
        return None
    try:
        return reported_usd_to_nano(cost)
    except ValueError:
        return None


def _texts(node: Any) -> list[str]:
    """Every `text` / `thinking` string inside a list of content chunks."""
    out: list[str] = []
    if isinstance(node, list):
        for item in node:
            out.extend(_texts(item))
    elif isinstance(node, dict):
        for key in ("text", "thinking"):
            value = node.get(key)
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, list):
                out.extend(_texts(value))
    return out


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?"
                       r"(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$")


def _ceil(amount: Decimal) -> int:
    return int(amount.to_integral_value(rounding=ROUND_CEILING))


def _reset_ms(value: str, form: str) -> int:
    """A reset header's wait in ms, rounded up (-1 when absent or unreadable). `duration`
    is the Go-style form Groq sends in `x-ratelimit-reset-*` (`2m59.56s`, `7.66s`,
    `250ms`); `seconds` may be fractional (Cerebras: `11.382867097854614`)."""
    value = value.strip()
    if not value:
        return -1
    try:
        if form in ("seconds", "ms"):
            amount = Decimal(value) * (1000 if form == "seconds" else 1)
            return _ceil(amount) if amount.is_finite() and amount >= 0 else -1
        match = _DURATION.match(value)
        if match is None or not any(match.groups()):
            return -1
        h, m, s, ms = (Decimal(g) if g else Decimal(0) for g in match.groups())
        return _ceil(((h * 60 + m) * 60 + s) * 1000 + ms)
    except ArithmeticError:
        return -1


#: Groq's limits (console.groq.com/docs/rate-limits): requests per day, tokens per minute.
GROQ_RESETS = (("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "duration"),
               ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests", "duration"))
#: Cerebras's (inference-docs.cerebras.ai/support/rate-limits), in seconds.
CEREBRAS_RESETS = (
    ("x-ratelimit-remaining-tokens-minute", "x-ratelimit-reset-tokens-minute", "seconds"),
    ("x-ratelimit-remaining-requests-day", "x-ratelimit-reset-requests-day", "seconds"))


class XAI(OpenAICompatible):
    """xAI counts chat reasoning apart from `completion_tokens` (total = prompt +
    completion + reasoning) and reports the exact bill as `cost_in_usd_ticks`
    (10^10 ticks per USD: docs.x.ai/developers/cost-tracking)."""

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        usage = super().usage(payload)
        raw = _usage_object(payload)
        if usage is None or raw is None:
            return usage
        details = raw.get("completion_tokens_details")
        reasoning = count_of(details.get("reasoning_tokens")) if isinstance(details, dict) \
            else 0
        prompt = count_of(raw.get("prompt_tokens"))
        completion = count_of(raw.get("completion_tokens"))
        if reasoning and count_of(raw.get("total_tokens")) == prompt + completion + reasoning:
            usage = replace(usage, reasoning=reasoning)
        ticks = raw.get("cost_in_usd_ticks")
        if isinstance(ticks, int) and not isinstance(ticks, bool) and ticks >= 0:
            usage = replace(usage, billed_nano=-(-ticks // 10))
        return usage


class Perplexity(OpenAICompatible):
    """Sonar Deep Research also bills citation tokens (input the request does not show),
    hidden reasoning and $5 per 1,000 search queries (docs.perplexity.ai/getting-started/
    pricing): its input is bounded by the context window and its searches by
    `DEEP_RESEARCH_MAX_SEARCHES`. `usage.cost.total_cost` settles it."""

    #: A bound of the searches one deep-research call makes (it reports "dozens").
    DEEP_RESEARCH_MAX_SEARCHES = 100
    SEARCH_FEE_NANO = 5_000_000

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        call = super().parse_request(path, body)
        if "deep-research" in call.model:
            call.server_context = True
            call.hidden_output = True
            call.request_fee_nano = self.DEEP_RESEARCH_MAX_SEARCHES * self.SEARCH_FEE_NANO
        return call


class OpenRouter(OpenAICompatible):
    """OpenRouter resells other vendors' models (`openai/gpt-4o`, `anthropic/claude-…`) at
    their list prices (openrouter.ai/docs/faq: no markup on inference) and reports the
    bill as `usage.cost`, which settles the call. LiteLLM's dataset has no OpenRouter
    entries, so without an `openrouter/<model>` price the reservation is bounded by the
    originating vendor's own price."""

    #: OpenRouter's vendor prefix → (tokenfuse price namespace, model id rewrite).
    ORIGINS: ClassVar[dict[str, str | None]] = {
        "openai": None, "anthropic": None, "mistralai": "mistral", "deepseek": "deepseek",
        "x-ai": "xai"}

    def price_ids(self, model: str) -> tuple[tuple[str | None, str], ...]:
        ids: list[tuple[str | None, str]] = [(self.price_namespace, model)]
        origin, sep, rest = model.partition("/")
        if sep and origin in self.ORIGINS:
            rest = rest.split(":", 1)[0]  # `:free`, `:nitro` variants
            if origin == "anthropic":  # claude-sonnet-4.5 → claude-sonnet-4-5
                rest = rest.replace(".", "-")
            ids.append((self.ORIGINS[origin], rest))
        return tuple(ids)


def prefixed_only(model: str, mode: str, prefixed: bool) -> str | None:
    """Together's dataset ids are `together_ai/<org>/<model>`, as its API takes them; its
    unprefixed keys (`together-ai-4.1b-8b`) are LiteLLM's fallback prices by parameter
    count, not models."""
    return model if prefixed else None


def fireworks_model_id(model: str, mode: str, prefixed: bool) -> str | None:
    """The id Fireworks' chat API takes (docs.fireworks.ai/api-reference/post-chatcompletions:
    `accounts/<account>/models|routers/<name>`) for a LiteLLM name, by LiteLLM's own rule
    (litellm 1.110.2, litellm/llms/fireworks_ai/common_utils.py
    `resolve_fireworks_resource_name`): `-fast` names and the `auto`/`auto-instant`/
    `firerouter` routers are routers, the rest models. Embeddings keep their bare id
    (`nomic-ai/nomic-embed-text-v1.5`: Fireworks' embeddings refuse the accounts/ form, per
    litellm/llms/fireworks_ai/embed/). Unprefixed keys (`fireworks-ai-default`) are LiteLLM's
    fallback prices by size, not models."""
    if not prefixed:
        return None
    if mode == "embedding" or model.startswith(("accounts/", "FW-")) or "#" in model:
        return model
    if model.startswith(("routers/", "models/")):
        return f"accounts/fireworks/{model}"
    if model.endswith("-fast") or model in ("firerouter", "auto", "auto-instant") \
            or model.startswith("firerouter/"):
        return f"accounts/fireworks/routers/{model}"
    return f"accounts/fireworks/models/{model}"


#: The vendors tokenfuse knows, with the path their SDK (or OpenAI's SDK with `base_url`)
#: puts after the upstream. Sources checked 2026-12 (docs/providers.md has them all).
VENDORS: tuple[OpenAICompatible, ...] = (
    # docs.mistral.ai/api: usage on the last chunk unasked; unknown body fields (also
    # `stream_options`, `max_completion_tokens`) are a 422.
    OpenAICompatible("mistral", "https://api.mistral.ai", "/v1",
                     Dialect(stream_usage="always"), ("mistral",)),
    # console.groq.com/docs/api-reference: stream usage in `x_groq.usage` on the last chunk
    # unasked; unknown body fields are a 400.
    OpenAICompatible("groq", "https://api.groq.com", "/openai/v1",
                     Dialect(stream_usage="always", reset_headers=GROQ_RESETS,
                             cap_fields=("max_completion_tokens", "max_tokens"),
                             probe_path="/openai/v1/models"), ("groq",)),
    # api-docs.deepseek.com: `stream_options` documented (usage on the last chunk);
    # prompt_cache_hit/miss_tokens; deepseek-reasoner streams `reasoning_content`.
    OpenAICompatible("deepseek", "https://api.deepseek.com", "",
                     Dialect(probe_path="/models"), ("deepseek",)),
    # docs.x.ai: cumulative usage on every chunk unasked; grok-4 reasons unstreamed.
    XAI("xai", "https://api.x.ai", "/v1",
        Dialect(stream_usage="always", reasoning_by_model=True,
                cap_fields=("max_completion_tokens", "max_tokens")), ("xai",)),
    # openrouter.ai/docs/use-cases/usage-accounting: usage (with `cost`) on the last chunk
    # always (`stream_options` has no effect); `: OPENROUTER PROCESSING` comments; errors
    # mid-stream as a chunk with `error`.
    OpenRouter("openrouter", "https://openrouter.ai", "/api/v1",
                     Dialect(stream_usage="always", reasoning_by_model=True,
               cap_fields=("max_tokens", "max_completion_tokens"),
               probe_path="/api/v1/key"), ("openrouter",)),
    # docs.together.ai: usage on the last chunk unasked.
    OpenAICompatible("together", "https://api.together.xyz", "/v1",
                     Dialect(stream_usage="always"), ("together_ai",), prefixed_only),
    # docs.fireworks.ai: `stream_options.include_usage` supported (LiteLLM sets it).
    OpenAICompatible("fireworks", "https://api.fireworks.ai", "/inference/v1",
                     Dialect(probe_path="/inference/v1/models"),
                     ("fireworks_ai", "fireworks_ai-embedding-models"), fireworks_model_id),
    # inference-docs.cerebras.ai: usage (and time_info) on the last chunk.
    OpenAICompatible("cerebras", "https://api.cerebras.ai", "/v1",
                     Dialect(stream_usage="always", reset_headers=CEREBRAS_RESETS,
                             cap_fields=("max_completion_tokens", "max_tokens"),
                             unlimited_cap=-1),
                     ("cerebras",)),
    # docs.perplexity.ai: cumulative usage (with `cost`) on the chunks unasked; a request
    # fee by search context size, at most $14 per 1,000 requests (sonar-pro, high).
    Perplexity("perplexity", "https://api.perplexity.ai", "",
               Dialect(stream_usage="always", reasoning_by_model=True,
                       probe_path="/models", request_fee_nano=14_000_000),
               ("perplexity",)),
)
def declared(name: str) -> OpenAICompatible:
    """An upstream the operator declares (`TOKENFUSE_OPENAI_COMPATIBLE`): vLLM, LM Studio,
    an internal gateway. Asked for stream usage (vLLM, LM Studio and LiteLLM accept
    `stream_options`); priced only from the operator's price file (`<name>/<model>`)."""
    return OpenAICompatible(name, "", "/v1", Dialect(
        reasoning_by_model=True, cap_fields=("max_tokens", "max_completion_tokens")))
