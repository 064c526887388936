"""The fake provider's Ollama native dialect: `/ollama/api/*` (the test stack points
TOKENFUSE_UPSTREAM_OLLAMA at `<fake>/ollama`). `FakeProvider` hands these requests here.

Like the real server where money is concerned (github.com/ollama/ollama, server/routes.go
and api/types.go, main 2026-08; ollama-python 0.6.3):

- `/api/chat` and `/api/generate` stream unless `"stream": false`: NDJSON, one compact
  JSON object per line (`application/x-ndjson`), written here in awkward pieces (lines split
  mid-line and inside multi-byte UTF-8); the last line has `"done": true`, `done_reason`
  and `prompt_eval_count` / `eval_count`, which is the bill;
- `options.num_predict` caps every generated token, thinking included (`think`); absent,
  0 or negative: no cap (the answer is the default length, or `UNTIL_THE_CAP` long);
- errors are `{"error": "<message>"}` with an HTTP status (unknown model: 404 "model 'x'
  not found"), and a failing key's 429 carries retry-after;
- responses are never compressed: the Go server has no compression middleware.

Bills: input is the rendered prompt, counted in cl100k (the fake's stand-in for an
open-weight tokenizer): per message its role, content, thinking, tool calls and images
plus `MESSAGE_FRAMING` tokens, the tools and `format` schemas, `system` / `prompt` /
`suffix` / `context` of generate; output one token per streamed piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support import fake_provider as fp

PREFIX = "/ollama/api/"
#: Models the fake serves (anything else is Ollama's 404), with whether they think.
MODELS = {"llama3.2": False, "llama3.2:latest": False, "qwen3": True, "nomic-embed-text": False}
#: Template tokens around each message (role header, end of turn) and the answer's start.
MESSAGE_FRAMING = 4
ANSWER_FRAMING = 3
IMAGE_TOKENS = 768
#: Thinking tokens of a thinking model asked to `think` (x-fake-reasoning-tokens: other).
DEFAULT_THINKING_TOKENS = 6
#: An uncapped answer asked to run "until the cap" stops here (a context window's worth).
UNCAPPED_LIMIT = 4096
EMBEDDING_DIMENSIONS = 8


@dataclass(frozen=True)
class OllamaBill:
    endpoint: str  # chat, generate, embed, embeddings
    model: str
    prompt_tokens: int
    thinking: list[str]  # streamed thinking pieces, one token each
    content: list[str]  # streamed answer pieces, one token each
    cap: int | None  # options.num_predict as Ollama reads it (None: no cap)
    hit_cap: bool

    @property
    def output_tokens(self) -> int:
        return len(self.thinking) + len(self.content)

    def usage(self) -> fp.Usage:
        return fp.Usage("ollama", self.model, self.prompt_tokens, self.output_tokens)


def error(status: int, message: str) -> web.Response:
    """Ollama's error: a string `error` (gin.H{"error": ...})."""
    headers = {"retry-after": "1"} if status in fp.RETRYABLE else {}
    return web.json_response({"error": message}, status=status, headers=headers,
                             dumps=fp._dumps)


def _count(node: Any) -> int:
    return 0 if node is None or node == "" else fp.count_tokens(
        node if isinstance(node, str) else fp._dumps(node))


