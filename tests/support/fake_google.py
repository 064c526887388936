"""The fake provider's Google dialects: the Gemini API under `/gemini/` and Gemini on
Vertex AI under `/vertex/` (the test stack points TOKENFUSE_UPSTREAM_GEMINI / _VERTEX at
`<fake>/gemini` and `<fake>/vertex`). `FakeProvider` hands these requests here.

Like the real APIs where money is concerned (facts and sources:
/work/notes/issue14_gemini_vertex.md, docs/providers.md):

- paths `/{v1,v1beta,v1alpha}/models/{m}:{method}` (Gemini) and
  `/{v1,v1beta1}/[projects/{p}/locations/{l}/]publishers/google/models/{m}:{method}`
  (Vertex); `countTokens` answers `{"totalTokens": N}` and is free; every other method 404;
- identity: `x-goog-api-key`, the `key` query parameter, or `Authorization: Bearer`; an
  unknown (revoked) key is Google's 400 INVALID_ARGUMENT with reason API_KEY_INVALID (not a
  401), a bad bearer 401 UNAUTHENTICATED, no credential 403 PERMISSION_DENIED;
- proto3 JSON bodies: every field in camelCase or snake_case;
- `generationConfig.maxOutputTokens` (absent or 0: the model's 65,536) caps thinking and
  visible output together, per candidate (`candidateCount`); thinking models think
  (`thoughtsTokenCount`, billed as output) before the first chunk and never stream it;
  `thinkingBudget: 0` turns it off (2.5 Pro: 400, it cannot);
- `usageMetadata` is cumulative on every stream chunk (thoughts whole from the first);
  zero counts are omitted; total = prompt + candidates + thoughts + tool use; the cached
  part is inside `promptTokenCount`;
- `?alt=sse`: `data: {json}` events separated by CRLF CRLF, no `event:`, no `[DONE]`, the
  last chunk carries `finishReason`; without `alt=sse` the stream is a JSON array
  (`[{…}` LF `,` CRLF `{…}` LF `]`); written in awkward pieces;
- gzip only when the request accepts it *and* its User-Agent contains "gzip", Google's
  documented rule for its APIs ("To receive a gzip-encoded response you must do two things:
  Set an Accept-Encoding header, and modify your user agent to contain the string gzip",
  developers.google.com API performance tips; the Google Data APIs blog said the same): so
  google-genai (`Accept-Encoding: gzip, deflate`, User-Agent `google-genai-sdk/3.6.1 …`)
  gets identity, as the recorded SSE response without content-encoding shows
  (raslab/gemini_caching_proxy). `x-fake-compress-always` still forces a coding. Envoy
  asks the upstream for identity anyway;
- bodies over 20 MB are refused (400, Google's "Request payload size exceeds the limit"),
  prompts over the 1,048,576-token window likewise;
- a client that goes away stops the generation: what was generated is recorded.

Bills: the prompt is counted in cl100k (the fake's stand-in for Gemini's unpublished
tokenizer), every string of `contents`, `systemInstruction` and `tools`; output one
token per piece. Controls (headers): `x-fake-output-tokens` (visible, per candidate),
`x-fake-reasoning-tokens` (thoughts per candidate; default `DEFAULT_THOUGHTS`),
`x-fake-cached-tokens` (cachedContentTokenCount), `x-fake-tool-use-tokens`
(toolUsePromptTokenCount), `x-fake-chunk-delay-ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support import fake_provider as fp

ROUTES = ("gemini", "vertex")
#: Recorded real responses (`x-fake-replay: <file>`), tests/fixtures/recorded/google/.
RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "recorded" / "google"
_GEMINI = re.compile(r"^/(?:v1|v1beta|v1alpha)/models/([^/:]+):([A-Za-z]+)$")
_VERTEX = re.compile(r"^/(?:v1|v1beta1)/(?:projects/[^/:]+/locations/[^/:]+/)?"
                     r"publishers/google/models/([^/:]+):([A-Za-z]+)$")
#: Models the fake serves: (most output tokens, thinks by default, thinking can be off).
MODELS = {
    "gemini-2.5-flash": (65536, True, True),
    "gemini-2.5-pro": (65536, True, False),
    "gemini-2.5-flash-lite": (65536, False, True),
    "gemini-3-pro-preview": (65536, True, False),
}
CONTEXT_WINDOW = 1_048_576
#: Gemini API request size limit (ai.google.dev: "the total request size limit is 20MB").
MAX_REQUEST_BYTES = 20 * 1024 * 1024
#: Thoughts of a thinking model per candidate when the test does not say.
DEFAULT_THOUGHTS = 24
#: Visible tokens per stream chunk (Gemini streams a few tokens per chunk).
TOKENS_PER_CHUNK = 3
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def route_of(path: str) -> str | None:
    """'gemini' for '/gemini/v1/models/…', 'vertex' for '/vertex/…', else None."""
    head = path.split("/", 2)[1] if path.count("/") >= 2 else ""
    return head if head in ROUTES else None


def error(status: int, message: str, reason: str | None = None,
          retry_delay: str | None = None) -> web.Response:
    """Google's error document (pretty-printed, as the real HTTP error bodies are)."""
    doc: dict[str, Any] = {"code": status, "message": message,
                           "status": _STATUS_NAMES.get(status, "UNKNOWN")}
    details = []
    if reason:
        details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": reason, "domain": "googleapis.com"})
    if retry_delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": retry_delay})
    if details:
        doc["details"] = details
    return web.Response(text=json.dumps({"error": doc}, indent=2), status=status,
                        content_type="application/json")


