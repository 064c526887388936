"""The OpenAI-compatible vendors (and Azure OpenAI) as the fake provider speaks them: one
``Dialect`` per vendor, consulted by ``fake_provider`` for requests under ``/<vendor>/...``
(the harness points ``TOKENFUSE_UPSTREAM_<VENDOR>`` at ``<fake>/<vendor>``).

Where money is concerned each vendor behaves as its API does (each fact names its source;
"EMPIRICAL" facts were checked against the vendors' own SDKs, see the notes of issue 13):
the path it serves, the credential header it bills, where stream usage goes and whether it
must be asked for, which request fields it refuses (a strict vendor answers 4xx to a field it
does not know: tokenfuse's injections are caught), how it reports cache hits, hidden
reasoning and its own bill (``cost``), its error shape and 429 reset headers.

Every bill is computed here, by ``bill_nano``, with integers from this module's own price
list (``PRICES``, USD per 1M tokens as decimal strings), rounded up once like a provider
does; a reported ``cost`` is that bill in USD with 9 decimals (exact). Never imports tokenfuse.
(One dialect per vendor with its sources, and the chunks each writes, hence its length.)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

#: OpenAI's chat request fields (platform.openai.com/docs/api-reference/chat/create):
#: what a lenient vendor accepts (it ignores any other, like OpenRouter and Ollama do).
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty",
    "logit_bias", "logprobs", "top_logprobs", "user", "seed", "tools", "tool_choice",
    "parallel_tool_calls", "response_format", "reasoning_effort", "metadata", "store",
    "service_tier", "modalities", "audio", "prediction", "functions", "function_call",
})
#: mistralai 3.7.0's ChatCompletionRequest fields (EMPIRICAL: the SDK's pydantic model):
#: Mistral refuses any other with 422 extra_forbidden, `stream_options` and
#: `max_completion_tokens` included (dnakov/anon-kode#53; editor-code-assistant/eca#231).
MISTRAL_FIELDS = frozenset({
    "frequency_penalty", "guardrails", "logprobs", "max_tokens", "messages", "metadata",
    "min_tokens", "model", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "prompt_logprobs", "prompt_mode", "random_seed", "reasoning_effort",
    "repetition_penalty", "response_format", "safe_prompt", "service_tier", "stop", "stream",
    "temperature", "tool_choice", "tools", "top_k", "top_logprobs", "top_p",
    "top_prompt_logprobs",
})
#: groq 1.7.0's `chat.completions.create` parameters (EMPIRICAL) plus `stream_options`
#: (groq/types/chat/chat_completion_chunk.py: usage "when stream_options include_usage"):
#: Groq refuses any other with 400 "property 'x' is unsupported" (fanenr/chatbot#21).
GROQ_FIELDS = frozenset({
    "citation_options", "compound_custom", "disable_tool_validation", "documents",
    "exclude_domains", "frequency_penalty", "function_call", "functions", "include_domains",
    "include_reasoning", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens",
    "messages", "metadata", "model", "n", "parallel_tool_calls", "presence_penalty",
    "reasoning_effort", "reasoning_format", "response_format", "search_settings", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user",
})


@dataclass(frozen=True)
class Dialect:
    """What one vendor does differently from OpenAI where money is concerned."""

    name: str
    #: The vendor's chat completions path(s) (after `/<vendor>`).
    chat_paths: tuple[str, ...]
    #: "ask": usage only with stream_options.include_usage, on an extra `choices: []` chunk
    #: (OpenAI); "final": unasked, on the chunk with finish_reason; "x_groq": unasked in
    #: `x_groq.usage` of the last chunk (plus OpenAI's extra chunk when asked);
    #: "cumulative": unasked, the usage so far on every chunk (the last one is the bill).
    stream_usage: str = "ask"
    #: Request fields the vendor knows (None: it ignores unknown ones) and the status it
    #: refuses another with.
    fields: frozenset[str] | None = None
    unknown_status: int = 400
    #: "openai", "mistral", "openrouter", "xai", "azure", "ollama": the error body's shape.
    error_shape: str = "openai"
    #: The usage's own bill: "" (none), "openrouter" (`cost`, USD), "perplexity"
    #: (`cost{input_tokens_cost, output_tokens_cost, request_cost, total_cost}`), "xai"
    #: (`cost_in_usd_ticks`, 1e-10 USD).
    cost: str = ""
    #: "openai": prompt_tokens_details.cached_tokens; "deepseek": prompt_cache_hit_tokens
    #: and prompt_cache_miss_tokens.
    cache: str = "openai"
    #: Reports cache hits at all (else the fake serves no cached tokens: they would be
    #: billed without the client seeing them).
    caches: bool = True
    #: Reasoning models: "" (none), "visible" (DeepSeek `reasoning_content` deltas, inside
    #: completion_tokens), "hidden_additive" (xAI: billed, not streamed, reported in
    #: completion_tokens_details.reasoning_tokens ON TOP of completion_tokens).
    reasoning: str = ""
    reasoning_models: frozenset[str] = frozenset()
    #: 429 headers: (header, value) for a wait of N seconds (`{s}` / `{ms}` / `{dur}`).
    reset_headers: tuple[tuple[str, str], ...] = (("retry-after", "{s}"),)
    #: An SSE comment the vendor sends while the model works (OpenRouter).
    processing_comment: str = ""
    #: The credential header it bills: "bearer" or "api-key" (Azure).
    auth: str = "bearer"
    extra_chunk_fields: Mapping[str, Any] = field(default_factory=dict)


DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    # docs.mistral.ai/api; EMPIRICAL mistralai 3.7.0 requests /v1/chat/completions. Usage
    # unasked on the last chunk (anon-kode#53 "Usage data is included by default"); error
    # body `{"object":"error","message":...}`; Retry-After on 429.
    Dialect("mistral", ("/v1/chat/completions",), stream_usage="final", caches=False,
            fields=MISTRAL_FIELDS, unknown_status=422, error_shape="mistral"),
    # console.groq.com/docs/api-reference; groq/types/chat/chat_completion_chunk.py:170
    # (x_groq.usage "only sent in the final chunk"); 429 headers retry-after (s) and
    # x-ratelimit-reset-requests/-tokens as Go durations (console.groq.com/docs/rate-limits).
    Dialect("groq", ("/openai/v1/chat/completions",), stream_usage="x_groq",
            fields=GROQ_FIELDS, unknown_status=400,
            reset_headers=(("retry-after", "{s}"), ("x-ratelimit-reset-requests", "{dur}"),
                           ("x-ratelimit-reset-tokens", "{dur}"))),
    # api-docs.deepseek.com/api/create-chat-completion: `/chat/completions` (`/v1` alias);
    # usage on the last chunk whether asked or not, `usage: null` on the others when asked
    # (as quoted in moona3k/macparakeet#1087); prompt_cache_hit/miss_tokens; deepseek-reasoner
    # streams `reasoning_content` (billed in completion_tokens). Invalid parameters: 422.
    Dialect("deepseek", ("/chat/completions", "/v1/chat/completions"), stream_usage="final",
            cache="deepseek", reasoning="visible",
            reasoning_models=frozenset({"deepseek-reasoner"})),
    # docs.x.ai/docs/api-reference; recorded grok stream with the usage so far on every
    # chunk (M-Lai-ai/LLM-Provider-reference Grok/streaming.md); reasoning tokens billed on
    # top of completion_tokens (total = prompt + completion + reasoning: Wei-Shaw/sub2api
    # #5771, whose computed cost equals `cost_in_usd_ticks`); docs.x.ai cost-tracking:
    # `usage.cost_in_usd_ticks`, 1 USD = 1e10 ticks. Error `{"code":..,"error":..}`.
    Dialect("xai", ("/v1/chat/completions",), stream_usage="cumulative", cost="xai",
            reasoning="hidden_additive", reasoning_models=frozenset({"grok-4"}),
            error_shape="xai",
            reset_headers=(("retry-after", "{s}"), ("x-ratelimit-reset-requests", "{dur}"))),
    # openrouter.ai/docs/use-cases/usage-accounting (usage with `cost` always, on the last
    # message; stream_options has no effect), api/reference/streaming (`: OPENROUTER
    # PROCESSING` comments; errors mid-stream as a chunk with `error` and finish_reason
    # "error"), errors-and-debugging (`{"error":{"code":<status>,"message":..}}`).
    Dialect("openrouter", ("/api/v1/chat/completions",), stream_usage="final",
            cost="openrouter", error_shape="openrouter",
            processing_comment=": OPENROUTER PROCESSING"),
    # docs.together.ai streaming: usage only on the last chunk, unasked (AIProxySwift
    # TogetherAIChatCompletionStreamingChunk); chunks carry `token`.
    Dialect("together", ("/v1/chat/completions",), stream_usage="final", caches=False),
    # docs.fireworks.ai OpenAI compatibility: "Fireworks.ai returns usage stats in both
    # cases ... in the very last chunk (the one having finish_reason set)".
    Dialect("fireworks", ("/inference/v1/chat/completions",), stream_usage="final"),
    # inference-docs.cerebras.ai: usage and time_info on the final chunk;
    # x-ratelimit-reset-tokens-minute in seconds (support/rate-limits).
    Dialect("cerebras", ("/v1/chat/completions",), stream_usage="final",
            reset_headers=(("retry-after", "{s}"), ("x-ratelimit-reset-tokens-minute",
                                                     "{s}.0"))),
    # docs.perplexity.ai/api-reference/chat-completions-post: `/chat/completions`; usage
    # with `cost` (total_cost includes the request fee by search_context_size,
    # docs.perplexity.ai/getting-started/pricing), the usage so far on every chunk
    # (langchain-ai/langchain#39924), `citations` and `search_results`.
    Dialect("perplexity", ("/chat/completions",), stream_usage="cumulative",
            cost="perplexity", caches=False),
    # github.com/ollama/ollama middleware/openai.go: usage only with include_usage, on an
    # extra `choices: []` chunk; errors `{"error":{"message","type","param","code"}}`.
    Dialect("ollama", ("/v1/chat/completions",), stream_usage="ask", error_shape="ollama",
            caches=False),
    # learn.microsoft.com/azure/ai-foundry/openai/reference: the deployment in the path,
    # `api-key` auth (EMPIRICAL openai.AzureOpenAI); the first chunk has `choices: []` and
    # `prompt_filter_results`; include_usage from api-version 2024-09-01 (griptape#1640),
    # older versions refuse stream_options with 400 (openai-python#1469); 429 with
    # retry-after and retry-after-ms. The v1 API (learn.microsoft.com/azure/foundry/openai/
    # api-version-lifecycle): `/openai/v1/...`, no api-version, the deployment as `model`,
    # the key as a Bearer token (EMPIRICAL openai.OpenAI).
    Dialect("azure", ("/openai/deployments/{deployment}/chat/completions",
                      "/openai/v1/chat/completions"),
            stream_usage="ask", error_shape="azure", auth="api-key",
            reset_headers=(("retry-after", "{s}"), ("retry-after-ms", "{ms}"))),
)}

#: The fake vendors' prices, USD per 1M tokens: (input, cached input, output); reasoning
#: bills as output. `<vendor>/*` prices every model of that vendor (Ollama: self-hosted).
PRICES: dict[str, tuple[str, str, str]] = {
    "mistral/mistral-small-latest": ("0.10", "0.01", "0.30"),
    "groq/llama-3.3-70b-versatile": ("0.59", "0.295", "0.79"),
    "deepseek/deepseek-chat": ("0.28", "0.028", "0.42"),
    "deepseek/deepseek-reasoner": ("0.28", "0.028", "0.42"),
    "xai/grok-3": ("3.00", "0.75", "15.00"),
    "xai/grok-4": ("3.00", "0.75", "15.00"),
    "openrouter/meta-llama/llama-3.3-70b-instruct": ("0.13", "0.13", "0.39"),
    "together/meta-llama/Llama-3.3-70B-Instruct-Turbo": ("0.88", "0.88", "0.88"),
    "fireworks/accounts/fireworks/models/llama-v3p3-70b-instruct": ("0.90", "0.45", "0.90"),
    "cerebras/llama-3.3-70b": ("0.85", "0.85", "1.20"),
    "perplexity/sonar": ("1.00", "1.00", "1.00"),
    "perplexity/sonar-pro": ("3.00", "3.00", "15.00"),
    "ollama/*": ("0.10", "0.10", "0.10"),
    "azure/gpt-4o": ("2.50", "1.25", "10.00"),
}
#: Perplexity's request fee per search_context_size, USD per request (docs.perplexity.ai
#: pricing: sonar $5 / $8 / $12, sonar-pro $6 / $10 / $14 per 1,000 requests; "low" when
#: the request does not say).
PERPLEXITY_REQUEST_FEE = {"sonar": {"low": "0.005", "medium": "0.008", "high": "0.012"},
                          "sonar-pro": {"low": "0.006", "medium": "0.010", "high": "0.014"}}
NANO_PER_USD = 1_000_000_000


def _nano_per_million(usd: str) -> int:
    return int(Decimal(usd) * NANO_PER_USD)


def price_of(vendor: str, model: str) -> tuple[int, int, int] | None:
    """(input, cached, output) nano-USD per 1M tokens, or None for a model it has no price of."""
    found = PRICES.get(f"{vendor}/{model}") or PRICES.get(f"{vendor}/*")
    return tuple(_nano_per_million(p) for p in found) if found else None  # type: ignore[return-value]


def request_fee_nano(vendor: str, body: Mapping[str, Any]) -> int:
    """The vendor's fee per request (Perplexity: by `web_search_options.search_context_size`)."""
    fees = PERPLEXITY_REQUEST_FEE.get(str(body.get("model"))) if vendor == "perplexity" \
        else None
    if fees is None:
        return 0
    options = body.get("web_search_options")
    size = options.get("search_context_size") if isinstance(options, dict) else None
    return int(Decimal(fees.get(str(size), fees["low"])) * NANO_PER_USD)


