"""(g) For random request shapes, what tokenfuse reserves (with an unlimited budget) is at
least what the provider can bill for the request: the fake's bill with every answer run to
its cap (``WORST_CASE``), computed by the same function its HTTP handlers use."""

from __future__ import annotations

import base64
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.billing import PRICES, usage_cost
from tests.support.fake_provider import (
    WORST_CASE,
    ProviderError,
    bill_for,
    data_url,
    make_jpeg_header,
    make_pdf,
    make_png,
    model_spec,
)
from tokenfuse.config import load_settings

SETTINGS = load_settings()
OPENAI_MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "gpt-5", "gpt-5-mini",
                 "o3", "o4-mini", "gpt-5-chat-latest"]
ANTHROPIC_MODELS = ["claude-haiku-4-5", "claude-sonnet-4-6", "claude-opus-4-7",
                    "claude-haiku-5-5"]
#: Property names a naive estimator may skip as binary fields.
NAMES = st.sampled_from(["data", "url", "source", "type", "file_data", "image_url", "text",
                         "description", "name"]) | st.text(min_size=1, max_size=40)
TEXT = st.text(st.characters(codec="utf-8"), max_size=400)
LONG = st.integers(0, 3000).map(lambda n: "lorem ipsum dolor " * n)
STRING = TEXT | LONG

schemas = st.recursive(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "boolean"])},
                          optional={"description": STRING,
                                    "enum": st.lists(TEXT, max_size=4)}),
    lambda inner: st.fixed_dictionaries(
        {"type": st.just("object"),
         "properties": st.dictionaries(NAMES, inner, max_size=4)},
        optional={"description": STRING}),
    max_leaves=8)


@st.composite
def image_bytes(draw: st.DrawFn) -> tuple[bytes, str]:
    w, h = draw(st.integers(1, 4096)), draw(st.integers(1, 4096))
    if draw(st.booleans()):
        return make_png(w, h) if w * h <= 1 << 22 else make_jpeg_header(w, h), \
            "image/png" if w * h <= 1 << 22 else "image/jpeg"
    return make_jpeg_header(w, h), "image/jpeg"


@st.composite
def openai_part(draw: st.DrawFn, responses: bool) -> dict[str, Any]:
    kind = draw(st.sampled_from(["text", "text", "image", "remote", "file"]))
    if kind == "text":
        return {"type": "input_text" if responses else "text", "text": draw(STRING)}
    if kind in ("image", "remote"):
        url = "https://example.com/picture.png"
        if kind == "image":
            data, media = draw(image_bytes())
            url = data_url(data, media)
        detail = draw(st.sampled_from([None, "low", "high", "auto"]))
        if responses:
            part = {"type": "input_image", "image_url": url}
            return {**part, "detail": detail} if detail else part
        image = {"url": url, **({"detail": detail} if detail else {})}
        return {"type": "image_url", "image_url": image}
    pdf = data_url(make_pdf(draw(st.integers(1, 12))), "application/pdf")
    if responses:
        return {"type": "input_file", "filename": "a.pdf", "file_data": pdf}
    return {"type": "file", "file": {"filename": "a.pdf", "file_data": pdf}}


@st.composite
def anthropic_block(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["text", "text", "image", "document", "pdf", "tool_result"]))
    if kind == "text":
        return {"type": "text", "text": draw(STRING)}
    if kind == "image":
        data, media = draw(image_bytes())
        return {"type": "image", "source": {"type": "base64", "media_type": media,
                                            "data": base64.b64encode(data).decode()}}
    if kind == "document":
        return {"type": "document", "title": draw(TEXT),
                "source": {"type": "text", "media_type": "text/plain", "data": draw(STRING)}}
    if kind == "pdf":
        pdf = base64.b64encode(make_pdf(draw(st.integers(1, 12)))).decode()
        return {"type": "document", "source": {"type": "base64",
                                               "media_type": "application/pdf", "data": pdf}}
    return {"type": "tool_result", "tool_use_id": "toolu_1", "content": draw(STRING)}


def tools(provider: str, responses: bool = False) -> st.SearchStrategy[list[dict[str, Any]]]:
    def one(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        if provider == "anthropic":
            return {"name": name, "description": description, "input_schema": schema}
        if responses:
            return {"type": "function", "name": name, "description": description,
                    "parameters": schema}
        return {"type": "function", "function": {"name": name, "description": description,
                                                 "parameters": schema}}

    names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=30)
    return st.lists(st.builds(one, names, STRING, schemas), max_size=3)


def cap(model: str, provider: str) -> st.SearchStrategy[int | None]:
    top = model_spec(provider, model).max_output
    return st.none() | st.integers(0, top) | st.integers(0, 2000)