def response_coding(headers: dict[str, str]) -> str:
    """The coding Google answers with: gzip only for a User-Agent that says "gzip"."""
    if headers.get("x-fake-compress-always") or "gzip" in headers.get("user-agent", ""):
        return fp.response_coding(headers)
    return ""


def billed_key(request: web.Request) -> str:
    """The credential Google authenticates: `x-goog-api-key`, else `?key=`, else Bearer."""
    header = request.headers.get("x-goog-api-key", "").strip()
    if header:
        return header
    query = request.query.get("key", "").strip()
    if query:
        return query
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def _field(obj: Any, camel: str) -> Any:
    """A proto3 JSON field in either spelling."""
    if not isinstance(obj, dict):
        return None
    snake = re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()
    if snake != camel and camel in obj and snake in obj:
        raise fp.ProviderError(400, f"Invalid JSON payload received. Duplicate field {camel}")
    return obj.get(camel, obj.get(snake))


def _int(obj: Any, camel: str) -> int:
    value = _field(obj, camel)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise fp.ProviderError(400, f"Invalid value at 'generation_config.{camel}'")
    return value


@dataclass(frozen=True)
class GoogleBill:
    model: str
    prompt_tokens: int  # cached ones included
    cached_tokens: int
    tool_use_tokens: int
    candidates: int
    thoughts: int  # per candidate
    visible: int  # per candidate
    cap: int  # per candidate, as the API read it (the model's maximum when unset)
    cap_given: int | None  # maxOutputTokens as sent (None: absent or 0)
    search_queries: int = 0  # Google Search grounding: the queries the model issued

    @property
    def hit_cap(self) -> bool:
        return self.thoughts + self.visible >= self.cap

    @property
    def output_tokens(self) -> int:
        return self.candidates * (self.thoughts + self.visible)

    def usage(self, route: str, visible: int | None = None) -> fp.Usage:
        """What is billed (`visible`: per candidate, when a stream ended early)."""
        shown = self.visible if visible is None else visible
        return fp.Usage(route, self.model, self.prompt_tokens + self.tool_use_tokens,
                        self.candidates * (self.thoughts + shown),
                        cached_input_tokens=self.cached_tokens,
                        reasoning_tokens=self.candidates * self.thoughts, vendor=route,
                        request_fee_nano=self.grounding_fee_nano)

    @property
    def grounding_fee_nano(self) -> int:
        """Grounding with Google Search, billed beside the tokens (ai.google.dev/gemini-api/
        docs/pricing): $35 per 1,000 grounded prompts up to 2.5, $14 per 1,000 search
        queries on Gemini 3 (the free allowances are not modelled)."""
        if not self.search_queries:
            return 0
        if self.model.startswith("gemini-3"):
            return self.search_queries * 14_000_000
        return 35_000_000

    def metadata(self, visible: int) -> dict[str, Any]:
        """usageMetadata after `visible` tokens of each candidate (zero counts omitted)."""
        candidates = self.candidates * visible
        thoughts = self.candidates * self.thoughts
        meta: dict[str, Any] = {"promptTokenCount": self.prompt_tokens}
        if candidates:
            meta["candidatesTokenCount"] = candidates
        if self.cached_tokens:
            meta["cachedContentTokenCount"] = self.cached_tokens
        if self.tool_use_tokens:
            meta["toolUsePromptTokenCount"] = self.tool_use_tokens
        if thoughts:
            meta["thoughtsTokenCount"] = thoughts
        meta["totalTokenCount"] = (self.prompt_tokens + candidates + thoughts
                                   + self.tool_use_tokens)
        meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": self.prompt_tokens}]
        return meta


