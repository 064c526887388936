"""Ollama: its OpenAI-compatible API (`/v1/*`, as any compatible vendor) and its native
API (`/api/*`), which streams NDJSON instead of SSE.

One route, two wire formats: `Ollama.for_path` names the one a path speaks, so refusals,
the stream framing and the in-stream cut are each in the shape that path's client reads.
Facts from Ollama's source (github.com/ollama/ollama, server/routes.go and api/types.go,
main branch 2026-08) and ollama-python 0.6.3 (ollama/_client.py, _types.py):

- native requests stream unless `"stream": false` (routes.go: `req.Stream != nil &&
  !*req.Stream` is the only non-streaming case); each line is `json.Marshal` of one value
  plus "\\n", content type `application/x-ndjson`; the last has `"done": true` with
  `prompt_eval_count` / `eval_count` (omitted when 0: `omitempty`);
- an error before any content is an HTTP error status with `{"error": "<message>"}`
  (`application/json`); after content, one more NDJSON line `{"error": "<message>"}`, and
  the stream ends. ollama-python raises `ResponseError(<message>)` on either (it shows a
  string `error` as is, a dict as its repr);
- the output cap is `options.num_predict`; -1 (the default) and any negative value mean
  "until a stop condition" (llm/llama_server.go boundedNumPredict), and so may 0 (omitted
  from one runner request, whose default is -1; the MLX runner reads <= 0 as its
  maximum): tokenfuse reads 0 as no cap, the safe reading; floats are truncated
  (api/types.go FromMap);
- `/api/embed` reports `prompt_eval_count`; the legacy `/api/embeddings` reports nothing
  (settled at its reservation, the input bound);
- the server never compresses responses (no gzip middleware in server/).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tokenfuse.pricing import TokenUsage
from tokenfuse.providers.base import (
    Call,
    ErrorKind,
    FrameDecoder,
    RequestRejected,
    as_list,
    count_of,
    endpoint_of,
    input_count,
    model_of,
    unsupported,
)
from tokenfuse.providers.compatible import Dialect, OpenAICompatible
from tokenfuse.providers.ndjson import NdjsonDecoder
from tokenfuse.providers.openai import PER_TOOL_TOKENS

#: The native API's root.
NATIVE_PREFIX = "/api/"
#: Native endpoints tokenfuse meters, by path.
METERED = {"/api/chat": "chat", "/api/generate": "generate", "/api/embed": "embed",
           "/api/embeddings": "embeddings"}
#: Native endpoints that generate nothing (model metadata): forwarded unpriced. Every
#: other native path (pull, push, create, delete, copy, blobs, web search...) is refused.
FREE = frozenset({"/api/tags", "/api/show", "/api/ps", "/api/version"})
#: The largest `num_predict` Ollama reads as the number it is (Go's int64).
_INT64_MAX = (1 << 63) - 1
#: A top-level `"done": true` may be in the line (a tool argument could say it too: the
#: line is then parsed to be sure).
_DONE = re.compile(r'"done"\s*:\s*true')


class Ollama(OpenAICompatible):
    """The route: `/v1/*` is the OpenAI-compatible API (inherited); `/api/*` is
    `OllamaNative`'s."""

    self_hosted = True  # the dataset's 0 prices are true for a local Ollama

    def __init__(self) -> None:
        # No key needed by a local Ollama (ollama.com's hosted API takes a Bearer key);
        # tokenfuse identifies the caller by one either way.
        super().__init__("ollama", "http://127.0.0.1:11434", "/v1",
                         Dialect(probe_path="/api/tags"), ("ollama", "ollama_chat"))
        self.native: Ollama = self

    def for_path(self, path: str) -> Ollama:
        return self.native if path.startswith(NATIVE_PREFIX) else self

    def price_ids(self, model: str) -> tuple[tuple[str | None, str], ...]:
        """`llama3.2:latest` is `llama3.2` (Ollama's default tag)."""
        ids: tuple[tuple[str | None, str], ...] = ((self.price_namespace, model),)
        if model.endswith(":latest"):
            ids += ((self.price_namespace, model.removesuffix(":latest")),)
        return ids

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        if self.native is not self and path.startswith(NATIVE_PREFIX):
            return self.native.parse_request(path, body)
        return super().parse_request(path, body)


