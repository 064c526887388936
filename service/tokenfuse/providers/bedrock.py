"""AWS Bedrock runtime: Converse / ConverseStream (Bedrock's own shape, any model) and
InvokeModel / InvokeModelWithResponseStream for Anthropic models (Anthropic's Messages
body and events, read by `tokenfuse.providers.anthropic` by composition). Streams are
binary AWS event streams (`tokenfuse.providers.eventstream`). Two wire formats, the model
id rules (percent-encoded ids, ARNs, geo inference profiles) and the refusals boto3 does
not retry, hence its length.

Facts (botocore 1.44.8 `data/bedrock-runtime/2023-09-30/service-2.json`, the Smithy model
AWS ships; boto3 / anthropic 2.15.0 `AnthropicBedrock` checked against a fake server,
/work/notes/issue14_bedrock_cohere.md; docs/providers.md):

- `POST /model/{modelId}/converse|converse-stream|invoke|invoke-with-response-stream`;
  boto3 percent-encodes the id (`:` as `%3A`, the `/` of an ARN as `%2F`), AnthropicBedrock
  keeps `:` literal: the segment is decoded once. An ARN's model is the part after its `/`
  (foundation models and inference profiles; other ARNs name no model: priced only if the
  operator prices that ARN);
- Converse: `inferenceConfig.maxTokens` is the cap ("The default value is the maximum
  allowed value for the model"); `usage` {inputTokens (cache excluded), outputTokens,
  cacheReadInputTokens, cacheWriteInputTokens} in the response and in the stream's
  `metadata` event, which comes after `messageStop` and is the last;
- InvokeModel (Anthropic): the Messages body without `model`, with `anthropic_version`
  (any value: the SDK sends its own); each stream `chunk` is `{"bytes": <base64 of an
  Anthropic event>}`, the last with `amazon-bedrock-invocationMetrics`;
- errors are `{"message": M}` with `x-amzn-errortype: <Type>:http://internal.amazon.com/
  coral/com.amazon.bedrock/`; boto3 takes the error code from that header (else `__type`)
  and retries every 429 (and 5xx) twice, so refusals a retry cannot change are not 429;
- a mid-stream exception frame (`:exception-type: throttlingException`, `{"message": M}`)
  is raised by boto3 as EventStreamError(M) and by AnthropicBedrock as APIStatusError;
- identity: a Bedrock API key, `Authorization: Bearer <key>`, passes through. A client's
  SigV4 signature covers the host, path and body tokenfuse changes: refused (a gateway key
  bound to a pool of AWS credentials is signed for the provider by tokenfuse instead).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar
from urllib.parse import unquote

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.anthropic import (
    IMAGE_MAX_TOKENS,
    MIN_THINKING_BUDGET,
    PER_TOOL_TOKENS,
    TOOL_SYSTEM_PROMPT_TOKENS,
    Anthropic,
)
from tokenfuse.providers.anthropic import TOKENIZER as CLAUDE_TOKENIZER
from tokenfuse.providers.base import (
    Call,
    Credential,
    ErrorKind,
    FrameDecoder,
    ProviderBase,
    RequestRejected,
    Tokenizer,
    as_list,
    asks_1h_cache,
    count_of,
    endpoint_of,
    int_field,
)
from tokenfuse.providers.eventstream import (
    CORRUPT_EVENT,
    EventStreamDecoder,
    exception_frame,
    undecodable_tokens,
)

#: Operations by the last path segment: (endpoint, streamed).
OPERATIONS = {"converse": ("converse", False), "converse-stream": ("converse", True),
              "invoke": ("invoke", False),
              "invoke-with-response-stream": ("invoke", True)}
_PATH = re.compile(r"^/model/([^/?]+)/([a-z-]+)$")
#: What a decoded model id may be: a base model or inference profile id, or an ARN whose
#: resource is one id (application profiles, provisioned and imported models included).
_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9._:-]{1,2048}|arn:aws[a-z-]*:bedrock:[a-z0-9-]*:"
                       r"[0-9]*:[a-z-]+/[A-Za-z0-9._:-]{1,1024})$")
_ARN_MODEL = re.compile(r"^arn:aws[a-z-]*:bedrock:[a-z0-9-]*:[0-9]*:"
                        r"(?:foundation-model|inference-profile)/(.+)$")
#: Geo inference profiles (`us.anthropic.…`). A regional profile costs more than the base
#: model (+10 % for the 4.5 models in LiteLLM 1.110.2: `us.anthropic.claude-sonnet-4-5…`
#: 3.3e-06 vs 3e-06 input), us-gov more again: a profile the table lacks is priced at the
#: dearest variant it has, never at the base id.
GEO_PREFIXES = ("us-gov", "us", "eu", "apac", "jp", "au", "ca", "global")
_GEO = re.compile(r"^(" + "|".join(GEO_PREFIXES) + r")\.(.+)$")
#: Fallbacks for a geo profile without its own price, dearest first (LiteLLM 1.110.2).
GEO_FALLBACK_ORDER = ("us-gov", "us", "eu", "apac", "jp", "au")
_ANTHROPIC_MODEL = re.compile(r"^(?:(?:" + "|".join(GEO_PREFIXES) + r")\.)?anthropic\.")
#: Bedrock error types (`x-amzn-errortype`) by kind: modeled shapes of service-2.json that
#: botocore raises as their classes; none is one botocore's retry rules retry.
ERROR_TYPES: dict[str, str] = {
    "invalid_request": "ValidationException",
    "authentication": "UnrecognizedClientException",
    "permission": "AccessDeniedException",
    "rate_limit": "ServiceQuotaExceededException",
    "unavailable": "ServiceUnavailableException",
    "budget": "ServiceQuotaExceededException",
    "stream_cut": "throttlingException",
}
ERROR_TYPE_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
#: The in-stream cut: a member of both stream unions (ConverseStreamOutput and
#: ResponseStream), camelCase, which botocore raises as EventStreamError with our message.
CUT_EXCEPTION = "throttlingException"
#: A pool member that is a set of AWS credentials, not a Bedrock API key:
#: `aws4:<access key id>:<secret access key>:<region>[:<session token>]` (what
#: `tokenfuse.pools.secrets` makes of a CSV row with AWS credential columns).
AWS_SECRET_PREFIX = "aws4:"
#: The pool probe: ListAsyncInvokes, free and read-only (service-2.json `GET /async-invoke`).
PROBE_PATH = "/async-invoke?maxResults=1"
#: SigV4's service name for bedrock-runtime (the service model's `signingName`).
SIGNING_NAME = "bedrock"
_SIGV4_CREDENTIAL = re.compile(r"^AWS4-HMAC-SHA256\s+Credential=([A-Za-z0-9]+)/", re.I)
#: Headers of the client's that a signature tokenfuse makes replaces.
_SIGNATURE_HEADERS = ("x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
#: What bills at a premium over the standard per-token price (AWS Bedrock pricing: the
#: priority tier, latency-optimized inference; reserved capacity its own way): refused,
#: fail-closed. Converse body fields (with the values refused, None: any) and InvokeModel
#: headers (service-2.json) to the option's name. (Guardrails, billed per text unit beside
#: the tokens, pass: a documented gap, recorded in tests/fixtures/recorded.)
UNMETERED_FIELDS: dict[str, dict[str, tuple[str, ...]] | None] = {
    "serviceTier": {"type": ("priority", "reserved")},
    "performanceConfig": {"latency": ("optimized",)},
}
UNMETERED_HEADERS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "x-amzn-bedrock-service-tier": ("serviceTier", ("priority", "reserved")),
    "x-amzn-bedrock-performanceconfig-latency": ("performanceConfig", ("optimized",)),
}
#: Content blocks of a Converse message whose tokens are not their text.
_MEDIA_BLOCKS = ("image", "document", "video", "audio")
MEDIA_TYPE = "bedrock_media"


class Bedrock(ProviderBase):
    """The route, and Converse's wire format; `for_path` names Invoke's."""

    name = "bedrock"
    genai_provider = "aws.bedrock"
    default_upstream = "https://bedrock-runtime.us-east-1.amazonaws.com"
    credentials = (Credential("authorization", "bearer"),)  # Bedrock API keys
    error_types: ClassVar[dict[str, str]] = ERROR_TYPES
    media_block_types = frozenset({MEDIA_TYPE})
    price_dataset_providers = ("bedrock", "bedrock_converse")
    price_namespace = "bedrock"
    cache_write_1h_input_multiple = 2  # Claude's (Anthropic's rule; Nova writes no cache)
    #: A pool may hold AWS credentials: the upstream stage signs each attempt over its
    #: body (its pooled cluster sends the body to the processor).
    signs_pooled_requests = True

    def __init__(self) -> None:
        self.invoke: Bedrock = self

    def for_path(self, path: str) -> Bedrock:
        return self.invoke if endpoint_of(path).endswith(("/invoke",
                                                          "/invoke-with-response-stream")) \
            else self

    # -- model ids and prices
    def price_model_id(self, model: str, mode: str, prefixed: bool) -> str | None:
        """`anthropic.claude-…-v1:0`, `us.anthropic.…`; region and commitment variants
        (`us-gov-east-1/…`, `…/1-month-commitment/…`) are not the runtime's ids."""
        return None if "/" in model or mode not in ("chat", "completion") else model

    def price_ids(self, model: str) -> tuple[tuple[str | None, str], ...]:
        """The full id first (an ARN: its model); a geo profile without its own price at
        the dearest other geo variant the table has, never the base model."""
        found = _ARN_MODEL.match(model)
        wanted = found.group(1) if found else model
        ids: list[tuple[str | None, str]] = [(self.price_namespace, wanted)]
        geo = _GEO.match(wanted)
        if geo:
            ids += [(self.price_namespace, f"{p}.{geo.group(2)}") for p in GEO_FALLBACK_ORDER
                    if p != geo.group(1)]
        return tuple(ids)

    def tokenizer(self, model: str) -> Tokenizer:
        """Claude's bound for every model: Bedrock's other families (Llama, Mistral,
        Nova, ...) have tokenizers no larger than Claude's bound per character (cl100k
        x 2.05; an open-weight model's is bounded at x 1.5)."""
        return CLAUDE_TOKENIZER

    # -- requests
    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint, stream, model = route(path)
        if endpoint != "converse":
            return self.invoke.parse_request(path, body)
        config = body.get("inferenceConfig") or {}
        if not isinstance(config, dict):
            raise RequestRejected(400, "invalid_request", "'inferenceConfig' must be an object")
        extra = body.get("additionalModelRequestFields") or {}
        messages = as_list(body.get("messages"))
        for name, values in UNMETERED_FIELDS.items():
            option = body.get(name)
            if option is not None and (values is None or (isinstance(option, dict) and any(
                    option.get(k) in v for k, v in values.items()))):
                raise unmetered(name)
        return Call(
            endpoint="converse", model=model, stream=stream,
            max_output_tokens=int_field(config, "maxTokens"),
            prompt_parts=[_for_estimate({k: v for k, v in body.items()
                                         if k not in ("messages", "inferenceConfig")})],
            messages=_for_estimate(messages),
            hidden_output=_hidden_reasoning(extra),
            framing_tokens=_tool_framing(body, model),
            long_cache_writes=asks_1h_cache(body, "cachePoint"),
        )

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        """A Claude image at its largest; other media (documents, video, another family's
        images) are of unknown size."""
        if block.get("block") == "image" and _is_claude(model):
            return IMAGE_MAX_TOKENS
        return None

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        """`inferenceConfig.maxTokens`; a Claude thinking budget kept below it."""
        config = body.get("inferenceConfig")
        new = {**body, "inferenceConfig": {**(config if isinstance(config, dict) else {}),
                                           "maxTokens": cap}}
        extra = body.get("additionalModelRequestFields")
        thinking = extra.get("thinking") if isinstance(extra, dict) else None
        if isinstance(thinking, dict) and isinstance(budget := thinking.get("budget_tokens"),
                                                     int) and budget >= cap:
            if cap - 1 < MIN_THINKING_BUDGET:
                raise RequestRejected(402, "budget_exceeded",
                                      f"the budget covers {cap} output tokens, too few for "
                                      f"extended thinking (budget_tokens >= "
                                      f"{MIN_THINKING_BUDGET} < maxTokens)")
            assert isinstance(extra, dict)
            new["additionalModelRequestFields"] = {
                **extra, "thinking": {**thinking, "budget_tokens": cap - 1}}
        return new

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        """`toolUse` blocks of an assistant message."""
        if not isinstance(message, dict) or message.get("role") != "assistant":
            return []
        return [(str(use.get("name")), use.get("input"))
                for block in as_list(message.get("content"))
                if isinstance(block, dict) and isinstance(use := block.get("toolUse"), dict)]

    # -- responses
    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """Converse's `usage` (a response, or the stream's `metadata` event)."""
        usage = payload.get("usage")
        if not isinstance(usage, dict) or "outputTokens" not in usage:
            return None
        writes = count_of(usage.get("cacheWriteInputTokens"))
        # `cacheDetails`: "breakdown of cache writes by TTL" ([{ttl, inputTokens}]); the
        # 1-hour ones bill at their own (higher) rate.
        writes_1h = min(writes, sum(count_of(d.get("inputTokens"))
                                    for d in as_list(usage.get("cacheDetails"))
                                    if isinstance(d, dict) and d.get("ttl") == "1h"))
        return TokenUsage(input=count_of(usage.get("inputTokens")),
                          output=count_of(usage.get("outputTokens")),
                          cache_read=count_of(usage.get("cacheReadInputTokens")),
                          cache_write=writes - writes_1h, cache_write_1h=writes_1h)

    def is_event_stream(self, first_chunk: bytes) -> bool:
        """A frame starts with its length (big-endian, at most 24 MiB + headers: a first
        byte 0 or 1); an error document with `{`."""
        return first_chunk[:1] in (b"\x00", b"\x01")

    def stream_decoder(self) -> FrameDecoder:
        return EventStreamDecoder()

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        """A contentBlockDelta's text, tool input, reasoning text; a tool's name (and the
        bytes of a broken stream, `undecodable_tokens`)."""
        if event == CORRUPT_EVENT:
            return undecodable_tokens(event, payload)
        if event == "contentBlockStart":
            start = payload.get("start")
            use = start.get("toolUse") if isinstance(start, dict) else None
            return [use["name"]] if isinstance(use, dict) and isinstance(
                use.get("name"), str) else []
        if event != "contentBlockDelta":
            return []
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            return []
        out = [delta["text"]] if isinstance(delta.get("text"), str) else []
        use = delta.get("toolUse")
        if isinstance(use, dict) and isinstance(use.get("input"), str):
            out.append(use["input"])
        reasoning = delta.get("reasoningContent")
        if isinstance(reasoning, dict):
            out += [v for k in ("text", "redactedContent")
                    if isinstance(v := reasoning.get(k), str)]
        return out

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        output = payload.get("output")
        message = output.get("message") if isinstance(output, dict) else None
        out: list[str] = []
        for block in as_list(message.get("content") if isinstance(message, dict) else None):
            if not isinstance(block, dict):
                continue
            if isinstance(block.get("text"), str):
                out.append(block["text"])
            elif isinstance(use := block.get("toolUse"), dict):
                out += [str(use.get("name")), str(use.get("input"))]
        return out

    def is_final_event(self, event: str, data: str) -> bool:
        """`metadata` (usage, after messageStop), or an exception or error frame."""
        return event == "metadata" or _is_error_event(event)

    # -- refusals
    def refusal_status(self, kind: ErrorKind, status: int) -> int:
        """A loop or velocity refusal is not a 429: boto3 retries every 429 twice
        (botocore/retries/standard.py), and a retried loop is still the loop."""
        return 400 if kind == "rate_limit" else status

    def error_headers(self, kind: ErrorKind, code: str) -> tuple[tuple[str, str], ...]:
        return (("x-amzn-errortype", self.error_type(kind) + ERROR_TYPE_SUFFIX),)

    def error_document(self, kind: ErrorKind, code: str, message: str) -> dict[str, Any]:
        """Bedrock's `{"message"}`, with `__type` (botocore's second source of the error
        code) for an answer that carries no `x-amzn-errortype`."""
        return {"message": message, "__type": self.error_type(kind), "code": code}

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        return exception_frame(CUT_EXCEPTION, message, {"tokenfuse": {"code": code, **details}})

    def escaped_slash_allowed(self, path: str) -> bool:
        return model_segment_ok(path)

    # -- identity and pools
    def header_refusal(self, headers: dict[str, str]) -> RequestRejected | None:
        """A SigV4 signature (header or presigned query) cannot survive the gateway;
        InvokeModel's headers asking for what bills beyond the standard token price are
        refused (`unmetered_option`)."""
        for header, field in UNMETERED_HEADERS.items():
            value = headers.get(header, "").strip().lower()
            if value and (field[1] is None or value in field[1]):
                return unmetered(field[0])
        authorization = headers.get("authorization", "")
        if authorization[:16].upper() == "AWS4-HMAC-SHA256" or \
                "x-amz-signature=" in headers.get(":path", "").lower():
            return RequestRejected(
                400, "sigv4_not_forwardable",
                "this request is signed with AWS SigV4, whose signature covers the host, "
                "path and body the gateway changes; send a Bedrock API key "
                "(Authorization: Bearer, AWS_BEARER_TOKEN_BEDROCK) or a tokenfuse gateway "
                "key bound to a pool of AWS credentials (tokenfuse signs for you)")
        return None

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        """A pooled Bedrock API key (AWS credentials sign the attempt instead:
        `pooled_signature`)."""
        return ("authorization", f"Bearer {secret}"), _SIGNATURE_HEADERS

    def is_signing_secret(self, secret: str) -> bool:
        return secret.startswith(AWS_SECRET_PREFIX)

    def pooled_signature(self, secret: str, headers: dict[str, str], body: bytes
                         ) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
        """(headers to set, to remove) that sign one attempt with a pool's AWS credentials
        (botocore's SigV4Auth, as boto3 signs): over its final method, host, path,
        content type and body, at the current time."""
        access_key, secret_key, region, token = parse_aws_secret(secret)
        request = AWSRequest(
            method=headers.get(":method", "POST"),
            url=f"https://{headers.get(':authority', '')}{headers.get(':path', '/')}",
            data=body, headers={"Content-Type": headers["content-type"]}
            if "content-type" in headers else {})
        SigV4Auth(Credentials(access_key, secret_key, token or None), SIGNING_NAME,
                  region).add_auth(request)
        signed = [("authorization", request.headers["Authorization"]),
                  ("x-amz-date", request.headers["X-Amz-Date"])]
        if token:
            signed.append(("x-amz-security-token", token))
        return tuple(signed), () if token else ("x-amz-security-token",
                                                "x-amz-content-sha256")

    def secret_alias(self, secret: str) -> str | None:
        """The public name of a pooled AWS credential: its access key id."""
        try:
            return AWS_SECRET_PREFIX + parse_aws_secret(secret)[0]
        except ValueError:
            return None

    def credential_alias(self, headers: dict[str, str]) -> str | None:
        """The access key id of the SigV4 signature on a request (a retried attempt
        carries the previous attempt's), as `secret_alias` names it."""
        found = _SIGV4_CREDENTIAL.match(headers.get("authorization", ""))
        return AWS_SECRET_PREFIX + found.group(1) if found else None

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        """ListAsyncInvokes (`GET /async-invoke`, the runtime's one free read); an AWS
        credential's probe is signed by the prober (`pooled_signature`: it knows the URL)."""
        if self.is_signing_secret(secret):
            return PROBE_PATH, {}
        return PROBE_PATH, {"authorization": f"Bearer {secret}"}