def _prompt_tokens(body: dict[str, Any]) -> int:
    strings = [_field(body, "contents"), _field(body, "systemInstruction"),
               _field(body, "tools")]
    return sum(fp.strings_tokens(node) for node in strings if node is not None)


def bill_for(model: str, body: dict[str, Any], controls: fp.Controls,
             headers: Any) -> GoogleBill:
    """What Google reports (and bills) for `body`; raises ProviderError."""
    if model not in MODELS:
        raise fp.ProviderError(404, f"models/{model} is not found for API version v1beta, "
                                    "or is not supported for generateContent.")
    limit, thinks, can_disable = MODELS[model]
    contents = _field(body, "contents")
    if not isinstance(contents, list) or not contents:
        raise fp.ProviderError(400, "* GenerateContentRequest.contents: contents is not "
                                    "specified")
    config = _field(body, "generationConfig") or {}
    thinking = _field(config, "thinkingConfig") or {}
    cap_given = _int(config, "maxOutputTokens") or None
    if cap_given is not None and cap_given > limit:
        raise fp.ProviderError(400, f"The maximum number of output tokens ({cap_given}) "
                                    f"exceeds the limit ({limit})")  # wording not verified
    cap = cap_given or limit
    candidates = _int(config, "candidateCount") or 1
    if candidates > 8:
        raise fp.ProviderError(400, "candidateCount must be between 1 and 8")
    budget = _field(thinking, "thinkingBudget")
    if budget == 0 and not can_disable:
        raise fp.ProviderError(400, "Budget 0 is invalid. This model only works in "
                                    "thinking mode.")
    with fp.counting_for("openai", "gpt-4"):  # cl100k
        prompt = _prompt_tokens(body)
    if prompt > CONTEXT_WINDOW:
        raise fp.ProviderError(400, f"The input token count ({prompt}) exceeds the maximum "
                                    f"number of tokens allowed ({CONTEXT_WINDOW}).")
    thinking_on = (thinks and budget != 0) or (not thinks and isinstance(budget, int)
                                                and budget > 0)
    wanted = controls.reasoning_tokens if controls.reasoning_tokens is not None \
        else DEFAULT_THOUGHTS
    if isinstance(budget, int) and budget > 0:
        wanted = min(wanted, budget)  # (the real model may overflow it; the cap holds)
    thoughts = min(wanted, cap) if thinking_on else 0
    visible_wanted = controls.output_tokens if controls.output_tokens is not None \
        else controls.default_output_tokens
    visible = max(0, min(visible_wanted, cap - thoughts))
    cached = min(prompt, controls.cached_tokens)
    tool_use = max(0, int(headers.get("x-fake-tool-use-tokens", "0") or 0))
    searches = 1 if any(isinstance(tool, dict) and ({"googleSearch", "google_search"} & set(tool))
                        for tool in _field(body, "tools") or []) else 0
    return GoogleBill(model, prompt, cached, tool_use, candidates, thoughts, visible, cap,
                      cap_given, searches)