def _num_predict(options: Any) -> int | None:
    value = options.get("num_predict") if isinstance(options, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fp.ProviderError(400, 'option "num_predict" must be of type integer')
    cap = int(value)  # api/types.go FromMap truncates a float
    return cap if cap > 0 else None


def bill_for(endpoint: str, body: dict[str, Any], controls: fp.Controls,
             default_output: int) -> OllamaBill:
    """What Ollama reports (and the operator pays) for `body`; raises ProviderError."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise fp.ProviderError(400, "model is required")
    if model not in MODELS:
        raise fp.ProviderError(404, f"model '{model}' not found")
    with fp.counting_for("ollama", model):
        if endpoint in ("embed", "embeddings"):
            text = body.get("input") if endpoint == "embed" else body.get("prompt")
            items = text if isinstance(text, list) else [text]
            return OllamaBill(endpoint, model, sum(_count(t) for t in items), [], [], None,
                              False)
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list):
                raise fp.ProviderError(400, "messages is required")
            prompt = sum(MESSAGE_FRAMING + _message_tokens(m) for m in messages)
        else:
            prompt = sum(_count(body.get(k)) for k in ("system", "prompt", "suffix"))
            context = body.get("context")
            prompt += len(context) if isinstance(context, list) else 0
            prompt += IMAGE_TOKENS * len(body.get("images") or ())
        prompt += _count(body.get("tools")) + _count(body.get("format")) + ANSWER_FRAMING
    cap = _num_predict(body.get("options"))
    limit = cap if cap is not None else UNCAPPED_LIMIT
    thinks = MODELS[model] and body.get("think") not in (None, False)
    thinking = min(limit, controls.reasoning_tokens if controls.reasoning_tokens is not None
                   else DEFAULT_THINKING_TOKENS) if thinks else 0
    wanted = controls.output_tokens if controls.output_tokens is not None else (
        cap if cap is not None else default_output)
    visible = max(0, min(wanted, limit - thinking))
    hit_cap = cap is not None and thinking + visible >= cap
    return OllamaBill(endpoint, model, prompt, fp.generate_pieces(thinking),
                      fp.generate_pieces(visible), cap, hit_cap)


def _message_tokens(message: Any) -> int:
    if not isinstance(message, dict):
        return _count(message)
    tokens = sum(_count(message.get(k)) for k in ("role", "content", "thinking", "tool_calls"))
    return tokens + IMAGE_TOKENS * len(message.get("images") or ())


def _final_fields(bill: OllamaBill) -> dict[str, Any]:
    """The metrics of the last object (api/types.go Metrics; counts `omitempty`)."""
    out: dict[str, Any] = {"done": True, "done_reason": "length" if bill.hit_cap else "stop",
                           "total_duration": 123456789, "load_duration": 1234567}
    if bill.prompt_tokens:
        out.update(prompt_eval_count=bill.prompt_tokens, prompt_eval_duration=2345678)
    if bill.output_tokens:
        out.update(eval_count=bill.output_tokens, eval_duration=34567890)
    return out


def _lines(bill: OllamaBill, base: dict[str, Any]) -> list[tuple[dict[str, Any], int]]:
    """(object, output tokens in it) of each line of the stream, in order."""
    chat = bill.endpoint == "chat"

    def piece(kind: str, text: str) -> dict[str, Any]:
        if chat:
            message = {"role": "assistant", "content": text if kind == "content" else ""}
            if kind == "thinking":
                message["thinking"] = text
            return {**base, "message": message, "done": False}
        obj = {**base, "response": text if kind == "content" else "", "done": False}
        if kind == "thinking":
            obj["thinking"] = text
        return obj

    lines = [(piece("thinking", p), 1) for p in bill.thinking]
    lines += [(piece("content", p), 1) for p in bill.content]
    last = {**base, **({"message": {"role": "assistant", "content": ""}} if chat
                       else {"response": ""}), **_final_fields(bill)}
    if not chat:
        last["context"] = [1, 2, 3]
    return [*lines, (last, 0)]


async def dispatch(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord
                   ) -> tuple[web.StreamResponse, fp.Usage | None, bool]:
    record.body = await request.read()
    endpoint = request.path.removeprefix(PREFIX).rstrip("/")
    data = fake._peek(record)
    record.stream = isinstance(data, dict) and data.get("stream") is not False
    key = record.api_key
    if key and key in fake.revoked_keys:
        return error(401, "unauthorized"), None, False
    failure = fake.key_failures.get(key) if key else None
    if failure is not None:
        response = error(failure[0], f"key failing with {failure[0]}")
        response.headers["retry-after"] = str(failure[1])
        return response, None, False
    if (status := fp._header_int(request, "x-fake-status")) is not None:
        return error(status, f"fake provider status {status}"), None, False
    if request.method == "GET" and endpoint in ("tags", "ps"):
        return web.json_response({"models": [{"name": m, "model": m} for m in MODELS]}), \
            None, False
    if request.method == "GET" and endpoint == "version":
        return web.json_response({"version": "0.13.0"}), None, False
    if request.method != "POST" or endpoint not in ("chat", "generate", "embed",
                                                    "embeddings", "show"):
        return error(404, "404 page not found"), None, False
    if not isinstance(data, dict):
        return error(400, "invalid request body"), None, False
    if endpoint == "show":
        return web.json_response({"modelfile": "", "details": {"family": "llama"},
                                  "model_info": {"general.architecture": "llama"},
                                  "capabilities": ["completion"]}), None, False
    controls = fp.Controls.from_headers(request.headers, fake.default_output_tokens)
    if fake.answers_by_input:
        fp._ANSWER_SEED.set(fp.answer_seed(data, request.headers))
    try:
        bill = bill_for(endpoint, data, controls, fake.default_output_tokens)
    except fp.ProviderError as exc:
        return error(exc.status, exc.message), None, False
    record.bill = fp.Bill("ollama", bill.endpoint, bill.model, bill.prompt_tokens,
                          [fp.Generation(len(bill.content), len(bill.thinking), bill.hit_cap)],
                          cap=bill.cap)
    if endpoint in ("embed", "embeddings"):
        record.stream = False
        vector = [0.125] * EMBEDDING_DIMENSIONS
        body: dict[str, Any] = {"embedding": vector} if endpoint == "embeddings" else {
            "model": bill.model, "embeddings": [vector], "total_duration": 1234567,
            "load_duration": 12345, "prompt_eval_count": bill.prompt_tokens}
        return web.json_response(body, dumps=fp._dumps), bill.usage(), False
    base = {"model": bill.model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z",
                                                             time.gmtime())}
    if not record.stream:
        return web.json_response(_whole(bill, base), dumps=fp._dumps), bill.usage(), False
    return await _stream(fake, request, record, bill, _lines(bill, base))


def _whole(bill: OllamaBill, base: dict[str, Any]) -> dict[str, Any]:
    thinking, content = "".join(bill.thinking), "".join(bill.content)
    if bill.endpoint == "chat":
        message = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        return {**base, "message": message, **_final_fields(bill)}
    out = {**base, "response": content, **_final_fields(bill), "context": [1, 2, 3]}
    if thinking:
        out["thinking"] = thinking
    return out


async def _stream(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord,
                  bill: OllamaBill, lines: list[tuple[dict[str, Any], int]]
                  ) -> tuple[web.StreamResponse, fp.Usage, bool]:
    """Write the NDJSON lines in split pieces. A stream that ends early is billed what was
    generated (the tokens of the lines written) and the whole prompt."""
    rng = random.Random(hashlib.sha256(request.path.encode() + record.body).digest())
    delay = (fp._header_int(request, "x-fake-chunk-delay-ms") or 0) / 1000
    resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
    usage, sent = bill.usage(), 0
    try:
        await resp.prepare(request)
        for i, (obj, tokens) in enumerate(lines):
            if i and delay:
                await asyncio.sleep(delay)
            for part in fp.split_points(fp._dumps(obj).encode() + b"\n", rng):
                await resp.write(part)
                await asyncio.sleep(0)  # every piece its own write
            sent += tokens
            record.output_tokens_sent = sent
        # The client had the last line and may have hung up: the call is complete.
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
    except (ConnectionError, asyncio.CancelledError) as exc:
        partial = fp.Usage("ollama", bill.model, bill.prompt_tokens, sent)
        if isinstance(exc, asyncio.CancelledError):
            record.status = resp.status
            fake._finish(record, partial, aborted=True)
            raise
        return resp, partial, True
    record.completed = True
    return resp, usage, False