class BedrockInvoke(Bedrock):
    """InvokeModel / InvokeModelWithResponseStream of Anthropic models: Anthropic's body,
    usage and events (its provider does the reading), inside Bedrock's paths, frames and
    errors."""

    def __init__(self) -> None:
        super().__init__()
        self.anthropic = Anthropic()

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint, stream, model = route(path)
        if endpoint != "invoke":
            raise RequestRejected(404, "unsupported_endpoint", f"not an invoke path: {path}")
        if not _is_claude(model):
            raise RequestRejected(
                404, "unsupported_endpoint",
                f"tokenfuse meters InvokeModel for Anthropic models only; call '{model}' "
                "with Converse (/model/{modelId}/converse or converse-stream), whose usage "
                "tokenfuse reads for every model; refused (fail-closed)")
        if "model" in body:
            raise RequestRejected(400, "invalid_request",
                                  "the model of an InvokeModel call is in its path, not its "
                                  "body")
        messages = {k: v for k, v in body.items() if k not in ("anthropic_version",
                                                               "anthropic_beta", "stream")}
        call = self.anthropic.parse_request("/v1/messages", {**messages, "model": model})
        call.endpoint, call.stream = "invoke", stream
        if call.new_body is not None:  # server tools' max_uses written in
            call.new_body = {**body, **{k: v for k, v in call.new_body.items()
                                        if k != "model"}}
        return call

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        return self.anthropic.with_output_cap(body, call, cap)

    def media_bound(self, block: dict[str, Any], model: str) -> Any:
        return self.anthropic.media_bound(block, model)

    def tool_calls(self, message: Any) -> list[tuple[str, Any]]:
        return self.anthropic.tool_calls(message)

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """Anthropic's usage; else the last chunk's invocation metrics."""
        usage = self.anthropic.usage(payload)
        metrics = payload.get("amazon-bedrock-invocationMetrics")
        if usage is None and isinstance(metrics, dict):
            usage = TokenUsage(input=count_of(metrics.get("inputTokenCount")),
                               output=count_of(metrics.get("outputTokenCount")),
                               cache_read=count_of(metrics.get("cacheReadInputTokenCount")),
                               cache_write=count_of(metrics.get("cacheWriteInputTokenCount")))
        return usage

    def merge_usage(self, old: TokenUsage | None, new: TokenUsage) -> TokenUsage:
        return self.anthropic.merge_usage(old, new)

    def stream_decoder(self) -> FrameDecoder:
        return EventStreamDecoder(unwrap_chunks=True)

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        return undecodable_tokens(event, payload) if event == CORRUPT_EVENT \
            else self.anthropic.stream_output(event, payload)

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        return self.anthropic.response_output(payload)

    def is_final_event(self, event: str, data: str) -> bool:
        return event == "message_stop" or _is_error_event(event)