async def dispatch(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord
                   ) -> tuple[web.StreamResponse, fp.Usage | None, bool]:
    route = record.provider
    record.vendor = route
    record.query = request.query_string
    record.body = await request.read()
    path = request.path.removeprefix(f"/{route}")
    matched = (_GEMINI if route == "gemini" else _VERTEX).match(path)
    key = record.api_key
    if not key:
        return error(403, "Method doesn't allow unregistered callers (callers without "
                          "established identity). Please use API Key or other form of API "
                          "consumer identity to call this API.", "SERVICE_DISABLED"), \
            None, False
    if key in fake.revoked_keys:
        if request.headers.get("authorization", "").lower().startswith("bearer ") and \
                not request.headers.get("x-goog-api-key") and "key" not in request.query:
            return error(401, "Request had invalid authentication credentials. Expected "
                              "OAuth 2 access token, login cookie or other valid "
                              "authentication credential.", "ACCESS_TOKEN_TYPE_UNSUPPORTED"), \
                None, False
        return error(400, "API key not valid. Please pass a valid API key.",
                     "API_KEY_INVALID"), None, False
    failure = fake.key_failures.get(key)
    if failure is not None:
        return error(failure[0], f"key failing with {failure[0]}",
                     retry_delay=f"{failure[1]}s" if failure[0] == 429 else None), None, False
    if (status := fp._header_int(request, "x-fake-status")) is not None:
        return error(status, f"fake provider status {status}"), None, False
    if request.method == "GET" and path.rstrip("/") in ("/v1beta/models", "/v1/models",
                                                        "/v1beta1/publishers/google/models"):
        return web.json_response({"models": [{"name": f"models/{m}"} for m in MODELS]}), \
            None, False
    if request.method != "POST" or matched is None:
        return error(404, f"The requested URL {path} was not found on this server."), \
            None, False
    if len(record.body) > MAX_REQUEST_BYTES:
        return error(400, f"Request payload size exceeds the limit: {MAX_REQUEST_BYTES} "
                          "bytes."), None, False
    try:
        data = fp.parse_json(record.body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return error(400, "Invalid JSON payload received."), None, False
    record.json = data
    model, method = matched.group(1).removeprefix("models/"), matched.group(2)
    record.model = model
    controls = fp.Controls.from_headers(request.headers, fake.default_output_tokens)
    if fake.answers_by_input:
        fp._ANSWER_SEED.set(fp.answer_seed({"messages": _field(data, "contents")},
                                           request.headers))
    if method == "countTokens":
        with fp.counting_for("openai", "gpt-4"):
            inner = _field(data, "generateContentRequest")
            total = _prompt_tokens(inner if isinstance(inner, dict) else data)
        return web.json_response({"totalTokens": total, "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": total}]}), None, False
    if method not in ("generateContent", "streamGenerateContent"):
        return error(404, f"The requested URL {path} was not found on this server."), \
            None, False
    if "x-fake-replay" in request.headers:
        return await _replay(request, record, route, model, method,
                             request.headers["x-fake-replay"])
    try:
        bill = bill_for(model, data, controls, request.headers)
    except fp.ProviderError as exc:
        return error(exc.status, exc.message), None, False
    record.bill = fp.Bill(route, method, model, bill.prompt_tokens,
                          [fp.Generation(bill.visible, bill.thoughts, bill.hit_cap)]
                          * bill.candidates, returned=bill.candidates, cap=bill.cap_given,
                          cached_tokens=bill.cached_tokens)
    record.stream = method == "streamGenerateContent"
    response_id = uuid.uuid4().hex[:22]
    texts = fp.generate_pieces(bill.visible)
    if not record.stream:
        doc = _chunk(bill, "".join(texts), bill.visible, True, response_id)
        return web.json_response(doc, dumps=fp._dumps), bill.usage(route), False
    sse = request.query.get("alt") == "sse"
    return await _stream(fake, request, record, bill, texts, sse, response_id)


def _chunk(bill: GoogleBill, text: str, visible_so_far: int, last: bool,
           response_id: str) -> dict[str, Any]:
    candidates = []
    for index in range(bill.candidates):
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
        if last:
            candidate["finishReason"] = "MAX_TOKENS" if bill.hit_cap else "STOP"
            if bill.search_queries:  # what the grounded answer reports (recorded shape)
                candidate["groundingMetadata"] = {
                    "webSearchQueries": [f"query {n}" for n in range(bill.search_queries)],
                    "groundingChunks": [{"web": {"uri": "https://example.org/news",
                                                 "title": "example.org"}}]}
        candidate["index"] = index
        candidates.append(candidate)
    return {"candidates": candidates, "usageMetadata": bill.metadata(visible_so_far),
            "modelVersion": bill.model, "responseId": response_id}