class OllamaNative(Ollama):
    """`/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings` (and the free
    metadata endpoints) in Ollama's own shapes."""

    usage_marker = "done"  # every native line says whether it is the last one

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        if endpoint in FREE:
            name = body.get("model") or body.get("name")
            return Call(endpoint=endpoint, model=name if isinstance(name, str) else "",
                        stream=False, max_output_tokens=0, priced=False)
        kind = METERED.get(endpoint)
        if kind is None:
            raise unsupported(endpoint)
        model = model_of(body)
        if kind in ("embed", "embeddings"):
            return Call(endpoint=kind, model=model, stream=False, max_output_tokens=0,
                        prompt_parts=[_rest(body)], inputs=input_count(body.get("input")))
        options = body.get("options")
        if options is not None and not isinstance(options, dict):
            raise RequestRejected(400, "invalid_request", "'options' must be an object")
        tools = as_list(body.get("tools"))
        return Call(
            endpoint=kind, model=model,
            stream=body.get("stream") is not False,  # the native API streams by default
            max_output_tokens=_num_predict(options or {}),
            prompt_parts=[_rest(body, "messages")],
            messages=as_list(body.get("messages")) if kind == "chat" else [],
            framing_tokens=PER_TOOL_TOKENS * len(tools),
        )

    def with_output_cap(self, body: dict[str, Any], call: Call, cap: int) -> dict[str, Any]:
        if cap < 1:  # 0 is no cap at all to Ollama
            raise RequestRejected(402, "budget_exceeded",
                                  "the budget covers no output token for this request")
        options = body.get("options")
        return {**body, "options": {**(options if isinstance(options, dict) else {}),
                                    "num_predict": cap}}

    def usage(self, payload: dict[str, Any]) -> TokenUsage | None:
        """The last line (`done: true`) of a generation, or an `/api/embed` response."""
        if payload.get("done") is not True and "embeddings" not in payload:
            return None
        return TokenUsage(input=count_of(payload.get("prompt_eval_count")),
                          output=count_of(payload.get("eval_count")))

    def is_event_stream(self, first_chunk: bytes) -> bool:
        """NDJSON lines start with `{`. So does a single JSON document, and that is no
        mistake: Ollama's documents are compact one-line JSON (gin's `c.JSON`), which is a
        one-line NDJSON stream, metered exactly like one (its usage, its `done`). An error
        document comes with an error status and is not metered at all."""
        return first_chunk.lstrip()[:1] in (b"{", b"")

    def stream_decoder(self) -> FrameDecoder:
        return NdjsonDecoder()

    def stream_output(self, event: str, payload: dict[str, Any]) -> list[str]:
        """Generated text of one line: chat `message` content, thinking and tool calls;
        generate `response` and `thinking`."""
        return _generated(payload)

    def response_output(self, payload: dict[str, Any]) -> list[str]:
        return _generated(payload)

    def is_usage_only_chunk(self, payload: dict[str, Any]) -> bool:
        return False

    def is_final_event(self, event: str, data: str) -> bool:
        if _DONE.search(data) is None:
            return False
        try:
            payload = json.loads(data)
        except ValueError:
            return False
        return isinstance(payload, dict) and payload.get("done") is True

    def error_document(self, kind: ErrorKind, code: str, message: str) -> dict[str, Any]:
        """A string `error`: ollama-python shows it as the ResponseError's message."""
        return {"error": message}

    def stream_error_event(self, kind: ErrorKind, code: str, message: str,
                           details: dict[str, Any]) -> bytes:
        """The NDJSON line Ollama ends a failed stream with; ollama-python raises
        ResponseError(<message>) on it (_client.py: `if err := part.get('error')`)."""
        return self.error_body(kind, code, message, details) + b"\n"


def _num_predict(options: dict[str, Any]) -> int | None:
    """`options.num_predict` as the cap Ollama enforces (None: no cap)."""
    value = options.get("num_predict")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or abs(value) > _INT64_MAX:
        raise RequestRejected(400, "invalid_request",
                              "'options.num_predict' must be an integer")
    cap = int(value)  # Ollama truncates a float (api/types.go FromMap)
    return cap if cap > 0 else None


def _rest(body: dict[str, Any], *conversation: str) -> dict[str, Any]:
    """Everything the model may read besides the conversation (not its options)."""
    return {k: v for k, v in body.items()
            if k not in conversation and k not in ("options", "stream", "keep_alive")}


def _generated(payload: dict[str, Any]) -> list[str]:
    out = [v for v in (payload.get("response"), payload.get("thinking"))
           if isinstance(v, str) and v]
    message = payload.get("message")
    if isinstance(message, dict):
        out += [v for v in (message.get("content"), message.get("thinking"))
                if isinstance(v, str) and v]
        for call in as_list(message.get("tool_calls")):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                name, arguments = function.get("name"), function.get("arguments")
                if isinstance(name, str):
                    out.append(name)
                if arguments is not None:  # an object on the native API, not a string
                    out.append(arguments if isinstance(arguments, str)
                               else json.dumps(arguments, ensure_ascii=False))
    return out


def ollama() -> Ollama:
    """The registered provider, its native twin attached."""
    route = Ollama()
    route.native = OllamaNative()
    return route
