"""(c) The pre-call estimate must be an upper bound of what the provider bills.

Each attack goes against a nearly spent budget whose remainder is above what a naive
estimate of the call comes to and far below what the provider really bills for it. The
call must be refused, or billed within the limit (tokenfuse may rewrite the output cap down
to what the budget covers: the provider's record shows the cap it received).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import anthropic
import openai
import pytest

from tests.adversarial.helpers import (
    HAIKU,
    SONNET,
    anthropic_client,
    async_openai,
    big_schema,
    big_text,
    new_key,
    openai_client,
    prepare_budget,
    set_daily,
    word,
)
from tests.adversarial.invariant import assert_bound_held
from tests.support.billing import key_of
from tests.support.fake_provider import FakeProvider, RequestRecord, data_url, make_png
from tests.support.harness import Stack

LIMIT = 10_000_000  # $0.01
API_ERRORS = (openai.APIStatusError, anthropic.APIStatusError)


def attempt(call: Any) -> int:
    """Run one SDK call: 200, or the refusal's status (never a 5xx)."""
    try:
        result = call()
        if isinstance(result, openai.Stream | anthropic.Stream):
            for _ in result:  # read to its end
                pass
        return 200
    except (openai.APIError, anthropic.APIError) as exc:
        status = getattr(exc, "status_code", None)
        if status is None:  # a stream ended with tokenfuse's in-band error
            assert "budget" in str(exc) or "tokenfuse" in str(exc), exc
            return 200
        assert status < 500, exc
        return status


def sent(fake: FakeProvider, key: str) -> list[RequestRecord]:
    """The calls of this key the provider received, after the budget's warm-up call."""
    return [r for r in list(fake.records) if key_of(r) == key][1:]


def test_text_document(stack: Stack, fake: FakeProvider) -> None:
    key = new_key()
    prepare_budget(stack, key, LIMIT, 5_000_000)  # a 20k-token document costs $0.02
    document = {"type": "document", "title": "the attachment",
                "source": {"type": "text", "media_type": "text/plain",
                           "data": big_text(20_000)}}
    attempt(lambda: anthropic_client(stack, key).messages.create(
        model=HAIKU, max_tokens=50, messages=[{"role": "user", "content": [
            document, {"type": "text", "text": "summarise it"}]}]))
    assert_bound_held(stack, fake, key, LIMIT)


def tool_schema_call(stack: Stack, key: str, i: int) -> int:
    tools: Any = [{"type": "function", "function": {
        "name": f"lookup_{word(i)}", "description": "look it up",
        "parameters": big_schema(20_000, word(i))}}]
    return attempt(lambda: openai_client(stack, key).chat.completions.create(
        model="gpt-4o", max_tokens=20, tools=tools,
        messages=[{"role": "user", "content": f"use the tool {word(i)}"}]))


def test_tool_schema_under_binary_looking_keys(stack: Stack, fake: FakeProvider) -> None:
    key = new_key()
    prepare_budget(stack, key, LIMIT, 2_000_000)  # 20k schema tokens on gpt-4o: $0.05
    tool_schema_call(stack, key, 0)
    assert_bound_held(stack, fake, key, LIMIT)


def test_five_concurrent_tool_schema_calls(stack: Stack, fake: FakeProvider) -> None:
    key = new_key()
    prepare_budget(stack, key, LIMIT, 2_000_000)

    async def run() -> list[int]:
        return await asyncio.gather(*(asyncio.to_thread(tool_schema_call, stack, key, i)
                                      for i in range(5)))

    asyncio.run(run())
    assert_bound_held(stack, fake, key, LIMIT)


def test_responses_text_format_schema(stack: Stack, fake: FakeProvider) -> None:
    key = new_key()
    prepare_budget(stack, key, LIMIT, 2_000_000)
    text: Any = {"format": {"type": "json_schema", "name": "answer", "strict": False,
                            "schema": big_schema(20_000)}}
    attempt(lambda: openai_client(stack, key).responses.create(
        model="gpt-4o", input="answer in the format", max_output_tokens=20, text=text))
    assert_bound_held(stack, fake, key, LIMIT)


