"""The provider interface: everything tokenfuse must know of one wire format.

A provider module implements `Provider` and is listed once in `tokenfuse.providers`
(the registry). Nothing outside this package names a provider or one of its headers.
(The interface, its shared values and the common base in one place, so a new provider is
written against one file; hence its length.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.sse import SseEvent, SseParser

#: What a refusal is about; each provider names it in its own error vocabulary.
ErrorKind = Literal["invalid_request", "authentication", "permission", "rate_limit",
                    "unavailable", "budget", "stream_cut"]

#: The error types both OpenAI and Anthropic use for the common kinds.
COMMON_ERROR_TYPES: dict[str, str] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "rate_limit": "rate_limit_error",
    "unavailable": "api_error",
}


@dataclass(frozen=True)
class Tokenizer:
    """How tokenfuse counts one model's tokens: with an offline `encoding` (tiktoken's
    name; `tokenfuse.metering.tokens.ENCODINGS` are shipped), its counts times `percent` /
    100, rounded up. 100 where the encoding is the model's own; above where the
    provider's tokenizer is not public and the encoding only bounds it."""

    encoding: str = "o200k_base"
    percent: int = 100

    def scale(self, tokens: int) -> int:
        return -(-tokens * self.percent // 100)


DEFAULT_TOKENIZER = Tokenizer()


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
    hidden_output: bool = False  # output may be billed without being streamed (thinking)
    server_context: bool = False  # input refers to server-side content of unknown size
    server_tool_uses: int = 0  # most server-tool uses the request allows (web search, ...)
    server_tool_fee_nano: int = 0  # the largest fee one of those uses can bill
    framing_tokens: int = 0  # input the provider adds around what the request shows
    long_cache_writes: bool = False  # may write cache at the 1-hour rate (asked for it)
    request_fee_nano: int = 0  # a fee per request the provider bills beside tokens (bound)
    inputs: int = 1  # independent inputs, each within the context window (embedding lists)


@dataclass(frozen=True)
class Credential:
    """A request header that carries the caller's key; `scheme` "bearer" means the value
    is `Bearer <key>` (matched case-insensitively)."""

    header: str
    scheme: str | None = None

    @property
    def hint(self) -> str:
        """How a client sends it, for error messages."""
        if self.scheme is None:
            return f"'{self.header}'"
        return f"'{self.header.title()}: {self.scheme.title()} <key>'"

    def read(self, headers: dict[str, str]) -> str | None:
        value = headers.get(self.header, "")
        if self.scheme is None:
            return value.strip() or None
        prefix = self.scheme + " "
        if value[: len(prefix)].lower() == prefix:
            return value[len(prefix):].strip() or None
        return None


class FrameDecoder(Protocol):
    """Splits a response stream into events, whatever the chunk boundaries."""

    def feed(self, chunk: bytes) -> list[SseEvent]: ...

    def finish(self) -> list[SseEvent]: ...


class Provider(Protocol):
    """One wire format. `tokenfuse.providers.openai` is the model implementation."""

    name: str
    default_upstream: str
    sdk_base_path: str  # what the official SDK's base URL adds after /<name> (e.g. /v1)
    credentials: tuple[Credential, ...]  # where the caller's key is read, in precedence
    #: Query parameters the provider also reads a key from (Google's `?key=`), each with
    #: the header tokenfuse moves it into before the request goes on (nothing logs it).
    query_credentials: tuple[tuple[str, Credential], ...]
    media_block_types: frozenset[str]  # content parts whose tokens are not their text
    reasoning_by_model: bool  # a reasoning model thinks unasked (else only when asked)
    #: `litellm_provider` names of the public price dataset whose entries are this
    #: provider's models (`tokenfuse prices refresh`).
    price_dataset_providers: tuple[str, ...]
    #: 1-hour cache writes cost this many times input where the dataset has no price for
    #: them (0: the provider has no such cache lifetime).
    cache_write_1h_input_multiple: int
    #: Prices of this provider's models are `<namespace>/<model>` (None: bare model ids).
    price_namespace: str | None
    #: Text in every stream event that reports usage (the meter asks `usage` of no other).
    usage_marker: str
    #: Models run on the operator's own hardware (Ollama): a price of 0 may be true. For
    #: every other provider a 0 price in the public dataset is a gap, left unpriced.
    self_hosted: bool
    #: Its `gen_ai.provider.name` in OpenTelemetry's GenAI semantic conventions (a
    #: well-known value where the conventions list one, else its route name).
    genai_provider: str

    def for_path(self, path: str) -> Provider:
        """The wire format a path of this route speaks (itself, but for a route that
        serves two APIs: Ollama's `/v1/*` and `/api/*`)."""
        ...

    def for_answer(self, first_chunk: bytes) -> Provider:
        """The wire format a streamed answer turned out to speak, from its first bytes
        (Gemini: an SSE request answered as a JSON array, or the reverse, is metered in
        the framing it has, never passed as a document)."""
        ...

    def price_model_id(self, model: str, mode: str, prefixed: bool) -> str | None:
        """The id this provider's API takes for a dataset model name (its key without the
        `<dataset provider>/` prefix; `prefixed` False: the key had none), or None: not one
        of its models."""
        ...

    # -- requests
    def parse_request(self, path: str, body: dict[str, Any]) -> Call: ...

    def price_ids(self, model: str) -> tuple[tuple[str | None, str], ...]:
        """Where the model's price is looked up, in order: (namespace, model id)."""
        ...

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        """(tool name, arguments) of every tool call recorded in one history message."""
        ...

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        """Input tokens of one media block (image, document, file) at most: an int, a JSON
        node to count as text instead, or None when the request does not show its size."""
        ...

    def tokenizer(self, model: str) -> Tokenizer:
        """How the model's tokens are counted, input and output (an upper bound)."""
        ...

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        """The body with its output cap set to `cap` tokens per choice (the provider then
        enforces the bound); raises RequestRejected when no valid request has that cap."""
        ...

    # -- responses
    def usage(self, payload: dict[str, Any]) -> TokenUsage | None: ...

    def merge_usage(self, old: TokenUsage | None, new: TokenUsage) -> TokenUsage:
        """How usage reported over a stream accumulates (cumulative counts, or deltas)."""
        ...

    def is_event_stream(self, first_chunk: bytes) -> bool:
        """Whether a streamed request's first response bytes are events (else an error
        document)."""
        ...

    def stream_decoder(self) -> FrameDecoder: ...

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]: ...

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        """Generated text of a whole (non-streamed) response, in order: what the client
        sees (text, refusals, tool calls with their arguments), for the loop guard."""
        ...

    def is_usage_only_chunk(self, payload: dict[str, Any]) -> bool: ...

    def genai_operation(self, endpoint: str) -> str:
        """The GenAI `gen_ai.operation.name` of a `Call.endpoint` (chat, embeddings, ...)."""
        ...

    def response_facts(self, payload: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        """(model that answered, finish reason of each choice) of a whole JSON answer, for
        traces; ("", ()) where it says neither."""
        ...

    def is_final_event(self, event: str, data: str) -> bool: ...

    # -- refusals
    def error_body(self, kind: ErrorKind, code: str, message: str,
                   details: dict[str, Any] | None = None) -> bytes: ...

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes: ...

    def refusal_status(self, kind: ErrorKind, status: int) -> int:
        """The status a refusal of this kind is sent with (`status`, unless the
        provider's SDK would retry it by itself)."""
        ...

    def error_headers(self, kind: ErrorKind, code: str) -> tuple[tuple[str, str], ...]:
        """Headers every refusal carries (where the provider's SDK reads the error type)."""
        ...

    def escaped_slash_allowed(self, path: str) -> bool:
        """Whether the path's escaped slashes are inside one segment the provider reads as
        one opaque value (Bedrock's ARN model ids), so no path confusion is possible."""
        ...

    # -- key pools
    def caller_key(self, headers: dict[str, str]) -> str | None:
        """Whom the request is charged to: its credential, or the stable identity behind
        one that rotates (an Entra ID token's principal, a Vertex project)."""
        ...

    def credential_of(self, headers: dict[str, str]) -> str | None:
        """The credential as sent (what a pool holds), whatever `caller_key` charges."""
        ...

    def header_refusal(self, headers: dict[str, str]) -> RequestRejected | None:
        """A refusal decided from the request headers alone (a credential that cannot be
        forwarded: a signature the gateway's changes would break; a header that bills at a
        price tokenfuse does not meter), or None."""
        ...

    #: Whether a pool of this provider may hold credentials that sign each attempt over
    #: its body (AWS SigV4): its pooled cluster then sends request bodies to the processor.
    signs_pooled_requests: bool

    def is_signing_secret(self, secret: str) -> bool:
        """Whether a pooled secret signs attempts (`pooled_signature`) rather than being
        presented as a key (`pooled_credential`)."""
        ...

    def pooled_signature(self, secret: str, headers: dict[str, str], body: bytes
                         ) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        """(headers to set, to remove) that sign one attempt, given its final request
        headers (`:authority`, `:path` as sent upstream) and body."""
        ...

    def secret_alias(self, secret: str) -> str | None:
        """A signing secret's public name (an access key id), None for a plain key."""
        ...

    def credential_alias(self, headers: dict[str, str]) -> str | None:
        """The `secret_alias` of the signature a (retried) request carries, if any."""
        ...

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        """(header to set, headers to remove) that present a pooled key to the provider."""
        ...

    def retry_after_ms(self, headers: dict[str, str]) -> int:
        """When the provider says a key may be used again (ms from now), -1 if unsaid."""
        ...

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        """A cheap, free request (path, headers) that proves a key works."""
        ...


class ProviderBase:
    """Behaviour most providers share; a provider overrides what differs."""

    name = ""
    default_upstream = ""
    sdk_base_path = ""
    credentials: tuple[Credential, ...] = (Credential("authorization", "bearer"),
                                           Credential("x-api-key"))
    query_credentials: tuple[tuple[str, Credential], ...] = ()
    error_types: ClassVar[dict[str, str]] = COMMON_ERROR_TYPES
    media_block_types: frozenset[str] = frozenset()
    reasoning_by_model = False
    price_dataset_providers: tuple[str, ...] = ()
    cache_write_1h_input_multiple = 0
    #: Prices of this provider's models are `<namespace>/<model>` (None: bare model ids).
    price_namespace: str | None = None
    usage_marker = "usage"
    self_hosted = False
    genai_provider = ""  # "" = its route name

    def for_path(self, path: str) -> Provider:
        return self

    def for_answer(self, first_chunk: bytes) -> Provider:
        return self

    def price_model_id(self, model: str, mode: str, prefixed: bool) -> str | None:
        return model

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        return None

    def price_ids(self, model: str) -> tuple[tuple[str | None, str], ...]:
        return ((self.price_namespace, model),)

    def tokenizer(self, model: str) -> Tokenizer:
        return DEFAULT_TOKENIZER

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        return []

    def merge_usage(self, old: TokenUsage | None, new: TokenUsage) -> TokenUsage:
        """Cumulative counts spread over events: keep the largest of each kind."""
        if old is None:
            return new
        return TokenUsage(
            input=max(old.input, new.input),
            output=max(old.output, new.output),
            cache_read=max(old.cache_read, new.cache_read),
            cache_write=max(old.cache_write, new.cache_write),
            tool_fees_nano=max(old.tool_fees_nano, new.tool_fees_nano),
            cache_write_1h=max(old.cache_write_1h, new.cache_write_1h),
            reasoning=max(old.reasoning, new.reasoning),
            web_searches=max(old.web_searches, new.web_searches),
            web_search_nano=max(old.web_search_nano, new.web_search_nano),
            billed_nano=max((b for b in (old.billed_nano, new.billed_nano) if b is not None),
                            default=None),
        )

    def is_event_stream(self, first_chunk: bytes) -> bool:
        return not first_chunk.lstrip().startswith(b"{")

    def stream_decoder(self) -> FrameDecoder:
        return SseParser()

    def is_usage_only_chunk(self, payload: dict[str, Any]) -> bool:
        return False

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        return []

    def genai_operation(self, endpoint: str) -> str:
        return GENAI_OPERATIONS.get(endpoint, endpoint)

    def response_facts(self, payload: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        """Every wire format's fields in one reading: `model` / `modelVersion`; the
        choices' `finish_reason`, the candidates' `finishReason`, or one `stop_reason` /
        `stopReason` / `finish_reason` for the whole answer."""
        model = payload.get("model") or payload.get("modelVersion") or ""
        parts = payload.get("choices") or payload.get("candidates") or ()
        reasons = tuple(str(r) for c in parts if isinstance(c, dict)
                        and (r := c.get("finish_reason") or c.get("finishReason")))
        if not reasons:
            one = (payload.get("stop_reason") or payload.get("stopReason")
                   or payload.get("finish_reason"))
            reasons = (str(one),) if one else ()
        return (model if isinstance(model, str) else ""), reasons

    def error_type(self, kind: ErrorKind) -> str:
        return self.error_types[kind]

    def refusal_status(self, kind: ErrorKind, status: int) -> int:
        return status

    def error_headers(self, kind: ErrorKind, code: str) -> tuple[tuple[str, str], ...]:
        return ()

    def escaped_slash_allowed(self, path: str) -> bool:
        return False

    def header_refusal(self, headers: dict[str, str]) -> RequestRejected | None:
        return None

    signs_pooled_requests = False

    def is_signing_secret(self, secret: str) -> bool:
        return False

    def pooled_signature(self, secret: str, headers: dict[str, str], body: bytes
                         ) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        raise NotImplementedError(f"{self.name} keys sign nothing")

    def secret_alias(self, secret: str) -> str | None:
        return None

    def credential_alias(self, headers: dict[str, str]) -> str | None:
        return None

    def error_document(self, kind: ErrorKind, code: str, message: str) -> dict[str, Any]:
        """The provider's own error object (what its SDK reads)."""
        raise NotImplementedError

    def error_body(self, kind: ErrorKind, code: str, message: str,
                   details: dict[str, Any] | None = None) -> bytes:
        """The error document, plus tokenfuse's machine-readable details."""
        doc = self.error_document(kind, code, message)
        if details:
            doc["tokenfuse"] = details
        return json.dumps(doc).encode()

    def caller_key(self, headers: dict[str, str]) -> str | None:
        return self.credential_of(headers)

    def credential_of(self, headers: dict[str, str]) -> str | None:
        for credential in self.credentials:
            key = credential.read(headers)
            if key:
                return key
        return None

    def retry_after_ms(self, headers: dict[str, str]) -> int:
        value = headers.get("retry-after", "").strip()
        return int(value) * 1000 if value.isdigit() else -1


#: `Call.endpoint` → GenAI `gen_ai.operation.name` (the conventions' well-known values).
GENAI_OPERATIONS = {
    "chat.completions": "chat", "responses": "chat", "messages": "chat", "chat": "chat",
    "converse": "chat", "converseStream": "chat", "completions": "text_completion",
    "generate": "text_completion", "embeddings": "embeddings", "embed": "embeddings",
    "embedContent": "embeddings", "batchEmbedContents": "embeddings",
    "generateContent": "generate_content", "streamGenerateContent": "generate_content",
}


def int_field(body: dict[str, Any], *names: str) -> int | None:
    """The first of `names` present in the body, as a non-negative integer."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RequestRejected(400, "invalid_request", f"'{name}' must be a positive integer")
        return value
    return None


def count_of(value: Any) -> int:
    """A token count a provider reported: a positive integer, else 0 (absent, null, junk)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def input_count(value: Any) -> int:
    """How many independent inputs an embedding request's input field holds (a list of
    texts or of token arrays; one string or one token array is one)."""
    if isinstance(value, list) and value and not all(isinstance(v, int) for v in value):
        return len(value)
    return 1


def asks_1h_cache(node: Any, marker: str) -> bool:
    """Whether any `marker` object anywhere in the request (Anthropic's `cache_control`,
    Bedrock's `cachePoint`) asks for the 1-hour lifetime: only then may cache writes
    bill at the 1-hour rate."""
    pending: list[Any] = [node]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            control = item.get(marker)
            if isinstance(control, dict) and control.get("ttl") == "1h":
                return True
            pending.extend(v for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            pending.extend(v for v in item if isinstance(v, dict | list))
    return False


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestRejected(400, "missing_model", "the request body has no 'model'")
    return model


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def endpoint_of(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/")


def unsupported(endpoint: str) -> RequestRejected:
    return RequestRejected(404, "unsupported_endpoint",
                           f"tokenfuse does not price {endpoint}; refused (fail-closed)")