def cost_parts(usage: Any) -> tuple[int, int, int]:
    """(input, output, request fee) nano-USD of a fake Usage (`usage.vendor` set): each
    rounded up once. Input: uncached at the input rate, cached at the cached rate; output
    includes reasoning."""
    price = price_of(usage.vendor, usage.model)
    assert price is not None, (usage.vendor, usage.model)
    inp, cached, out = price
    uncached = usage.input_tokens - usage.cached_input_tokens
    input_micro = uncached * inp + usage.cached_input_tokens * cached
    return (-(-input_micro // 1_000_000), -(-usage.output_tokens * out // 1_000_000),
            usage.request_fee_nano)


def bill_nano(usage: Any) -> int:
    """What the vendor bills for this usage, to the nano-dollar. Perplexity rounds its
    input and output costs apart (it reports them apart); the others round once."""
    if usage.vendor == "perplexity":
        return sum(cost_parts(usage))
    price = price_of(usage.vendor, usage.model)
    assert price is not None, (usage.vendor, usage.model)
    inp, cached, out = price
    micro = ((usage.input_tokens - usage.cached_input_tokens) * inp
             + usage.cached_input_tokens * cached + usage.output_tokens * out)
    return -(-micro // 1_000_000) + usage.request_fee_nano


def usd(nano: int) -> str:
    """A nano-USD amount as a JSON number with 9 decimals (exact: no float)."""
    whole, frac = divmod(nano, NANO_PER_USD)
    return f"{whole}.{frac:09d}"


# ------------------------------------------------------------------------- requests


def vendor_of(path: str) -> tuple[str, str] | None:
    """('groq', '/openai/v1/chat/completions') for '/groq/openai/v1/chat/completions'."""
    parts = path.split("/", 2)
    if len(parts) >= 2 and parts[1] in DIALECTS:
        return parts[1], "/" + (parts[2] if len(parts) > 2 else "")
    return None


#: GETs that prove a key besides `/models`: OpenRouter's key info
#: (openrouter.ai/docs/api-reference/api-keys/get-current-key), Ollama's model list.
PROBE_PATHS = {"openrouter": ("/api/v1/key",), "ollama": ("/api/tags",)}


def internal_path(dialect: Dialect, path: str) -> tuple[str, str | None] | None:
    """The OpenAI path the fake bills a vendor path as, and the Azure deployment; None when
    the vendor does not serve the path."""
    for chat in dialect.chat_paths:
        if "{deployment}" in chat:
            head, tail = chat.split("{deployment}")
            if path.startswith(head) and path.endswith(tail):
                deployment = path[len(head): len(path) - len(tail)]
                if deployment and "/" not in deployment:
                    return "/v1/chat/completions", deployment
        elif path == chat:
            return "/v1/chat/completions", "" if dialect.name == "azure" else None
    if path.endswith("/models") or path in PROBE_PATHS.get(dialect.name, ()):
        return "/v1/models", None  # a cheap authenticated GET (tokenfuse's key probe)
    return None


def billed_key(dialect: Dialect, headers: Mapping[str, str]) -> str:
    """Azure bills `api-key` (else an Entra bearer token); the others `Authorization:
    Bearer` (their API references)."""
    auth = headers.get("authorization", "")
    bearer = auth[7:].split(",", 1)[0].strip() if auth[:7].lower() == "bearer " else ""
    if dialect.auth == "api-key":
        return headers.get("api-key", "").split(",", 1)[0].strip() or bearer
    return bearer


class Refused(Exception):
    """The vendor refuses the request: (status, body, headers)."""

    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def error_body(dialect: Dialect, status: int, message: str,
               code: str | None = None) -> dict[str, Any]:
    """An HTTP error in the vendor's own shape."""
    if dialect.error_shape == "mistral":
        return {"object": "error", "message": message, "type": "invalid_request_error",
                "param": None, "code": code}
    if dialect.error_shape == "openrouter":
        return {"error": {"code": status, "message": message}}
    if dialect.error_shape == "xai":
        return {"code": code or "Client specified an invalid argument", "error": message}
    if dialect.error_shape == "azure":
        return {"error": {"code": code or str(status), "message": message}}
    etype = "rate_limit_exceeded" if status == 429 else "invalid_request_error"
    if dialect.error_shape == "ollama":
        etype = "api_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def refuse(dialect: Dialect, status: int, message: str, code: str | None = None,
           wait_s: int | None = None) -> Refused:
    headers = {}
    if wait_s is not None:
        for header, form in dialect.reset_headers:
            headers[header] = form.format(s=wait_s, ms=wait_s * 1000, dur=f"{wait_s}s")
    return Refused(status, error_body(dialect, status, message, code), headers)


def check_request(dialect: Dialect, body: dict[str, Any], query: Mapping[str, str],
                  deployment: str | None, deployments: Mapping[str, str]) -> dict[str, Any]:
    """The body as the vendor bills it (Azure: the deployment's model), or Refused the way
    the vendor refuses it."""
    if dialect.fields is not None:
        unknown = sorted(k for k in body if k not in dialect.fields)
        if unknown:
            name = unknown[0]
            if dialect.name == "mistral":  # pydantic extra_forbidden (anon-kode#53)
                raise Refused(422, {"object": "error", "message": {"detail": [{
                    "type": "extra_forbidden", "loc": ["body", name],
                    "msg": "Extra inputs are not permitted", "input": body[name]}]},
                    "type": "invalid_request_error", "param": None, "code": None})
            raise Refused(dialect.unknown_status, {"error": {
                "message": f"property '{name}' is unsupported",
                "type": "invalid_request_error"}})
    if dialect.name == "azure":
        version = query.get("api-version", "")
        if deployment:  # /openai/deployments/{deployment}/...: api-version required
            if not version:
                raise refuse(dialect, 404, "Resource not found", "404")
            if body.get("stream_options") is not None and version[:10] < "2024-09-01":
                raise refuse(dialect, 400, "Unrecognized request argument supplied: "
                                           "stream_options", "BadRequest")
        else:  # the v1 API: the deployment is the body's model
            deployment = str(body.get("model", ""))
        model = deployments.get(deployment or "")
        if model is None:
            raise refuse(dialect, 404, "The API deployment for this resource does not "
                                       "exist.", "DeploymentNotFound")
        return {**body, "model": model}
    if price_of(dialect.name, str(body.get("model", ""))) is None:
        raise refuse(dialect, 404, f"The model `{body.get('model')}` does not exist",
                     "model_not_found")
    return body


# ------------------------------------------------------------------------- answers


def reasoning_tokens(dialect: Dialect, model: str, wanted: int | None) -> int:
    """Reasoning a vendor model does: what the test asks (x-fake-reasoning-tokens), else
    none (the fake's vendor models reason only when told to)."""
    if model not in dialect.reasoning_models:
        return 0
    return max(wanted or 0, 0)


def usage_json(dialect: Dialect, usage: Any, reasoning: int) -> dict[str, Any]:
    """The vendor's usage object for a fake Usage (tokens so far for a cumulative chunk)."""
    prompt, output, cached = usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
    completion = output - reasoning if dialect.reasoning == "hidden_additive" else output
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + output}
    if dialect.cache == "deepseek":
        out["prompt_cache_hit_tokens"] = cached
        out["prompt_cache_miss_tokens"] = prompt - cached
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    elif dialect.name != "mistral":
        out["prompt_tokens_details"] = {"cached_tokens": cached}
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    if dialect.cost == "openrouter":
        out["cost"] = _Raw(usd(bill_nano(usage)))
        out["is_byok"] = False
        out["cost_details"] = {"upstream_inference_cost": None}
    elif dialect.cost == "perplexity":
        inp, outp, fee = cost_parts(usage)
        fees = PERPLEXITY_REQUEST_FEE.get(usage.model, {})
        out["search_context_size"] = next(
            (size for size, fee in fees.items()
             if int(Decimal(fee) * NANO_PER_USD) == usage.request_fee_nano), "low")
        out["cost"] = {"input_tokens_cost": _Raw(usd(inp)), "output_tokens_cost": _Raw(usd(outp)),
                       "request_cost": _Raw(usd(fee)), "total_cost": _Raw(usd(inp + outp + fee))}
    elif dialect.cost == "xai":
        out["cost_in_usd_ticks"] = bill_nano(usage) * 10
        out["num_sources_used"] = 0
    if dialect.name == "groq":
        out.update({"queue_time": 0.01, "prompt_time": 0.001, "completion_time": 0.02,
                    "total_time": 0.031})
    return out


