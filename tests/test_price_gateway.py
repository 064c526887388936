"""Through envoy and the processor with the official SDKs: what tokenfuse records is the
provider's bill to the nano-dollar for 1-hour cache writes, web searches and long-context
calls (rates written out from the dataset's prices, litellm 1.110.2)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import billed_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack

ONE_HOUR: Any = {"type": "ephemeral", "ttl": "1h"}


def status(stack: Stack, key: str) -> dict[str, Any]:
    result = stack.cli("budget", "status", "--key", key, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def spent(stack: Stack, key: str) -> int:
    return status(stack, key)["windows"]["total"]["spent_nano_usd"]


def _settled(stack: Stack, api_key: str) -> None:
    for window in status(stack, api_key)["windows"].values():
        assert window["reserved_nano_usd"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_one_hour_cache_writes_are_billed_at_twice_input(
        stack: Stack, fake: FakeProvider, api_key: str, stream: bool) -> None:
    client = anthropic_client(stack, api_key)
    request: Any = {
        "model": "claude-opus-4-7", "max_tokens": 20,
        "system": [{"type": "text", "text": "Reference text. " * 1500, "cache_control": ONE_HOUR}],
        "messages": [{"role": "user", "content": "Summarise the reference."}],
        "extra_headers": {"x-fake-cache-creation": "300", "x-fake-cache-creation-1h": "2000",
                          "x-fake-output-tokens": "20"}}
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    usage = message.usage
    assert usage.cache_creation is not None
    assert (usage.cache_creation.ephemeral_5m_input_tokens,
            usage.cache_creation.ephemeral_1h_input_tokens) == (300, 2000)
    assert usage.cache_creation_input_tokens == 2300
    # claude-opus-4-7: input $5/M, output $25/M, 5-minute writes $6.25/M, 1-hour $10/M.
    expected = usage.input_tokens * 5_000 + 20 * 25_000 + 300 * 6_250 + 2000 * 10_000
    assert spent(stack, api_key) == billed_for(fake, api_key) == expected
    _settled(stack, api_key)


def test_one_hour_writes_need_the_request_to_ask_for_them(
        stack: Stack, fake: FakeProvider, api_key: str) -> None:
    message = anthropic_client(stack, api_key).messages.create(
        model="claude-opus-4-7", max_tokens=5,
        system=[{"type": "text", "text": "Reference. " * 300,
                 "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-cache-creation-1h": "2000"})
    assert message.usage.cache_creation is not None
    assert message.usage.cache_creation.ephemeral_1h_input_tokens == 0
    assert spent(stack, api_key) == billed_for(fake, api_key)


def test_web_search_fees_are_charged(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    message = anthropic_client(stack, api_key).messages.create(
        model="claude-sonnet-5", max_tokens=200,
        tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        messages=[{"role": "user", "content": "What happened today?"}],
        extra_headers={"x-fake-web-searches": "2", "x-fake-output-tokens": "30"})
    usage = message.usage
    assert usage.server_tool_use is not None and usage.server_tool_use.web_search_requests == 2
    # claude-sonnet-5: input $2/M, output $10/M; web search $0.01 per query (dataset).
    tokens = usage.input_tokens * 2_000 + usage.output_tokens * 10_000
    assert spent(stack, api_key) == billed_for(fake, api_key) == tokens + 2 * 10_000_000
    _settled(stack, api_key)


def test_long_context_tier_openai(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    reply = openai_client(stack, api_key).chat.completions.create(
        model="gpt-5.4", max_completion_tokens=50,
        messages=[{"role": "user", "content": " hello" * 290_000}],
        extra_headers={"x-fake-cached-tokens": "10000"})
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 272_000
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert cached == 10_000
    # gpt-5.4 above 272k input: $5/M input, $0.50/M cached, $22.50/M output, for the
    # whole call (base: $2.50 / $0.25 / $15).
    expected = ((usage.prompt_tokens - cached) * 5_000 + cached * 500
                + usage.completion_tokens * 22_500)
    assert spent(stack, api_key) == billed_for(fake, api_key) == expected
    _settled(stack, api_key)


def test_long_context_tier_counts_cached_input(stack: Stack, fake: FakeProvider,
                                               api_key: str) -> None:
    """claude-haiku-5-5's tier starts above 100k input tokens, cache reads and writes
    included: 60k read from the cache + ~60k new input is priced at the tier."""
    message = anthropic_client(stack, api_key).messages.create(
        model="claude-haiku-5-5", max_tokens=40,
        system=[{"type": "text", "text": " hello" * 120_000, "cache_control": ONE_HOUR}],
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-cache-read": "60000", "x-fake-cache-creation-1h": "1000",
                       "x-fake-output-tokens": "40"})
    usage = message.usage
    assert usage.input_tokens < 100_000
    total = (usage.input_tokens + (usage.cache_read_input_tokens or 0)
             + (usage.cache_creation_input_tokens or 0))
    assert total > 100_000
    # Tier: input $0.50/M, output $2.50/M, cache read $0.05/M, 1-hour write $1/M.
    expected = -(-(usage.input_tokens * 500_000 + 40 * 2_500_000 + 60_000 * 50_000
                   + 1000 * 1_000_000) // 1000)
    assert spent(stack, api_key) == billed_for(fake, api_key) == expected
    _settled(stack, api_key)


def test_an_unpriced_model_is_refused_with_the_reason(stack: Stack, fake: FakeProvider,
                                                      api_key: str) -> None:
    before = len(fake.records)
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client(stack, api_key).chat.completions.create(
            model="o1-preview", max_completion_tokens=5,
            messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "unknown_model"
    assert "retired: shut down 2025-07-28" in caught.value.message
    assert len(fake.records) == before  # never forwarded
