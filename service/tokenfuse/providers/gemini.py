"""Google's Gemini wire format: the Gemini API (`/gemini/…` →
generativelanguage.googleapis.com) and Gemini on Vertex AI (`/vertex/…` →
{region}-aiplatform.googleapis.com), one body, usage and error shape on both. (Two routes,
their paths, both field spellings and the stream's two framings; hence its length.)

Facts (sources in docs/providers.md; google-genai 3.6.1 checked locally):

- the model and the call are in the path: `/{v1,v1beta,v1alpha}/models/{m}:{method}`
  (Gemini), `/{v1,v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{m}:{method}`
  and express mode `/{v1,v1beta1}/publishers/google/models/{m}:{method}` (Vertex);
  `generateContent`, `streamGenerateContent` (`?alt=sse`: SSE, `data: {json}` events
  separated by a blank line, no `event:` lines, no `[DONE]`; without it a streamed JSON
  array), `countTokens` / `computeTokens` (free: "CountTokens API has no charge");
- the body is proto3 JSON: a parser accepts lowerCamelCase and the proto's snake_case
  name alike (protobuf.dev, "JSON Mapping"), and google-genai sends `thinkingConfig`'s
  keys snake_case. tokenfuse reads both and refuses a body with both spellings of one field
  (which one Google would honour is not documented);
- `generationConfig.maxOutputTokens` caps thinking and visible output together (measured:
  python-genai #2062, gemini-2.5-flash max 200 → thoughts 194 + candidates 6); absent (or
  0, proto3's default) the model's maximum (65,536 for 2.5 / 3.x); `candidateCount`
  answers are each capped, so the bound is their product;
- thinking (`thoughtsTokenCount`) is billed as output and never streamed (a thought
  summary may be, with `includeThoughts`): thinking models reserve their whole cap
  (`Call.hidden_output`) unless `thinkingBudget` is 0 (thinking off);
- `usageMetadata` is cumulative on every stream chunk (the last one is the bill; the
  max-merge keeps it); `promptTokenCount` includes `cachedContentTokenCount`;
  `toolUsePromptTokenCount` (tool results fed back) is input; output is
  total - prompt - tool use (= candidates + thoughts; Vertex has reported candidates
  that already include thoughts, which this reading survives); zero counts are omitted;
- errors are `{"error": {"code": <int>, "message", "status"}}` with Google's status names;
  google-genai raises mid-stream only on an event whose JSON starts `{"error":` with an
  integer `code`, and fails on any other line (`event:`, comments): the cut is exactly that
  event.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, unquote

from tokenfuse.identity import VIRTUAL_KEY_PREFIX
from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.base import (
    Call,
    Credential,
    ErrorKind,
    FrameDecoder,
    Provider,
    ProviderBase,
    RequestRejected,
    Tokenizer,
    as_list,
    count_of,
    endpoint_of,
    unsupported,
)
from tokenfuse.providers.jsonarray import JsonArrayDecoder
from tokenfuse.providers.sse import SseEvent, SseParser

#: Generation, stream, and the free token counters (the count is the whole answer).
GENERATE, STREAM = "generateContent", "streamGenerateContent"
FREE_METHODS = frozenset({"countTokens", "computeTokens"})
_GEMINI_PATH = re.compile(r"^/(?:v1|v1beta|v1alpha)/models/([^/:]+):([A-Za-z]+)$")
_VERTEX_PATH = re.compile(r"^/(?:v1|v1beta1)/(?:projects/[^/:]+/locations/[^/:]+/)?"
                          r"publishers/google/models/([^/:]+):([A-Za-z]+)$")
#: Vertex's Claude models (Anthropic's wire format, `Vertex.claude`).
ANTHROPIC_PUBLISHER = "/publishers/anthropic/"
#: Query parameters Google reads a credential from (Google's system parameters `key` and
#: `access_token`, cloud.google.com/apis/docs/system-parameters), and the header each is
#: moved into (Google reads both).
QUERY_CREDENTIALS = (("key", Credential("x-goog-api-key")),
                     ("access_token", Credential("authorization", "bearer")))
#: The counts a usageMetadata may carry (one of them present: it reports usage).
USAGE_COUNTS = ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
                "toolUsePromptTokenCount", "totalTokenCount", "cachedContentTokenCount")
#: Gemini's tokenizer (SentencePiece, 256k vocabulary) is not public: counts are bounded
#: by cl100k's times 1.5, tokenfuse's bound for an unpublished tokenizer (the usage is the
#: bill; this only bounds the input before the call and counts a stream's visible text).
TOKENIZER = Tokenizer("cl100k_base", 150)
#: Models that never think (no `thoughtsTokenCount`): their output is what streams.
NON_THINKING_PREFIXES = ("gemini-1.", "gemini-2.0-", "gemma-2", "gemma-3")
#: Tools Google runs itself: their results are input the request does not show
#: (toolUsePromptTokenCount), so the input bound is the model's whole window.
SERVER_TOOLS = frozenset({"googleSearch", "google_search", "googleSearchRetrieval",
                          "google_search_retrieval", "codeExecution", "code_execution",
                          "urlContext", "url_context", "googleMaps", "google_maps",
                          "fileSearch", "file_search", "retrieval", "enterpriseWebSearch",
                          "enterprise_web_search", "computerUse", "computer_use"})
#: Grounding tools billed per grounded prompt beside the tokens (Google Search: $35 per
#: 1,000 prompts on 2.5 and earlier; Maps $25: ai.google.dev/gemini-api/docs/pricing,
#: checked 2026-12; the free daily allowance is not counted: tokenfuse charges from the
#: first), or on Gemini 3 per search query ($14 per 1,000).
GROUNDING_TOOLS = frozenset({"googleSearch", "google_search", "googleSearchRetrieval",
                             "google_search_retrieval", "googleMaps", "google_maps",
                             "enterpriseWebSearch", "enterprise_web_search"})
GROUNDED_PROMPT_NANO = 35_000_000
SEARCH_QUERY_NANO = 14_000_000
#: Models billed per search query, and the queries one prompt is bounded by (the answer's
#: `webSearchQueries` settle it; a prompt that issues more is billed what it issued).
PER_QUERY_PREFIXES = ("gemini-3",)
MAX_SEARCH_QUERIES = 10
#: Google's status name and HTTP code of each refusal kind (google.rpc.Code).
_STATUS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "INVALID_ARGUMENT"),
    "authentication": (401, "UNAUTHENTICATED"),
    "permission": (403, "PERMISSION_DENIED"),
    "rate_limit": (429, "RESOURCE_EXHAUSTED"),
    "unavailable": (503, "UNAVAILABLE"),
    # 402, never retried by google-genai (it retries 408/429/5xx, and only when asked);
    # the in-stream cut carries it too, so a stream ends with the same error class.
    "budget": (402, "RESOURCE_EXHAUSTED"),
    "stream_cut": (402, "RESOURCE_EXHAUSTED"),
}
#: Codes whose HTTP status is not their kind's.
_STATUS_BY_CODE: dict[str, tuple[int, str]] = {
    "unsupported_endpoint": (404, "NOT_FOUND"),
    "unknown_route": (404, "NOT_FOUND"),
    "provider_not_configured": (404, "NOT_FOUND"),
    "pool_provider_mismatch": (403, "PERMISSION_DENIED"),
}
#: The synthetic event the SSE decoder adds when a stream that reported a finish ends
#: (Gemini has no end-of-stream event: the stream just ends after `finishReason`).
END_EVENT = "tokenfuse.end"


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(word.title() for word in rest)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


def field(obj: dict[str, Any], camel: str) -> Any:
    """The field in either spelling (`maxOutputTokens` / `max_output_tokens`); None when
    absent. Both spellings: refused (which one Google reads is not documented)."""
    snake = _snake(camel)
    if camel in obj and snake in obj and snake != camel:
        raise RequestRejected(400, "ambiguous_field",
                              f"the request spells '{camel}' twice ('{camel}' and "
                              f"'{snake}'); send one")
    return obj.get(camel, obj.get(snake))


def _check_spellings(obj: Any, where: str) -> None:
    """No key of a config object is there in both spellings."""
    if not isinstance(obj, dict):
        return
    keys = set(obj)
    for key in keys:
        other = _camel(key) if "_" in key else _snake(key)
        if other != key and other in keys:
            raise RequestRejected(400, "ambiguous_field",
                                  f"'{where}' spells a field twice ('{key}' and '{other}'); "
                                  "send one")


def _object(obj: dict[str, Any], camel: str) -> dict[str, Any]:
    value = field(obj, camel)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestRejected(400, "invalid_request", f"'{camel}' must be an object")
    _check_spellings(value, camel)
    return value


def _count_field(obj: dict[str, Any], camel: str) -> int | None:
    """A proto3 int field: absent or 0 is unset (None); else a positive integer."""
    value = field(obj, camel)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestRejected(400, "invalid_request",
                              f"'{camel}' must be a non-negative integer")
    return value or None


def _alts(path: str) -> list[str]:
    """Every response format the query asks for (`alt` / `$alt`, in any case)."""
    _, _, query = path.partition("?")
    return [v for k, v in parse_qsl(query, keep_blank_values=True)
            if k.lstrip("$").lower() == "alt"]


#: Google's system parameters and header that filter or reshape a response (a field
#: mask of `usageMetadata` strips the text a stream is metered by; docs.cloud.google.com/
#: apis/docs/system-parameters), and the ones whose meaning tokenfuse cannot check.
RESPONSE_SHAPING_PARAMETERS = frozenset({"fields", "prettyprint", "callback"})
RESPONSE_SHAPING_HEADERS = ("x-goog-fieldmask",)


def _shaping_refusal(headers: dict[str, str]) -> RequestRejected | None:
    """A request whose answer would not be the one tokenfuse meters: a field mask, a
    response format spelled any way but exactly `alt=sse` / `alt=json` (tokenfuse and
    Google must read the framing alike)."""
    _, _, query = headers.get(":path", "").partition("?")
    names = [k for k, _ in parse_qsl(query, keep_blank_values=True)]
    masked = [n for n in names if n.lstrip("$").lower() in RESPONSE_SHAPING_PARAMETERS]
    masked += [h for h in RESPONSE_SHAPING_HEADERS if h in headers]
    if masked:
        return RequestRejected(400, "unsupported_response_format",
                               f"tokenfuse meters whole answers: '{masked[0]}' would reshape "
                               "the response; refused (fail-closed)")
    alts = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
            if k.lstrip("$").lower() == "alt"]
    if any(k != "alt" or v not in ("sse", "json") for k, v in alts):
        return RequestRejected(400, "unsupported_response_format",
                               "send the response format as exactly 'alt=sse' or 'alt=json'")
    return None


def _alt(path: str) -> str:
    """The response format asked for: "" when not given; refused when given twice."""
    values = _alts(path)
    if len(values) > 1:
        raise RequestRejected(400, "invalid_request", "'alt' is given more than once")
    return values[0] if values else ""


class Gemini(ProviderBase):
    """The Gemini API (generativelanguage.googleapis.com)."""

    name = "gemini"
    genai_provider = "gcp.gemini"
    default_upstream = "https://generativelanguage.googleapis.com"
    credentials = (Credential("x-goog-api-key"), Credential("authorization", "bearer"))
    query_credentials = QUERY_CREDENTIALS
    price_dataset_providers: tuple[str, ...] = ("gemini",)
    price_namespace = "gemini"
    usage_marker = "usageMetadata"
    _path = _GEMINI_PATH

    def __init__(self) -> None:
        #: The wire format of a stream without `alt=sse`, a JSON array (`gemini()` and
        #: `vertex()` attach it).
        self.array: Gemini = self

    def header_refusal(self, headers: dict[str, str]) -> RequestRejected | None:
        return _shaping_refusal(headers)

    def for_answer(self, first_chunk: bytes) -> Provider:
        """A stream answered as a JSON array (`[`) is metered as one, whatever the query
        said (the framing is the answer's, never assumed)."""
        return self.array if first_chunk.lstrip()[:1] == b"[" else self

    def for_path(self, path: str) -> Provider:
        """A stream without `alt=sse` is a JSON array: its own framing and cut."""
        route = path.partition("?")[0]
        if route.endswith(f":{STREAM}") and _alts(path) != ["sse"]:
            return self.array  # (`alt` twice: refused by parse_request)
        return self

    def price_model_id(self, model: str, mode: str, prefixed: bool) -> str | None:
        """The path's model id: `gemini/gemini-2.5-pro` is `gemini-2.5-pro`; on Vertex,
        `vertex_ai/claude-sonnet-4-5@20250929` is `claude-sonnet-4-5@20250929` (Claude's
        path model, for `Vertex.claude`). Ids with a `/` are other publishers' models
        (`vertex_ai/xai/…`), not routed."""
        return None if "/" in model else model

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        matched = self._path.match(endpoint)
        if matched is None:
            raise unsupported(endpoint)
        model, method = matched.group(1).removeprefix("models/"), matched.group(2)
        if method in FREE_METHODS:
            return Call(endpoint=method, model=model, stream=False, max_output_tokens=0,
                        priced=False)
        if method not in (GENERATE, STREAM):
            raise unsupported(endpoint)
        alt, stream = _alt(path), method == STREAM
        if alt not in ("", "json", "sse") or (alt == "sse" and not stream):
            raise RequestRejected(400, "unsupported_response_format",
                                  f"tokenfuse meters JSON and SSE answers, not alt={alt}")
        _check_spellings(body, "request")
        config = _object(body, "generationConfig")
        thinking = _object(config, "thinkingConfig")
        contents = field(body, "contents")
        if not isinstance(contents, list):
            raise RequestRejected(400, "invalid_request", "'contents' must be a list")
        for content in contents:
            _check_spellings(content, "contents")
            for part in as_list(content.get("parts")) if isinstance(content, dict) else ():
                _check_spellings(part, "parts")
        budget = field(thinking, "thinkingBudget")
        thinking_off = (isinstance(budget, int) and not isinstance(budget, bool)
                        and budget == 0) or model.startswith(NON_THINKING_PREFIXES)
        return Call(
            endpoint=method, model=model, stream=stream,
            max_output_tokens=_count_field(config, "maxOutputTokens"),
            choices=_count_field(config, "candidateCount") or 1,
            prompt_parts=[{k: v for k, v in body.items() if k != "contents"}],
            messages=[_as_message(content) for content in contents],
            hidden_output=not thinking_off,
            request_fee_nano=_grounding_bound(model, body),
            server_context=field(body, "cachedContent") is not None
            or _has_media(contents) or _has_server_tool(body),
        )

    def tokenizer(self, model: str) -> Tokenizer:
        return TOKENIZER

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        """`generationConfig.maxOutputTokens`, in the spelling the body uses."""
        if cap < 1:  # 0 is proto3's "unset": the model's maximum
            raise RequestRejected(402, "budget_exceeded",
                                  "the budget covers no output token for this request")
        name = "generation_config" if "generation_config" in body else "generationConfig"
        config = dict(body.get(name) or {})
        key = "max_output_tokens" if "max_output_tokens" in config else "maxOutputTokens"
        config[key] = cap
        return {**body, name: config}

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        """`functionCall` parts of a model turn (`parts`, or `content` as `_as_message`
        presents them)."""
        if not isinstance(message, dict) or message.get("role") != "model":
            return []
        calls = []
        for part in as_list(message.get("parts", message.get("content"))):
            call = (part.get("functionCall") or part.get("function_call")) \
                if isinstance(part, dict) else None
            if isinstance(call, dict):
                calls.append((str(call.get("name")), call.get("args")))
        return calls

    # -- responses
    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """The bill so far; None for a usageMetadata without counts (Vertex sends
        `{"trafficType": "ON_DEMAND"}` alone on every chunk but the last: recorded,
        tests/fixtures/recorded/vertex_gemini_stream*)."""
        meta = payload.get("usageMetadata")
        if not isinstance(meta, dict) or not any(name in meta for name in USAGE_COUNTS):
            return None
        prompt = count_of(meta.get("promptTokenCount"))
        cached = min(prompt, count_of(meta.get("cachedContentTokenCount")))
        tool_use = count_of(meta.get("toolUsePromptTokenCount"))
        total = count_of(meta.get("totalTokenCount"))
        shown = count_of(meta.get("candidatesTokenCount")) + count_of(
            meta.get("thoughtsTokenCount"))
        output = total - prompt - tool_use if total else shown
        searches, fee = _grounding(payload)
        return TokenUsage(input=prompt - cached + tool_use, output=max(output, 0),
                          cache_read=cached, web_searches=searches, web_search_nano=fee)

    def merge_usage(self, old: TokenUsage | None, new: TokenUsage) -> TokenUsage:
        """Each usageMetadata is the whole bill so far: the last one wins, never a
        per-field maximum (a recorded Gemini stream says promptTokenCount 15 on its first
        chunks and 14 on the last: tests/fixtures/recorded/gemini_stream); a grounding fee
        reported on an earlier chunk is kept."""
        if old is not None and old.web_searches > new.web_searches:
            return replace(new, web_searches=old.web_searches,
                           web_search_nano=old.web_search_nano)
        return new

    def is_event_stream(self, first_chunk: bytes) -> bool:
        """SSE starts `data:`; an error document starts `{` (or, on Vertex, `[{`)."""
        return first_chunk.lstrip()[:1] not in (b"{", b"[")

    def stream_decoder(self) -> FrameDecoder:
        return GeminiSseDecoder()

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        return _generated(payload)

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        return _generated(payload)

    def is_final_event(self, event: str, data: str) -> bool:
        return event == END_EVENT

    # -- refusals
    def error_document(self, kind: ErrorKind, code: str, message: str) -> dict[str, Any]:
        status, name = _STATUS_BY_CODE.get(code) or _STATUS[kind]
        return {"error": {"code": status, "message": message, "status": name}}

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        """`data: {"error": {"code": <int>, ...}}`: google-genai raises ClientError on it
        (its JSON must start with `{"error":`; an `event:` line would fail to parse)."""
        return b"data: " + self.error_body(kind, code, message, details) + b"\r\n\r\n"

    # -- key pools
    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("x-goog-api-key", secret), ("authorization",)

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        return "/v1beta/models", {"x-goog-api-key": secret}


class ArrayStream:
    """Mixin of a route's twin for streams without `alt=sse`: a JSON array of the same
    chunks (`[{…}`, LF, `,` CRLF `{…}`, LF, `]`). Each element is an event that ends at the
    separator after it, so what was forwarded always ends with `[` or `,`, and the cut
    `{"error": …}]` closes a valid array."""

    #: The SSE twin (set by `gemini()` / `vertex()`): an answer in SSE is metered as SSE.
    sse: Any = None

    def for_path(self, path: str) -> Any:
        return self

    def for_answer(self, first_chunk: bytes) -> Any:
        head = first_chunk.lstrip()[:5]
        return self.sse if self.sse is not None and head == b"data:" else self

    def is_event_stream(self, first_chunk: bytes) -> bool:
        """The array's `[` (or only whitespace so far: metered, never let through
        unmetered); an error document starts `{`."""
        return first_chunk.lstrip()[:1] in (b"[", b"")

    def stream_decoder(self) -> FrameDecoder:
        return JsonArrayDecoder(END_EVENT)

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        body: bytes = self.error_body(kind, code, message, details)  # type: ignore[attr-defined]
        return body + b"]"


class GeminiArray(ArrayStream, Gemini):
    pass


class GeminiSseDecoder(SseParser):
    """SSE, plus `END_EVENT` at the end of a stream that reported a `finishReason`: the
    stream's last chunk carries it (and the final cumulative usage), and the stream then
    just ends. A stream cut short (no finish seen) ends without it: unfinished."""

    def __init__(self) -> None:
        super().__init__()
        self._fed = 0
        self._finished = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._fed += len(chunk)
        events = super().feed(chunk)
        if not self._finished:
            self._finished = any(reports_finish(e.data) for e in events)
        return events

    def finish(self) -> list[SseEvent]:
        events = super().finish()
        if self._finished or any(reports_finish(e.data) for e in events):
            events.append(SseEvent(END_EVENT, "", self._fed))
        return events


def reports_finish(data: str) -> bool:
    """Whether a chunk says a candidate finished (`finishReason`), read as JSON only when
    the name is in it (a text may say it too)."""
    if '"finishReason"' not in data:
        return False
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    return isinstance(payload, dict) and any(
        isinstance(c, dict) and c.get("finishReason") for c in as_list(payload.get("candidates")))


class Vertex(Gemini):
    """Vertex AI: Gemini under `publishers/google` (this class); Claude under
    `publishers/anthropic` is `claude`'s wire format when the registry sets it (else
    refused). Operators set TOKENFUSE_UPSTREAM_VERTEX to their region's host
    (https://{region}-aiplatform.googleapis.com); the default is the global endpoint."""

    name = "vertex"
    genai_provider = "gcp.vertex_ai"
    default_upstream = "https://aiplatform.googleapis.com"
    # OAuth access tokens (what google-genai and AnthropicVertex send); express mode keys.
    credentials = (Credential("authorization", "bearer"), Credential("x-goog-api-key"))
    price_dataset_providers = ("vertex_ai-language-models", "vertex_ai",
                               "vertex_ai-anthropic_models")
    price_namespace = "vertex"
    _path = _VERTEX_PATH
    claude: Provider | None = None

    def for_path(self, path: str) -> Provider:
        if ANTHROPIC_PUBLISHER in path.partition("?")[0]:
            return self.claude if self.claude is not None else self
        return super().for_path(path)

    def caller_key(self, headers: dict[str, str]) -> str | None:
        return vertex_caller(self, headers)

    def header_refusal(self, headers: dict[str, str]) -> RequestRejected | None:
        return _shaping_refusal(headers) or vertex_identity_refusal(self, headers)

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("authorization", f"Bearer {secret}"), ("x-goog-api-key",)

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        return "/v1beta1/publishers/google/models", {"authorization": f"Bearer {secret}"}


#: The project a Vertex path names (`/v1/projects/{p}/locations/{l}/…`).
_VERTEX_PROJECT = re.compile(r"/projects/([^/?#]+)/locations/")
#: The identity of a Vertex OAuth caller: the project Google bills.
VERTEX_PROJECT_PREFIX = "vertex-project:"


def vertex_caller(provider: Provider, headers: dict[str, str]) -> str | None:
    """Whom a Vertex request is charged to. An OAuth access token rotates every hour (a
    budget on it would start afresh each time), so a bearer token is charged to the
    project of the path: the one Google bills, and a token without access to it is
    refused there, never billed. An API key (express mode, no project) or a gateway key
    is itself."""
    key = provider.credential_of(headers)
    if key is None or key.startswith(VIRTUAL_KEY_PREFIX):
        return key
    if key != Credential("authorization", "bearer").read(headers):
        return key
    project = _VERTEX_PROJECT.search(headers.get(":path", "").partition("?")[0])
    return f"{VERTEX_PROJECT_PREFIX}{unquote(project.group(1)).lower()}" if project else key


def vertex_identity_refusal(provider: Provider,
                            headers: dict[str, str]) -> RequestRejected | None:
    """An OAuth caller is charged as its project, so the project must have one name: a
    project number (Google accepts it for the id) would be a second budget, and a path
    without a project (express mode, for API keys) a budget per hourly token."""
    key = provider.credential_of(headers)
    if key is None or key.startswith(VIRTUAL_KEY_PREFIX):
        return None
    if key != Credential("authorization", "bearer").read(headers):
        return None  # an API key: charged as itself
    route = headers.get(":path", "").partition("?")[0]
    project = _VERTEX_PROJECT.search(route)
    if project is None and "/publishers/" in route:
        return RequestRejected(400, "project_required",
                               "an OAuth access token is charged to the project it calls: "
                               "use /v1/projects/<project-id>/locations/<location>/… (express "
                               "mode paths take an API key)")
    if project is not None and unquote(project.group(1)).isdigit():
        return RequestRejected(400, "project_number",
                               "name the project by its id, not its number: tokenfuse charges "
                               "a Vertex caller as its project, and one name per project "
                               "keeps one budget")
    return None


class VertexArray(ArrayStream, Vertex):
    pass


def _as_message(content: Any) -> Any:
    """A turn as the loop guard reads any provider's messages: its parts as `content`
    (the same strings, so the input bound counts them once)."""
    if not isinstance(content, dict) or "parts" not in content:
        return content
    return {("content" if k == "parts" else k): v for k, v in content.items()}


def _has_media(contents: list[Any]) -> bool:
    """A `fileData` part (Files API, gs://, a URL: its size is not in the request) or an
    `inlineData` one: Google bills media by what they show, not by their bytes (images
    258 tokens per 768 px tile on 2.5, video 263 tokens a second, audio 32: a small,
    well-compressed file can bill more tokens than its base64 text counts), and no rule
    tokenfuse can apply to the bytes alone bounds every kind."""
    return any(isinstance(part, dict) and (field(part, "fileData") is not None
                                           or field(part, "inlineData") is not None)
               for content in contents if isinstance(content, dict)
               for part in as_list(content.get("parts")))


def _grounding_bound(model: str, body: dict[str, Any]) -> int:
    """Most a request's grounding can bill beside its tokens (nano-USD): one grounded
    prompt, or on Gemini 3 `MAX_SEARCH_QUERIES` queries; 0 without a grounding tool."""
    if not any(isinstance(tool, dict) and not GROUNDING_TOOLS.isdisjoint(tool)
               for tool in as_list(field(body, "tools"))):
        return 0
    if model.startswith(PER_QUERY_PREFIXES):
        return max(GROUNDED_PROMPT_NANO, MAX_SEARCH_QUERIES * SEARCH_QUERY_NANO)
    return GROUNDED_PROMPT_NANO


def _grounding(payload: dict[str, Any]) -> tuple[int, int]:
    """(billed uses, nano-USD each) of the grounding an answer reports: Gemini 3 bills
    each search query, earlier models each grounded prompt (`groundingMetadata`)."""
    queries, grounded = 0, False
    for candidate in as_list(payload.get("candidates")):
        meta = candidate.get("groundingMetadata") if isinstance(candidate, dict) else None
        if isinstance(meta, dict):
            grounded = True
            queries += len(as_list(meta.get("webSearchQueries")))
    if not grounded:
        return 0, 0
    if str(payload.get("modelVersion", "")).startswith(PER_QUERY_PREFIXES):
        return max(queries, 1), SEARCH_QUERY_NANO
    return 1, GROUNDED_PROMPT_NANO


def _has_server_tool(body: dict[str, Any]) -> bool:
    return any(isinstance(tool, dict) and not SERVER_TOOLS.isdisjoint(tool)
               for tool in as_list(field(body, "tools")))


def _generated(payload: dict[str, Any]) -> list[str]:
    """Text of every candidate's parts: text (thought summaries too), function calls
    (name, arguments), executable code and its result."""
    out: list[str] = []
    for candidate in as_list(payload.get("candidates")):
        content = candidate.get("content") if isinstance(candidate, dict) else None
        if not isinstance(content, dict):
            continue
        for part in as_list(content.get("parts")):
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                out.append(part["text"])
            call = part.get("functionCall")
            if isinstance(call, dict):
                out += [str(call.get("name")), json.dumps(call.get("args"),
                                                          ensure_ascii=False)]
            code = part.get("executableCode")
            if isinstance(code, dict) and isinstance(code.get("code"), str):
                out.append(code["code"])
            result = part.get("codeExecutionResult")
            if isinstance(result, dict) and isinstance(result.get("output"), str):
                out.append(result["output"])
    return out


def gemini() -> Gemini:
    """The registered Gemini route, its JSON-array twin attached."""
    route = Gemini()
    route.array = GeminiArray()
    route.array.sse = route
    return route


def vertex() -> Vertex:
    """The registered Vertex route, its JSON-array twin attached."""
    route = Vertex()
    route.array = VertexArray()
    route.array.sse = route
    return route