class _Raw(str):
    """A number written verbatim into the JSON (a decimal amount, never a float)."""


def dumps(obj: Any) -> str:
    """Compact JSON, raw UTF-8, `_Raw` values written as bare numbers."""
    marks: dict[str, str] = {}

    def mark(node: Any) -> Any:
        if isinstance(node, _Raw):
            key = f"@@raw{len(marks)}@@"
            marks[key] = str(node)
            return key
        if isinstance(node, dict):
            return {k: mark(v) for k, v in node.items()}
        if isinstance(node, list):
            return [mark(v) for v in node]
        return node

    text = json.dumps(mark(obj), ensure_ascii=False, separators=(",", ":"))
    for key, value in marks.items():
        text = text.replace(f'"{key}"', value)
    return text


def _filter_results() -> dict[str, Any]:
    ok = {"filtered": False, "severity": "safe"}
    return {"hate": ok, "self_harm": ok, "sexual": ok, "violence": ok}


def response_extras(dialect: Dialect) -> dict[str, Any]:
    """Fields a vendor adds to a whole chat response."""
    if dialect.name == "perplexity":
        return {"citations": ["https://example.com/a"], "search_results": [
            {"title": "a", "url": "https://example.com/a", "date": None}]}
    if dialect.name == "azure":
        return {"prompt_filter_results": [{"prompt_index": 0,
                                           "content_filter_results": _filter_results()}]}
    if dialect.name == "groq":
        return {"x_groq": {"id": f"req_{uuid.uuid4().hex[:26]}"}}
    if dialect.name == "cerebras":
        return {"time_info": {"queue_time": 0.0001, "prompt_time": 0.001,
                              "completion_time": 0.005, "total_time": 0.0061,
                              "created": int(time.time())}}
    return {}