def test_previous_response_id_with_a_large_stored_context(stack: Stack,
                                                          fake: FakeProvider) -> None:
    # Someone with budget to spare stores a 100k-token context ($0.015 of input per use)...
    owner, owner_limit = new_key("owner"), 1_000_000_000
    set_daily(stack, owner, owner_limit)
    stored = openai_client(stack, owner).responses.create(
        model="gpt-4o-mini", input=big_text(100_000), max_output_tokens=5)
    assert stored.usage is not None and stored.usage.input_tokens > 100_000
    # ... and a nearly spent key continues from it.
    key = new_key()
    prepare_budget(stack, key, LIMIT, 1_000_000)
    attempt(lambda: openai_client(stack, key).responses.create(
        model="gpt-4o-mini", input="go on", previous_response_id=stored.id,
        max_output_tokens=5))
    assert_bound_held(stack, fake, key, LIMIT)
    assert_bound_held(stack, fake, owner, owner_limit)


def test_high_detail_image(stack: Stack, fake: FakeProvider) -> None:
    key = new_key()
    # 2048 x 2048 high detail on gpt-4o-mini: 2833 + 4 * 5667 tokens, $0.0038.
    prepare_budget(stack, key, LIMIT, 1_000_000)
    image: Any = {"type": "image_url", "image_url": {
        "url": data_url(make_png(2048, 2048), "image/png"), "detail": "high"}}
    attempt(lambda: openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is in it?"}, image]}]))
    assert_bound_held(stack, fake, key, LIMIT)


@pytest.mark.parametrize(("stream", "remainder"), [(False, 45_000_000), (True, 5_000_000)],
                         ids=["json", "stream"])
def test_no_output_cap_on_a_model_with_a_large_maximum(stack: Stack, fake: FakeProvider,
                                                       stream: bool, remainder: int) -> None:
    key, limit = new_key(), 50_000_000
    # gpt-4.1 may write 32,768 tokens ($0.26 at $8/M); the remainder covers ~5,600 (a
    # stream: ~600, written at 500 tokens/s, a provider's pace: what it generates between
    # a cut and noticing it is what the grace covers).
    prepare_budget(stack, key, limit, remainder)
    client = openai_client(stack, key)
    headers = {"x-fake-output-tokens": "max", "x-fake-chunk-delay-ms": "2" if stream else "0"}
    status = attempt(lambda: client.chat.completions.create(
        model="gpt-4.1", stream=stream, extra_headers=headers,
        messages=[{"role": "user", "content": f"write everything {word(int(stream))}"}]))
    for record in sent(fake, key):
        if not stream:  # not metered as it flows: the provider must have been given a cap
            assert record.cap is not None and record.cap < 32768, record.cap
    assert status in (200, 402)
    assert_bound_held(stack, fake, key, limit)


@pytest.mark.parametrize(("model", "stream", "cap"), [
    ("gpt-5", True, 4000), ("gpt-5", False, None), ("o3", True, None), ("o3", False, 20000)])
def test_reasoning_models(stack: Stack, fake: FakeProvider, model: str, stream: bool,
                          cap: int | None) -> None:
    key, limit = new_key(), 50_000_000
    prepare_budget(stack, key, limit, 20_000_000)
    extra: dict[str, Any] = {"max_completion_tokens": cap} if cap is not None else {}
    # The visible answer is short; the reasoning (3/4 of the cap) is billed, never shown.
    attempt(lambda: openai_client(stack, key).chat.completions.create(
        model=model, stream=stream, extra_headers={"x-fake-output-tokens": "20"},
        messages=[{"role": "user", "content": f"think hard {word(int(stream))}"}], **extra))
    assert_bound_held(stack, fake, key, limit)


def test_ten_concurrent_reasoning_streams(stack: Stack, fake: FakeProvider) -> None:
    key, limit = new_key(), 50_000_000  # $0.05; each stream may bill $0.04
    set_daily(stack, key, limit)

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        try:
            chunks = await client.chat.completions.create(
                model="gpt-5", max_completion_tokens=4000, stream=True,
                extra_headers={"x-fake-output-tokens": "20"},
                messages=[{"role": "user", "content": f"reason {word(i)}"}])
            async for _ in chunks:
                pass
            return "done"
        except openai.APIStatusError as exc:
            assert exc.status_code < 500
            return str(exc.status_code)
        except openai.APIError:
            return "cut"

    async def run() -> list[str]:
        client = async_openai(stack, key)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(10)))
        finally:
            await client.close()

    asyncio.run(run())
    assert_bound_held(stack, fake, key, limit)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_claude_thinking(stack: Stack, fake: FakeProvider, stream: bool) -> None:
    key = new_key()
    # 8,000 thinking tokens on claude-sonnet-4-6 ($15/M) bill $0.12; the stream shows a
    # summary of a few tokens.
    prepare_budget(stack, key, LIMIT, 5_000_000)
    client = anthropic_client(stack, key)
    thinking: Any = {"type": "enabled", "budget_tokens": 8000}
    messages: Any = [{"role": "user", "content": f"think it through {word(int(stream))}"}]
    if stream:
        def call() -> Any:
            with client.messages.stream(model=SONNET, max_tokens=10000, thinking=thinking,
                                        messages=messages,
                                        extra_headers={"x-fake-output-tokens": "20"}) as s:
                return s.get_final_message()
    else:
        def call() -> Any:
            return client.messages.create(model=SONNET, max_tokens=10000, thinking=thinking,
                                          messages=messages,
                                          extra_headers={"x-fake-output-tokens": "20"})
    attempt(call)
    assert_bound_held(stack, fake, key, LIMIT)