def route(path: str) -> tuple[str, bool, str]:
    """(endpoint, streamed, model id decoded once) of a runtime path; refused otherwise."""
    found = _PATH.match(endpoint_of(path))
    operation = OPERATIONS.get(found.group(2)) if found else None
    if found is None or operation is None:
        raise RequestRejected(404, "unsupported_endpoint",
                              f"tokenfuse does not price {endpoint_of(path)}; refused "
                              "(fail-closed)")
    try:
        model = unquote(found.group(1), errors="strict")
    except UnicodeDecodeError:
        model = ""
    if not _MODEL_ID.match(model):
        raise RequestRejected(400, "invalid_request", "the model id in the path is not a "
                                                      "Bedrock model id or ARN")
    return operation[0], operation[1], model


def model_segment_ok(path: str) -> bool:
    """Whether an escaped slash in `path` is only inside a runtime path's model id, which
    is one segment to Bedrock (a URI label) and to tokenfuse (decoded once): an ARN
    (`…:inference-profile%2Fus.anthropic…`). Nothing else of the path may be escaped."""
    found = _PATH.match(endpoint_of(path))
    if found is None or found.group(2) not in OPERATIONS:
        return False
    try:
        model = unquote(found.group(1), errors="strict")
    except UnicodeDecodeError:
        return False
    return bool(_MODEL_ID.match(model)) and "%" not in model and ".." not in model.split("/")