def message_extras(dialect: Dialect, reasoning_text: str) -> dict[str, Any]:
    if dialect.reasoning == "visible" and reasoning_text:
        return {"reasoning_content": reasoning_text}
    return {}


@dataclass
class StreamPlan:
    """One vendor stream: (bytes, visible tokens in it, tokens billed once it is out)."""

    events: list[tuple[bytes, int, int]]
    usage: Any  # what the vendor bills if the stream is read to its end


def stream_events(dialect: Dialect, base: dict[str, Any], usage: Any, reasoning: int,
                  reasoning_pieces: list[str], answers: list[tuple[list[tuple[str, int]], bool]],
                  include_usage: bool, error_after: int | None, error_message: str,
                  eol: str) -> StreamPlan:
    """The SSE events of a vendor's chat stream. `answers`: per choice, its (delta,
    tokens) pieces and whether it hit the cap. `error_after`: an error chunk after that
    many content chunks (OpenRouter: a 200 stream that fails), the stream billed so far."""
    out: list[tuple[bytes, int, int]] = []
    sent = {"output": 0}

    def so_far() -> Any:
        return replace(usage, output_tokens=min(usage.output_tokens, sent["output"]))

    def data(obj: dict[str, Any]) -> bytes:
        return f"data: {dumps(obj)}{eol}{eol}".encode()

    def chunk(index: int, delta: dict[str, Any], finish: str | None,
              **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                             "finish_reason": finish}
        if dialect.name == "azure":
            c["content_filter_results"] = {} if finish else _filter_results()
        obj: dict[str, Any] = {**base, "choices": [c], **extra}
        if dialect.stream_usage == "ask" and include_usage:
            obj["usage"] = None
        if dialect.stream_usage == "cumulative":
            obj["usage"] = usage_json(dialect, so_far(), min(reasoning, sent["output"]))
        if dialect.name == "together":
            obj["token"] = {"id": 0, "text": delta.get("content", ""), "logprob": 0,
                            "special": False}
        return obj

    if dialect.processing_comment:
        out.append((f"{dialect.processing_comment}{eol}{eol}".encode(), 0, 0))
    if dialect.name == "azure":  # the prompt annotation frame comes first
        out.append((data({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                          "prompt_filter_results": [{"prompt_index": 0,
                                                     "content_filter_results":
                                                         _filter_results()}]}), 0, 0))
    content_chunks = 0
    hidden_done = dialect.reasoning != "visible"
    last = len(answers) - 1
    for i, (pieces, hit_max) in enumerate(answers):
        out.append((data(chunk(i, {"role": "assistant", "content": ""}, None)), 0, 0))
        if not hidden_done:  # DeepSeek: the reasoning streams first, visible
            for piece in reasoning_pieces:
                sent["output"] += 1
                out.append((data(chunk(i, {"reasoning_content": piece, "content": None},
                                       None)), 1, 1))
            hidden_done = True
        for k, (piece, tokens) in enumerate(pieces):
            if error_after is not None and content_chunks == error_after:
                # openrouter.ai/docs/api/reference/streaming, "Handling Errors During
                # Streaming": a chunk with `error` and finish_reason "error", then the end.
                err = chunk(i, {"content": ""}, "error",
                            error={"code": "server_error", "message": error_message})
                err["choices"][0]["native_finish_reason"] = "error"
                out.append((data(err), 0, 0))
                out.append((f"data: [DONE]{eol}{eol}".encode(), 0, 0))
                return StreamPlan(out, replace(usage, output_tokens=sent["output"]))
            hidden = reasoning if (k == 0 and i == 0 and dialect.reasoning != "visible") \
                else 0
            sent["output"] += tokens + hidden
            out.append((data(chunk(i, {"content": piece}, None)), tokens, tokens + hidden))
            content_chunks += 1
            if dialect.processing_comment and content_chunks == 2:
                out.append((f"{dialect.processing_comment}{eol}{eol}".encode(), 0, 0))
        finish = "length" if hit_max else "stop"
        extra: dict[str, Any] = {}
        if i == last:
            sent["output"] = usage.output_tokens
            if dialect.stream_usage == "final" and dialect.name != "openrouter":
                extra["usage"] = usage_json(dialect, usage, reasoning)
            if dialect.stream_usage == "x_groq":
                extra["x_groq"] = {"id": f"req_{uuid.uuid4().hex[:26]}",
                                   "usage": usage_json(dialect, usage, reasoning)}
            if dialect.name == "cerebras":
                extra.update(response_extras(dialect))
            if dialect.name == "perplexity":
                extra.update(response_extras(dialect))
        out.append((data(chunk(i, {}, finish, **extra)), 0, 0))
    if dialect.name == "openrouter":
        # The last message carries the usage (with `cost`), after the finish chunk
        # (openrouter.ai/docs/use-cases/usage-accounting; a recorded trailer repeats the
        # role with empty content, tangled.org albedo e2e/chat_stream_test.py).
        out.append((data({**base, "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": ""}, "finish_reason": "stop",
            "native_finish_reason": "stop", "logprobs": None}],
            "usage": usage_json(dialect, usage, reasoning)}), 0, 0))
    if include_usage and dialect.stream_usage in ("ask", "x_groq"):
        out.append((data({**base, "choices": [], "usage": usage_json(dialect, usage,
                                                                      reasoning)}), 0, 0))
    out.append((f"data: [DONE]{eol}{eol}".encode(), 0, 0))
    return StreamPlan(out, usage)


def chat_base(dialect: Dialect, model: str, stream: bool) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}" if dialect.name != "openrouter"
        else f"gen-{uuid.uuid4().hex[:20]}",
        "object": "chat.completion.chunk" if stream else "chat.completion",
        "created": int(time.time()), "model": model}
    if dialect.name == "openrouter":
        base["provider"] = "Fake"
    if dialect.name == "azure":
        base["system_fingerprint"] = "fp_fake"
    return base


def iter_events(plan: StreamPlan) -> Iterator[tuple[bytes, int, int]]:
    yield from plan.events
