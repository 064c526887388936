"""The fake provider's Cohere v2 API: `/cohere/v2/chat` and `/cohere/v2/embed` (the test
stack points TOKENFUSE_UPSTREAM_COHERE at `<fake>/cohere`). `FakeProvider` hands these
requests here.

Like the real API where money is concerned (cohere 7.3.1, Fern-generated from Cohere's API
definition: cohere/v2/types/*.py, cohere/types/usage.py, api_meta.py; docs.cohere.com v2
reference, "Streaming", "Errors"; recorded streams in public repositories):

- `Authorization: Bearer <key>` is the key billed; none or a revoked one: 401
  `{"message": ...}` (every error is `{"message": ...}` with its HTTP status);
- chat: `max_tokens` caps all generated tokens, a reasoning model's thinking included
  (docs, "Reasoning"); absent: the model's maximum output; above it: 400 "too many tokens:
  max tokens must be less than or equal to N, the maximum output for this model -
  received M." (the docs' error example); unknown model: 404;
- the bill is `usage.billed_units` (the user's text only); `usage.tokens` also counts the
  chat template (a recorded stream: billed input 5, tokens input 70): `TEMPLATE_TOKENS`;
- a stream is SSE with an `event:` line and the same JSON `type`: message-start,
  content-start / content-delta / content-end per content item (thinking first for a
  reasoning model, then text), message-end with `delta.finish_reason` and `delta.usage`;
  `x-fake-cohere-done: 1` appends `data: [DONE]` (the SDK stops on it; whether the real
  API sends it is not known); `x-fake-cohere-error-after: N` ends the stream after N
  events with Cohere's failed-generation `message-end` (finish_reason ERROR, `error`);
- with `tools`, the model plans and calls the first tool (finish_reason TOOL_CALL): the
  plan streams as `tool-plan-delta`, the call as `tool-call-start` / `tool-call-delta`
  (argument JSON text) / `tool-call-end`, all billed as output; with `documents`, the
  answer cites the first one (`citation-start` / `citation-end`: quotes, not new tokens);
- embed: `meta.billed_units.input_tokens`; images are not served (tokenfuse refuses them);
- compression: gzip when the request accepts it (the SDK sends `accept-encoding: gzip,
  deflate`; whether api.cohere.com compresses is not verified: the fake does, the harder
  case for the meter), streams flushed per event;
- a stream whose client goes away stops generating and is billed what was generated
  (FakeProvider._stream).

Input is counted in cl100k (the fake's stand-in for Cohere's tokenizer, which tokenfuse
bounds with cl100k x 1.5); output one token per generated piece. (Chat, thinking, tools,
citations, embeddings and their streams in one wire format, hence its length.)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.support import fake_provider as fp

PREFIX = "/cohere/"


@dataclass(frozen=True)
class CohereModel:
    max_output: int
    reasoning: bool = False
    embedding: bool = False


#: Models the fake serves (docs.cohere.com/docs/models: Command A 8K output, R-series 4K,
#: the reasoning model 32K).
MODELS = {
    "command-a-03-2025": CohereModel(8000),
    "command-r-08-2024": CohereModel(4096),
    "command-r7b-12-2024": CohereModel(4096),
    "command-a-plus-05-2026": CohereModel(64000),
    "command-a-reasoning-08-2025": CohereModel(32000, reasoning=True),
    "embed-v4.0": CohereModel(0, embedding=True),
    "embed-english-v3.0": CohereModel(0, embedding=True),
}
#: The chat template the raw count (`usage.tokens`) adds to the billed input.
TEMPLATE_TOKENS = 65
#: Thinking tokens of a reasoning model (x-fake-reasoning-tokens: other).
DEFAULT_THINKING_TOKENS = 12
EMBEDDING_DIMENSIONS = 8


class CohereError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    headers = {"retry-after": str(retry_after if retry_after is not None else 1)} \
        if status in fp.RETRYABLE else {}
    return web.json_response({"message": message}, status=status, headers=headers,
                             dumps=fp._dumps)


@dataclass(frozen=True)
class CohereBill:
    endpoint: str  # chat, embed
    model: str
    input_tokens: int  # billed_units.input_tokens
    thinking: list[str]
    content: list[str]
    cap: int | None  # max_tokens as sent (None: absent)
    hit_cap: bool
    tool: str | None = None  # the tool called (content is then its plan)
    arguments: str = ""  # the call's arguments, JSON text
    cited: bool = False  # the answer cites the first document

    @property
    def argument_tokens(self) -> int:
        return fp.count_tokens(self.arguments, "cl100k_base") if self.arguments else 0

    @property
    def output_tokens(self) -> int:
        return len(self.thinking) + len(self.content) + self.argument_tokens

    def usage(self, output: int | None = None) -> fp.Usage:
        out = self.output_tokens if output is None else output
        return fp.Usage("cohere", self.model, self.input_tokens, out,
                        reasoning_tokens=min(len(self.thinking), out))

    def usage_json(self) -> dict[str, Any]:
        billed = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        raw = {"input_tokens": self.input_tokens + TEMPLATE_TOKENS,
               "output_tokens": self.output_tokens + 1}  # + the end-of-turn token
        return {"billed_units": billed, "tokens": raw}


def _text(node: Any) -> int:
    if node is None or node == "":
        return 0
    return fp.count_tokens(node if isinstance(node, str) else fp._dumps(node))


def _message_tokens(message: Any) -> int:
    if not isinstance(message, dict):
        return _text(message)
    content = message.get("content")
    if isinstance(content, list):
        tokens = sum(_text(p.get("text")) if isinstance(p, dict) and p.get("type") == "text"
                     else _text(p) for p in content)
    else:
        tokens = _text(content)
    return tokens + sum(_text(message.get(k)) for k in ("tool_calls", "tool_plan"))


def bill_for(endpoint: str, body: dict[str, Any], controls: fp.Controls) -> CohereBill:
    """What Cohere bills for `body`; raises CohereError."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise CohereError(400, "invalid request: model is required")
    spec = MODELS.get(model)
    if spec is None or spec.embedding != (endpoint == "embed"):
        raise CohereError(404, f"model '{model}' not found, make sure the correct model ID "
                               "was used and that you have access to the model.")
    with fp.counting_for("cohere", model):
        if endpoint == "embed":
            texts = body.get("texts")
            if not isinstance(texts, list) or not texts:
                raise CohereError(400, "invalid request: texts must be a non-empty list")
            if not body.get("input_type"):
                raise CohereError(400, "invalid request: input_type is required")
            return CohereBill("embed", model, sum(_text(t) for t in texts), [], [], None,
                              False)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise CohereError(400, "invalid request: messages must be a non-empty list")
        billed = sum(_message_tokens(m) for m in messages)
        billed += _text(body.get("documents")) + _text(body.get("tools"))
        billed += _text(body.get("response_format"))
    cap = body.get("max_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise CohereError(400, "invalid request: max_tokens must be a positive integer")
    if cap is not None and cap > spec.max_output:
        raise CohereError(400, f"too many tokens: max tokens must be less than or equal to "
                               f"{spec.max_output}, the maximum output for this model - "
                               f"received {cap}.")
    limit = cap if cap is not None else spec.max_output
    thinking_config = body.get("thinking")
    thinks = spec.reasoning and not (isinstance(thinking_config, dict)
                                     and thinking_config.get("type") == "disabled")
    thinking = min(limit, controls.reasoning_tokens if controls.reasoning_tokens is not None
                   else DEFAULT_THINKING_TOKENS) if thinks else 0
    wanted = controls.output_tokens if controls.output_tokens is not None else (
        cap if cap is not None else controls.default_output_tokens)
    visible = max(0, min(wanted, limit - thinking))
    tools = body.get("tools")
    tool = None
    arguments = ""
    if isinstance(tools, list) and tools and isinstance(tools[0], dict):
        function = tools[0].get("function")
        tool = str(function.get("name")) if isinstance(function, dict) else "tool"
        arguments = fp._dumps({"query": fp.generate_text(min(3, visible))})
    bill = CohereBill("chat", model, billed, fp.generate_pieces(thinking),
                      fp.generate_pieces(visible), cap, False, tool, arguments,
                      bool(body.get("documents")) and tool is None)
    if bill.output_tokens > limit:  # the call's arguments did not fit: none are sent
        bill = CohereBill("chat", model, billed, bill.thinking, bill.content, cap, True)
    hit = cap is not None and bill.output_tokens >= cap
    return CohereBill("chat", model, billed, bill.thinking, bill.content, cap, hit,
                      bill.tool, bill.arguments, bill.cited)


def _finish_reason(bill: CohereBill) -> str:
    if bill.hit_cap:
        return "MAX_TOKENS"
    return "TOOL_CALL" if bill.tool else "COMPLETE"


def _tool_call(bill: CohereBill, arguments: str) -> dict[str, Any]:
    return {"id": f"{bill.tool}_{uuid.uuid4().hex[:8]}", "type": "function",
            "function": {"name": bill.tool, "arguments": arguments}}


def _citation(bill: CohereBill) -> dict[str, Any]:
    text = "".join(bill.content[:2])
    return {"start": 0, "end": len(text), "text": text, "type": "TEXT_CONTENT",
            "sources": [{"type": "document", "id": "doc-0", "document": {"id": "doc-0"}}]}


def _whole(bill: CohereBill) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if bill.thinking:
        content.append({"type": "thinking", "thinking": "".join(bill.thinking)})
    message: dict[str, Any] = {"role": "assistant"}
    if bill.tool:
        message["tool_plan"] = "".join(bill.content)
        if bill.arguments:
            message["tool_calls"] = [_tool_call(bill, bill.arguments)]
    else:
        content.append({"type": "text", "text": "".join(bill.content)})
    if bill.cited:
        message["citations"] = [_citation(bill)]
    message["content"] = content
    return {"id": str(uuid.uuid4()), "finish_reason": _finish_reason(bill),
            "message": message, "usage": bill.usage_json()}


def _events(bill: CohereBill, done: bool) -> list[fp.Event]:
    """The SSE events of the stream: (bytes, visible tokens, billed tokens)."""
    def event(obj: dict[str, Any]) -> bytes:
        return f"event: {obj['type']}\ndata: {fp._dumps(obj)}\n\n".encode()

    out: list[fp.Event] = [(event({"type": "message-start", "id": str(uuid.uuid4()),
                                   "delta": {"message": {"role": "assistant", "content": [],
                                                         "tool_plan": "", "tool_calls": [],
                                                         "citations": []}}}), 0, 0)]
    index = 0
    if bill.tool:
        out += [(event({"type": "tool-plan-delta", "delta": {"message": {
            "tool_plan": piece}}}), 1, 1) for piece in bill.content]
        if bill.arguments:
            out.append((event({"type": "tool-call-start", "index": 0, "delta": {
                "message": {"tool_calls": _tool_call(bill, "")}}}), 0, 0))
            with fp.counting_for("cohere", bill.model):
                pieces = _argument_pieces(bill.arguments)
            out += [(event({"type": "tool-call-delta", "index": 0, "delta": {"message": {
                "tool_calls": {"function": {"arguments": text}}}}}), tokens, tokens)
                for text, tokens in pieces]
            out.append((event({"type": "tool-call-end", "index": 0}), 0, 0))
    for kind, pieces in (("thinking", bill.thinking),
                         ("text", [] if bill.tool else bill.content)):
        if not pieces and (kind == "thinking" or bill.tool):
            continue
        out.append((event({"type": "content-start", "index": index, "delta": {"message": {
            "content": {"type": kind, kind: ""}}}}), 0, 0))
        out += [(event({"type": "content-delta", "index": index,
                        "delta": {"message": {"content": {kind: piece}}}}), 1, 1)
                for piece in pieces]
        out.append((event({"type": "content-end", "index": index}), 0, 0))
        index += 1
    if bill.cited:
        out.append((event({"type": "citation-start", "index": 0, "delta": {"message": {
            "citations": _citation(bill)}}}), 0, 0))
        out.append((event({"type": "citation-end", "index": 0}), 0, 0))
    out.append((event({"type": "message-end", "delta": {
        "finish_reason": _finish_reason(bill), "usage": bill.usage_json()}}), 0, 0))
    if done:
        out.append((b"data: [DONE]\n\n", 0, 0))
    return out


def _argument_pieces(arguments: str) -> list[tuple[str, int]]:
    """The arguments in a few deltas, each with its tokens (they sum to the whole's)."""
    third = max(1, len(arguments) // 3)
    parts = [arguments[:third], arguments[third:2 * third], arguments[2 * third:]]
    total = fp.count_tokens(arguments)
    counts = [fp.count_tokens(p) if p else 0 for p in parts[:2]]
    return [(p, c) for p, c in zip(parts, [*counts, max(0, total - sum(counts))],
                                   strict=True) if p]


async def dispatch(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord
                   ) -> tuple[web.StreamResponse, fp.Usage | None, bool]:
    record.body = await request.read()
    endpoint = request.path.removeprefix(PREFIX).rstrip("/")
    data = fake._peek(record)
    key = record.api_key
    if not key:
        return error(401, "no api key supplied"), None, False
    if key in fake.revoked_keys:
        return error(401, "invalid api token"), None, False
    failure = fake.key_failures.get(key)
    if failure is not None:
        return error(failure[0], f"key failing with {failure[0]}", failure[1]), None, False
    if (status := fp._header_int(request, "x-fake-status")) is not None:
        return error(status, f"fake provider status {status}"), None, False
    if request.method == "GET" and endpoint == "v1/models":
        return web.json_response({"models": [{"name": m} for m in MODELS]}), None, False
    if request.method != "POST" or endpoint not in ("v2/chat", "v2/embed"):
        return error(404, f"Not Found: {request.method} /{endpoint}"), None, False
    if not isinstance(data, dict):
        return error(400, "invalid request: the body is not a JSON object"), None, False
    kind = endpoint.removeprefix("v2/")
    record.stream = kind == "chat" and data.get("stream") is True
    controls = fp.Controls.from_headers(request.headers, fake.default_output_tokens)
    if fake.answers_by_input:
        fp._ANSWER_SEED.set(fp.answer_seed(data, request.headers))
    try:
        bill = bill_for(kind, data, controls)
    except CohereError as exc:
        return error(exc.status, exc.message), None, False
    record.bill = fp.Bill("cohere", bill.endpoint, bill.model, bill.input_tokens,
                          [fp.Generation(len(bill.content), len(bill.thinking), bill.hit_cap)],
                          cap=bill.cap)
    if kind == "embed":
        texts = data["texts"]
        body = {"id": str(uuid.uuid4()), "response_type": "embeddings_by_type",
                "embeddings": {"float": [[0.125] * EMBEDDING_DIMENSIONS for _ in texts]},
                "texts": texts,
                "meta": {"api_version": {"version": "2"},
                         "billed_units": {"input_tokens": bill.input_tokens}}}
        return web.json_response(body, dumps=fp._dumps), bill.usage(), False
    if not record.stream:
        return web.json_response(_whole(bill), dumps=fp._dumps), bill.usage(), False
    done = request.headers.get("x-fake-cohere-done") == "1"
    events = _events(bill, done)
    failed_after = fp._header_int(request, "x-fake-cohere-error-after")
    if failed_after is not None:
        # A generation failing after N events: Cohere's message-end ERROR (then, with
        # x-fake-truncate-after, a connection reset).
        error_end = {"type": "message-end", "delta": {"finish_reason": "ERROR",
                                                      "error": "internal generation error"}}
        events = [*events[:failed_after],
                  (f"event: message-end\ndata: {fp._dumps(error_end)}\n\n".encode(), 0, 0),
                  (b": padding\n\n", 0, 0)]
    return await fake._stream(request, record, iter(events), bill.usage(), "\n")