@st.composite
def chat_body(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    model = draw(st.sampled_from(OPENAI_MODELS))
    contents = st.one_of(STRING, st.lists(openai_part(False), min_size=1, max_size=3))
    messages = draw(st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant"]), "content": contents}),
        min_size=1, max_size=4))
    body: dict[str, Any] = {"model": model, "messages": messages}
    limit = draw(cap(model, "openai"))
    if limit is not None:
        reasoning = model_spec("openai", model).reasoning
        body["max_completion_tokens" if reasoning or draw(st.booleans()) else "max_tokens"] = \
            limit
    if draw(st.booleans()):
        body["tools"] = draw(tools("openai"))
    if draw(st.booleans()):
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "s", "schema": draw(schemas)}}
    if draw(st.booleans()):
        body["n"] = draw(st.integers(1, 3))
    body["stream"] = draw(st.booleans())
    return "openai", "/v1/chat/completions", body


@st.composite
def responses_body(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    model = draw(st.sampled_from(OPENAI_MODELS))
    items = st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "developer"]),
        "content": STRING | st.lists(openai_part(True), min_size=1, max_size=3)}),
        min_size=1, max_size=3)
    body: dict[str, Any] = {"model": model, "input": draw(STRING | items),
                            "stream": draw(st.booleans())}
    if draw(st.booleans()):
        body["instructions"] = draw(STRING)
    limit = draw(cap(model, "openai"))
    if limit is not None:
        body["max_output_tokens"] = limit
    if draw(st.booleans()):
        body["tools"] = draw(tools("openai", responses=True))
    if draw(st.booleans()):
        body["text"] = {"format": {"type": "json_schema", "name": "s", "schema": draw(schemas)}}
    if draw(st.booleans()):
        body["previous_response_id"] = "resp_stored"
    return "openai", "/v1/responses", body


@st.composite
def completions_body(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(["gpt-4o-mini", "gpt-4o"])),
                            "prompt": draw(STRING | st.lists(STRING, min_size=1, max_size=3)),
                            "stream": draw(st.booleans())}
    limit = draw(cap(body["model"], "openai"))
    if limit is not None:
        body["max_tokens"] = limit
    n = draw(st.integers(1, 3))
    body["n"] = n
    if draw(st.booleans()):
        body["best_of"] = draw(st.integers(n, 4))
    return "openai", "/v1/completions", body


@st.composite
def messages_body(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    model = draw(st.sampled_from(ANTHROPIC_MODELS))
    top = model_spec("anthropic", model).max_output
    limit = draw(st.integers(1, top) | st.integers(1, 3000))
    contents = STRING | st.lists(anthropic_block(), min_size=1, max_size=3)
    messages = draw(st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant"]), "content": contents}),
        min_size=1, max_size=3))
    body: dict[str, Any] = {"model": model, "max_tokens": limit, "messages": messages,
                            "stream": draw(st.booleans())}
    if draw(st.booleans()):
        body["system"] = draw(STRING)
    extra_tools = draw(tools("anthropic"))
    if draw(st.booleans()):
        search: dict[str, Any] = {"type": "web_search_20250305", "name": "web_search"}
        uses = draw(st.none() | st.integers(0, 6))
        if uses is not None:
            search["max_uses"] = uses
        extra_tools.append(search)
    if extra_tools:
        body["tools"] = extra_tools
    if limit > 1024 and draw(st.booleans()):
        body["thinking"] = {"type": "enabled",
                            "budget_tokens": draw(st.integers(1024, limit - 1))}
    return "anthropic", "/v1/messages", body


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(chat_body(), responses_body(), completions_body(), messages_body()),
       st.integers(0, 400_000))
def test_the_reservation_covers_the_providers_bill(request: tuple[str, str, dict[str, Any]],
                                                   stored_context: int) -> None:
    # The pure API of the reservation (tokenfuse.policy.reservation.upper_bound_nano).
    from tokenfuse.policy.reservation import upper_bound_nano
    from tokenfuse.providers import RequestRejected

    provider, path, body = request
    try:
        bill = bill_for(provider, path, body, WORST_CASE, {"resp_stored": stored_context})
    except ProviderError:
        return  # the provider refuses it: nothing is billed
    try:
        bound = upper_bound_nano(provider, path, body, PRICES, SETTINGS)
    except RequestRejected:
        return  # tokenfuse refuses it: nothing is forwarded
    if bound is None:
        return
    billed = usage_cost(bill.usage)
    assert bound >= billed, (bound, billed, bill)


def test_a_structured_output_schema_is_framed_like_a_tool() -> None:
    """Found by the property above: a Responses request whose whole input is an empty
    string and a `text.format` json_schema was bounded one token under the bill (the
    schema's framing was not counted)."""
    from tokenfuse.policy.reservation import upper_bound_nano

    body = {"model": "gpt-5", "input": "", "max_output_tokens": 16,
            "text": {"format": {"type": "json_schema", "name": "x",
                                "schema": {"type": "string"}}}}
    bill = bill_for("openai", "/v1/responses", body, WORST_CASE, {})
    bound = upper_bound_nano("openai", "/v1/responses", body, PRICES, SETTINGS)
    assert bound is not None and bound >= usage_cost(bill.usage)