def unmetered(option: str) -> RequestRejected:
    return RequestRejected(
        400, "unmetered_option",
        f"'{option}' bills beyond the standard per-token price (the priority or reserved "
        "tier, latency-optimized inference), which tokenfuse does not meter; refused "
        "(fail-closed)")


def parse_aws_secret(secret: str) -> tuple[str, str, str, str]:
    """(access key id, secret access key, region, session token or "") of an `aws4:`
    pool member; ValueError when it is not one."""
    parts = secret.removeprefix(AWS_SECRET_PREFIX).split(":")
    if not secret.startswith(AWS_SECRET_PREFIX) or len(parts) not in (3, 4) \
            or not all(parts[:3]):
        raise ValueError("an AWS credential is aws4:<access key id>:<secret>:<region>"
                         "[:<session token>]")
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else ""


def _is_claude(model: str) -> bool:
    found = _ARN_MODEL.match(model)
    return bool(_ANTHROPIC_MODEL.match(found.group(1) if found else model))


def _is_error_event(event: str) -> bool:
    """Exception frames are named by their type (all end in Exception), error frames by
    their code or "error"."""
    return event.endswith("Exception") or event == "error"


def _hidden_reasoning(extra: Any) -> bool:
    """Reasoning billed as output and not (all) streamed: Claude's extended thinking
    (summarized on Claude 4), Nova's `reasoningConfig`, any `reasoning_effort`."""
    if not isinstance(extra, dict):
        return False
    thinking = extra.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled"):
        return True
    config = extra.get("reasoningConfig")
    if isinstance(config, dict) and config.get("type") not in (None, "disabled"):
        return True
    return "reasoning_effort" in extra or "reasoning_config" in extra


def _tool_framing(body: dict[str, Any], model: str) -> int:
    config = body.get("toolConfig")
    tools = as_list(config.get("tools")) if isinstance(config, dict) else []
    if not tools:
        return 0
    return (TOOL_SYSTEM_PROMPT_TOKENS if _is_claude(model) else 0) + PER_TOOL_TOKENS * len(tools)


def _for_estimate(node: Any) -> Any:
    """Converse content with its media blocks (`{"image": …}`) marked for the estimator,
    their bytes left out (their size is the provider's bound, not their base64's)."""
    if isinstance(node, list):
        return [_for_estimate(v) for v in node]
    if isinstance(node, dict):
        if len(node) == 1 and next(iter(node)) in _MEDIA_BLOCKS and isinstance(
                next(iter(node.values())), dict):
            # the block itself stays (the loop guard's fingerprint reads it), unread by
            # the estimator, which stops at a media block
            return {"type": MEDIA_TYPE, "block": next(iter(node)), "content": node}
        return {k: _for_estimate(v) for k, v in node.items()}
    return node


def bedrock() -> Bedrock:
    """The registered provider, its InvokeModel twin attached."""
    route_ = Bedrock()
    route_.invoke = BedrockInvoke()
    return route_