async def _stream(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord,
                  bill: GoogleBill, texts: list[str], sse: bool, response_id: str
                  ) -> tuple[web.StreamResponse, fp.Usage, bool]:
    """The chunks, each with the cumulative usage, in split pieces; the last one says
    why the answer ended. A stream that ends early is billed what was generated."""
    rng = random.Random(hashlib.sha256(request.path.encode() + record.body).digest())
    delay = (fp._header_int(request, "x-fake-chunk-delay-ms") or 0) / 1000
    coding = response_coding(record.headers)
    encoder = fp.StreamEncoder(coding)
    headers = {"content-type": "text/event-stream" if sse else "application/json",
               "content-disposition": "attachment"}
    if coding:
        headers.update({"content-encoding": coding, "vary": "Origin, X-Origin, Referer"})
        record.response_encoding = coding
    resp = web.StreamResponse(headers=headers)
    groups = [texts[i:i + TOKENS_PER_CHUNK] for i in range(0, len(texts), TOKENS_PER_CHUNK)]
    groups.append([])  # the last chunk: empty text, finishReason, the same usage
    route = record.provider
    sent = 0
    try:
        await resp.prepare(request)
        for i, group in enumerate(groups):
            if i and delay:
                await asyncio.sleep(delay)
            last = i == len(groups) - 1
            doc = fp._dumps(_chunk(bill, "".join(group), sent + len(group), last,
                                   response_id))
            if sse:
                raw = f"data: {doc}\r\n\r\n".encode()
            else:
                raw = (("[" if i == 0 else ",\r\n") + doc + "\n" + ("]" if last else "")
                       ).encode()
            for part in fp.split_points(raw, rng):
                await resp.write(encoder.encode(part))
                await asyncio.sleep(0)  # every piece its own write
            sent += len(group)
            record.output_tokens_sent = sent * bill.candidates
        with contextlib.suppress(ConnectionError):
            tail = encoder.finish()
            if tail:
                await resp.write(tail)
            await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError) as exc:
        partial = bill.usage(route, visible=sent)
        if isinstance(exc, asyncio.CancelledError):
            record.status = resp.status
            fake._finish(record, partial, aborted=True)
            raise
        return resp, partial, True
    record.completed = True
    return resp, bill.usage(route), False


def recorded_chunks(name: str) -> list[dict[str, Any]]:
    """The JSON chunks of a recording: SSE `data:` lines, or one JSON document per line,
    or one whole (pretty-printed) document."""
    text = (RECORDED / name).read_text(encoding="utf-8")
    if name.endswith(".json"):
        return [json.loads(text)]
    return [json.loads(line.removeprefix("data: ")) for line in text.splitlines()
            if line.strip()]


def recorded_usage(route: str, model: str, chunk: dict[str, Any]) -> fp.Usage:
    """What Google billed for a recording: its last usageMetadata (cumulative)."""
    meta = chunk["usageMetadata"]
    prompt, tool_use = meta.get("promptTokenCount", 0), meta.get("toolUsePromptTokenCount", 0)
    return fp.Usage(route, model, prompt + tool_use,
                    meta["totalTokenCount"] - prompt - tool_use,
                    cached_input_tokens=meta.get("cachedContentTokenCount", 0),
                    reasoning_tokens=meta.get("thoughtsTokenCount", 0), vendor=route)


async def _replay(request: web.Request, record: fp.RequestRecord, route: str, model: str,
                  method: str, name: str) -> tuple[web.StreamResponse, fp.Usage, bool]:
    """A recorded response, its chunks as Google frames them (`data: ` + the recorded JSON
    + CRLF CRLF), each in split pieces; a whole recording as a JSON document."""
    chunks = recorded_chunks(name)
    usage = recorded_usage(route, model, chunks[-1])
    if method == "generateContent":
        record.stream = False
        return web.json_response(chunks[-1], dumps=fp._dumps), usage, False
    record.stream = True
    rng = random.Random(name)
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for chunk in chunks:
        raw = f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\n".encode()
        for part in fp.split_points(raw, rng):
            await resp.write(part)
            await asyncio.sleep(0)
    await resp.write_eof()
    record.completed = True
    return resp, usage, False