@pytest.mark.parametrize("max_uses", [5, None])
def test_web_search(stack: Stack, fake: FakeProvider, max_uses: int | None) -> None:
    key, limit = new_key(), 50_000_000
    # Each search: $0.01, plus its results as input (3,000 tokens here).
    prepare_budget(stack, key, limit, 20_000_000)
    tool: dict[str, Any] = {"type": "web_search_20250305", "name": "web_search"}
    if max_uses is not None:
        tool["max_uses"] = max_uses
    attempt(lambda: anthropic_client(stack, key).messages.create(
        model=HAIKU, max_tokens=100, tools=[tool],  # type: ignore[list-item]
        messages=[{"role": "user", "content": f"search the web {word(max_uses or 0)}"}]))
    assert_bound_held(stack, fake, key, limit)


def test_pdf_document(stack: Stack, fake: FakeProvider) -> None:
    from tests.support.fake_provider import make_pdf

    key = new_key()
    prepare_budget(stack, key, LIMIT, 5_000_000)  # 40 pages bill 184,000 tokens: $0.18
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                          "data": base64.b64encode(make_pdf(40)).decode()}}
    attempt(lambda: anthropic_client(stack, key).messages.create(
        model=HAIKU, max_tokens=20, messages=[{"role": "user", "content": [
            pdf, {"type": "text", "text": "read it"}]}]))
    assert_bound_held(stack, fake, key, LIMIT)


def test_a_schema_property_named_type_is_priced(stack: Stack, fake: FakeProvider) -> None:
    """An ordinary schema (a property called "type") is priced and served, not a 5xx."""
    key = new_key()
    set_daily(stack, key, LIMIT)
    tools: Any = [{"type": "function", "function": {"name": "classify", "parameters": {
        "type": "object", "properties": {"type": {"type": "string", "description": "kind"},
                                         "source": {"type": "object", "properties": {
                                             "type": {"type": "string"}}}}}}}]
    reply = openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, tools=tools,
        messages=[{"role": "user", "content": "classify this"}])
    assert reply.usage is not None
    assert_bound_held(stack, fake, key, LIMIT)
