"""The fake provider's AWS Bedrock runtime: `/bedrock/model/{modelId}/<operation>` (the
test stack points TOKENFUSE_UPSTREAM_BEDROCK at `<fake>/bedrock`). `FakeProvider` hands
these requests here.

Like the real service where money is concerned (botocore 1.44.8 bedrock-runtime service
model; boto3 and anthropic 2.15.0 AnthropicBedrock against a probe server, notes in
/work/notes/issue14_bedrock_cohere.md):

- the model id is the raw path segment decoded once (boto3 sends `%3A`, AnthropicBedrock a
  literal `:`; an ARN's `/` as `%2F`);
- Converse / ConverseStream: `inferenceConfig.maxTokens` caps every generated token,
  thinking included (absent: the model's maximum); `usage` {inputTokens (cache excluded),
  outputTokens, totalTokens, cacheRead/WriteInputTokens}; the stream is binary
  eventstream frames (messageStart, contentBlockDelta with the padding field `p` real
  events carry, contentBlockStop, messageStop, then metadata with the usage), written in
  pieces split inside frames;
- InvokeModel (Anthropic models only here): Anthropic's Messages body with
  `anthropic_version`, no `model`; the response is Anthropic's message; the stream is
  `chunk` frames `{"bytes": <base64 Anthropic event>}`, the last (message_stop) with
  `amazon-bedrock-invocationMetrics`;
- Claude's extended thinking (`thinking` in additionalModelRequestFields or the invoke
  body) is billed in full and shown summarized (SHOWN_THINKING_TOKENS);
- errors are `{"message": M}` with `x-amzn-errortype: <Type>:http://internal.amazon.com/
  coral/com.amazon.bedrock/`;
- identity: a Bedrock API key (`Authorization: Bearer`), billed per key; or a SigV4
  signature, verified with the secret of its access key id (`FakeProvider.
  aws_credentials`) over the request as received (method, raw path, Host, the signed
  headers, the body: botocore's SigV4Auth recomputes it), billed per access key id; a bad
  one is AWS's 403 InvalidSignatureException.

Input bill: the text of messages, system and tools, counted in cl100k (the fakes' stand-in
for Claude's tokenizer), plus MESSAGE_FRAMING per message; output one token per piece.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support import fake_provider as fp
from tokenfuse.providers.eventstream import encode_frame, event_frame

PREFIX = "/bedrock/model/"
#: Models the fake serves: (max output tokens, Anthropic model).
MODELS = {
    "us.anthropic.claude-haiku-4-5-20251001-v1:0": (64000, True),
    "anthropic.claude-haiku-4-5-20251001-v1:0": (64000, True),
    "amazon.nova-lite-v1:0": (10000, False),
}
MESSAGE_FRAMING = 4
ERROR_TYPES = {400: "ValidationException", 403: "AccessDeniedException",
               404: "ResourceNotFoundException", 408: "ModelTimeoutException",
               424: "ModelErrorException", 429: "ThrottlingException",
               500: "InternalServerException", 503: "ServiceUnavailableException"}
ERROR_SUFFIX = ":http://internal.amazon.com/coral/com.amazon.bedrock/"
PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class BedrockBill:
    operation: str  # converse, converse-stream, invoke, invoke-with-response-stream
    model: str
    input_tokens: int  # not cached
    cache_read: int
    cache_write: int
    thinking: int  # billed thinking tokens
    content: list[str]  # visible answer pieces, one token each
    cap: int | None  # the request's cap (None: the model's maximum applied)
    hit_cap: bool

    @property
    def output_tokens(self) -> int:
        return self.thinking + len(self.content)

    @property
    def shown_thinking(self) -> int:
        return min(self.thinking, fp.SHOWN_THINKING_TOKENS)

    def usage(self, output: int | None = None) -> fp.Usage:
        return fp.Usage("bedrock", self.model, self.input_tokens,
                        self.output_tokens if output is None else output,
                        cached_input_tokens=self.cache_read,
                        cache_creation_input_tokens=self.cache_write,
                        reasoning_tokens=self.thinking)


_SIGV4 = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                    r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")


def verify_sigv4(request: web.Request, body: bytes,
                 credentials: dict[str, tuple[str, str | None]]) -> str | None:
    """The access key id of a valid SigV4 signature on the request, else None."""
    found = _SIGV4.match(request.headers.get("authorization", ""))
    if found is None:
        return None
    access_key, date, region, service, signed, signature = found.groups()
    if access_key not in credentials or service != "bedrock" \
            or not request.headers.get("x-amz-date", "").startswith(date):
        return None
    secret, token = credentials[access_key]
    if token is not None and request.headers.get("x-amz-security-token") != token:
        return None
    headers = {name: request.headers.get(name, "") for name in signed.split(";")
               if name != "host"}
    rebuilt = AWSRequest(method=request.method,
                         url=f"http://{request.headers.get('host', '')}{request.raw_path}",
                         data=body, headers=headers)
    rebuilt.context["timestamp"] = request.headers["x-amz-date"]
    signer = SigV4Auth(Credentials(access_key, secret, token), service, region)
    expected = signer.signature(signer.string_to_sign(rebuilt,
                                                      signer.canonical_request(rebuilt)),
                                rebuilt)
    return access_key if expected == signature else None


def error(status: int, message: str, kind: str | None = None) -> web.Response:
    kind = kind or ERROR_TYPES.get(status, "ValidationException")
    return web.json_response({"message": message}, status=status, headers={
        "x-amzn-errortype": kind + ERROR_SUFFIX, "x-amzn-requestid": "fake-request-id"})


def _text_tokens(node: Any) -> int:
    """Tokens of every string in `node` (media bytes and numbers not counted)."""
    if isinstance(node, str):
        return fp.count_tokens(node) if node else 0
    if isinstance(node, list):
        return sum(_text_tokens(v) for v in node)
    if isinstance(node, dict):
        return sum(_text_tokens(v) for k, v in node.items() if k not in ("bytes", "format"))
    return 0


def bill_for(operation: str, model: str, body: dict[str, Any], controls: fp.Controls,
             default_output: int) -> BedrockBill:
    """What Bedrock reports (and bills) for `body`; raises ProviderError."""
    if model not in MODELS:
        raise fp.ProviderError(404, f"The provided model identifier is invalid: {model}")
    max_output, claude = MODELS[model]
    converse = operation.startswith("converse")
    if not converse and not claude:
        raise fp.ProviderError(400, "Malformed input request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise fp.ProviderError(400, "messages is required")
    if converse:
        config = body.get("inferenceConfig") or {}
        cap = config.get("maxTokens")
        extra = body.get("additionalModelRequestFields") or {}
        thinking = extra.get("thinking") if isinstance(extra, dict) else None
        tools = (body.get("toolConfig") or {}).get("tools")
    else:
        if "anthropic_version" not in body:
            raise fp.ProviderError(400, "Malformed input request: anthropic_version required")
        cap = body.get("max_tokens")
        if cap is None:
            raise fp.ProviderError(400, "Malformed input request: max_tokens required")
        thinking = body.get("thinking")
        tools = body.get("tools")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise fp.ProviderError(400, "maxTokens must be a positive integer")
    if cap is not None and cap > max_output:
        raise fp.ProviderError(400, f"The maximum tokens you requested exceeds the model "
                                    f"limit of {max_output}")
    with fp.counting_for("anthropic", "claude-haiku-4-5"):
        prompt = sum(MESSAGE_FRAMING + _text_tokens(m) for m in messages)
        prompt += _text_tokens(body.get("system")) + _text_tokens(tools)
    limit = cap if cap is not None else max_output
    thinks = claude and isinstance(thinking, dict) and thinking.get("type") == "enabled"
    reasoning = 0
    if thinks:
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        wanted = controls.reasoning_tokens if controls.reasoning_tokens is not None else budget
        reasoning = min(limit, wanted if isinstance(wanted, int) else 0)
    wanted = controls.output_tokens if controls.output_tokens is not None else (
        cap if cap is not None else default_output)
    visible = max(0, min(wanted, limit - reasoning))
    cache_read = min(controls.cache_read, prompt)
    cache_write = min(controls.cache_creation, prompt - cache_read)
    return BedrockBill(operation, model, prompt - cache_read - cache_write, cache_read,
                       cache_write, reasoning, fp.generate_pieces(visible), cap,
                       reasoning + visible >= limit)


def parse_path(raw_path: str) -> tuple[str, str] | None:
    """(model id decoded once, operation) of `/bedrock/model/{id}/{operation}`."""
    rest = raw_path.split("?", 1)[0].removeprefix(PREFIX)
    segment, _, operation = rest.partition("/")
    if not segment or "/" in operation:
        return None
    return unquote(segment), operation


async def dispatch(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord
                   ) -> tuple[web.StreamResponse, fp.Usage | None, bool]:
    record.body = await request.read()
    record.path = request.raw_path  # as sent (aiohttp's `path` is decoded)
    parsed = parse_path(request.raw_path)
    if request.raw_path.split("?")[0] == "/bedrock/async-invoke" and request.method == "GET":
        parsed = ("", "")  # ListAsyncInvokes: answered once authenticated
    elif request.method != "POST" or parsed is None or parsed[1] not in (
            "converse", "converse-stream", "invoke", "invoke-with-response-stream"):
        return error(404, "Not Found", "UnknownOperationException"), None, False
    model, operation = parsed
    record.model = model
    if request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"):
        signer = verify_sigv4(request, record.body, fake.aws_credentials)
        if signer is None:
            return error(403, "The request signature we calculated does not match the "
                              "signature you provided.", "InvalidSignatureException"), \
                None, False
        record.api_key = signer  # billed per access key id
    key = record.api_key
    if not key:
        return error(403, "Authorization header requires 'Credential' parameter.",
                     "UnrecognizedClientException"), None, False
    if key in fake.revoked_keys:
        return error(403, "The security token included in the request is invalid.",
                     "UnrecognizedClientException"), None, False
    if (failure := fake.key_failures.get(key)) is not None:
        response = error(failure[0], f"key failing with {failure[0]}")
        response.headers["retry-after"] = str(failure[1])
        return response, None, False
    if (status := fp._header_int(request, "x-fake-status")) is not None:
        return error(status, f"fake provider status {status}"), None, False
    if request.method == "GET":  # ListAsyncInvokes (the pools' probe): free
        return web.json_response({"asyncInvokeSummaries": []}), None, False
    data = fake._peek(record)
    record.stream = operation.endswith("stream")  # the operation says, not the body
    if not isinstance(data, dict):
        return error(400, "Malformed input request, please reformat your input and try "
                          "again."), None, False
    controls = fp.Controls.from_headers(request.headers, fake.default_output_tokens)
    if fake.answers_by_input:
        fp._ANSWER_SEED.set(fp.answer_seed(data, request.headers))
    try:
        bill = bill_for(operation, model, data, controls, fake.default_output_tokens)
    except fp.ProviderError as exc:
        return error(exc.status, exc.message), None, False
    record.bill = fp.Bill("bedrock", operation, model, bill.input_tokens + bill.cache_read
                          + bill.cache_write,
                          [fp.Generation(len(bill.content), bill.thinking, bill.hit_cap)],
                          cap=bill.cap, cache_read=bill.cache_read,
                          cache_creation=bill.cache_write)
    if not record.stream:
        body = _converse(bill) if operation == "converse" else _message(bill)
        return web.json_response(body, dumps=fp._dumps), bill.usage(), False
    frames = _converse_frames(bill) if operation == "converse-stream" else _invoke_frames(bill)
    return await _stream(fake, request, record, bill, frames)


def _converse_usage(bill: BedrockBill) -> dict[str, int]:
    usage = {"inputTokens": bill.input_tokens, "outputTokens": bill.output_tokens,
             "totalTokens": bill.input_tokens + bill.output_tokens + bill.cache_read
             + bill.cache_write}
    if bill.cache_read:
        usage["cacheReadInputTokens"] = bill.cache_read
    if bill.cache_write:
        usage["cacheWriteInputTokens"] = bill.cache_write
    return usage


def _stop_reason(bill: BedrockBill) -> str:
    return "max_tokens" if bill.hit_cap else "end_turn"


def _converse(bill: BedrockBill) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if bill.thinking:
        content.append({"reasoningContent": {"reasoningText": {
            "text": fp.generate_text(bill.shown_thinking), "signature": "sig"}}})
    content.append({"text": "".join(bill.content)})
    return {"output": {"message": {"role": "assistant", "content": content}},
            "stopReason": _stop_reason(bill), "usage": _converse_usage(bill),
            "metrics": {"latencyMs": 321}}


def _pad(rng: random.Random) -> str:
    return PADDING[: rng.randint(1, len(PADDING))]


def _converse_frames(bill: BedrockBill) -> list[tuple[bytes, int]]:
    """(frame, output tokens billed once it is out) of a ConverseStream answer."""
    rng = random.Random(len(bill.content))
    frames = [(event_frame("messageStart", {"role": "assistant", "p": _pad(rng)}), 0)]
    index = 0
    if bill.thinking:
        shown = fp.generate_pieces(bill.shown_thinking)
        for i, piece in enumerate(shown):
            # the billed thinking is out once its summary is: the rest with the last piece
            tokens = 1 if i < len(shown) - 1 else bill.thinking - len(shown) + 1
            frames.append((event_frame("contentBlockDelta", {
                "contentBlockIndex": 0, "delta": {"reasoningContent": {"text": piece}},
                "p": _pad(rng)}), tokens))
        frames.append((event_frame("contentBlockStop", {"contentBlockIndex": 0}), 0))
        index = 1
    for piece in bill.content:
        frames.append((event_frame("contentBlockDelta", {
            "contentBlockIndex": index, "delta": {"text": piece}, "p": _pad(rng)}), 1))
    frames.append((event_frame("contentBlockStop", {"contentBlockIndex": index,
                                                    "p": _pad(rng)}), 0))
    frames.append((event_frame("messageStop", {"stopReason": _stop_reason(bill),
                                               "p": _pad(rng)}), 0))
    frames.append((event_frame("metadata", {"usage": _converse_usage(bill),
                                            "metrics": {"latencyMs": 456},
                                            "p": _pad(rng)}), 0))
    return frames


def _anthropic_usage(bill: BedrockBill, output: int) -> dict[str, int]:
    return {"input_tokens": bill.input_tokens, "output_tokens": output,
            "cache_read_input_tokens": bill.cache_read,
            "cache_creation_input_tokens": bill.cache_write}


def _message(bill: BedrockBill) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if bill.thinking:
        content.append({"type": "thinking", "thinking": fp.generate_text(bill.shown_thinking),
                        "signature": "sig"})
    content.append({"type": "text", "text": "".join(bill.content)})
    return {"id": "msg_bdrk_fake", "type": "message", "role": "assistant",
            "model": bill.model.removeprefix("us."), "content": content,
            "stop_reason": _stop_reason(bill), "stop_sequence": None,
            "usage": _anthropic_usage(bill, bill.output_tokens)}


def _chunk(event: dict[str, Any], rng: random.Random) -> bytes:
    raw = base64.b64encode(fp._dumps(event).encode()).decode()
    return encode_frame({":event-type": "chunk", ":content-type": "application/json",
                         ":message-type": "event"},
                        json.dumps({"bytes": raw, "p": _pad(rng)}).encode())


def _invoke_frames(bill: BedrockBill) -> list[tuple[bytes, int]]:
    rng = random.Random(len(bill.content) + 1)
    message = {**_message(bill), "content": [], "stop_reason": None,
               "usage": _anthropic_usage(bill, 1)}
    frames = [(_chunk({"type": "message_start", "message": message}, rng), 0)]
    index = 0
    if bill.thinking:
        frames.append((_chunk({"type": "content_block_start", "index": 0, "content_block": {
            "type": "thinking", "thinking": ""}}, rng), 0))
        shown = fp.generate_pieces(bill.shown_thinking)
        for i, piece in enumerate(shown):
            tokens = 1 if i < len(shown) - 1 else bill.thinking - len(shown) + 1
            frames.append((_chunk({"type": "content_block_delta", "index": 0, "delta": {
                "type": "thinking_delta", "thinking": piece}}, rng), tokens))
        frames.append((_chunk({"type": "content_block_stop", "index": 0}, rng), 0))
        index = 1
    frames.append((_chunk({"type": "content_block_start", "index": index,
                           "content_block": {"type": "text", "text": ""}}, rng), 0))
    for piece in bill.content:
        frames.append((_chunk({"type": "content_block_delta", "index": index,
                               "delta": {"type": "text_delta", "text": piece}}, rng), 1))
    frames.append((_chunk({"type": "content_block_stop", "index": index}, rng), 0))
    frames.append((_chunk({"type": "message_delta", "delta": {
        "stop_reason": _stop_reason(bill), "stop_sequence": None},
        "usage": {"output_tokens": bill.output_tokens}}, rng), 0))
    frames.append((_chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": bill.input_tokens, "outputTokenCount": bill.output_tokens,
        "invocationLatency": 789, "firstByteLatency": 123}}, rng), 0))
    return frames


async def _stream(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord,
                  bill: BedrockBill, frames: list[tuple[bytes, int]]
                  ) -> tuple[web.StreamResponse, fp.Usage, bool]:
    """Write the frames in split pieces. A stream that ends early is billed what was
    generated (the tokens of the frames written) and the whole prompt. `x-fake-corrupt-
    frame: N` flips a payload byte of frame N (its CRC then fails)."""
    rng = random.Random(hashlib.sha256(request.path.encode() + record.body).digest())
    delay = (fp._header_int(request, "x-fake-chunk-delay-ms") or 0) / 1000
    corrupt = fp._header_int(request, "x-fake-corrupt-frame")
    resp = web.StreamResponse(headers={"content-type": "application/vnd.amazon.eventstream",
                                       "x-amzn-requestid": "fake-request-id"})
    sent = 0
    try:
        await resp.prepare(request)
        for i, (frame, tokens) in enumerate(frames):
            if i and delay:
                await asyncio.sleep(delay)
            if i == corrupt:
                frame = frame[:-6] + bytes([frame[-6] ^ 0x01]) + frame[-5:]
            for part in fp.split_points(frame, rng):
                await resp.write(part)
                await asyncio.sleep(0)
            sent += tokens
            record.output_tokens_sent = sent
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError) as exc:
        partial = bill.usage(sent)
        if isinstance(exc, asyncio.CancelledError):
            record.status = resp.status
            fake._finish(record, partial, aborted=True)
            raise
        return resp, partial, True
    record.completed = True
    return resp, bill.usage(), False
