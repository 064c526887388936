"""Test-side view of what the fake provider billed, priced at list prices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tests.support.fake_provider import FakeProvider, RequestRecord, Usage, billed_key
from tokenfuse.pricing import PriceTable, TokenUsage, cost_nano

PRICES = PriceTable.load()
#: Anthropic web search: $10 per 1,000 searches (docs.anthropic.com/en/docs/agents-and-tools/
#: tool-use/web-search-tool#usage-and-pricing), on top of the tokens.
WEB_SEARCH_NANO = 10_000_000


def usage_cost(usage: Usage) -> int:
    price = PRICES.lookup(usage.model)
    assert price is not None, usage.model
    if usage.provider == "openai":
        tokens = TokenUsage(input=usage.input_tokens - usage.cached_input_tokens,
                            output=usage.output_tokens, cache_read=usage.cached_input_tokens)
    else:
        tokens = TokenUsage(input=usage.input_tokens, output=usage.output_tokens,
                            cache_read=usage.cached_input_tokens,
                            cache_write=usage.cache_creation_input_tokens)
    return cost_nano(price, tokens) + usage.web_search_requests * WEB_SEARCH_NANO


def key_of(request: RequestRecord | Mapping[str, str], provider: str | None = None) -> str:
    """The key the provider bills for a request: a record (it knows its provider), or its
    headers (the provider given, or guessed: ``anthropic-version`` means Anthropic)."""
    if isinstance(request, RequestRecord):
        return request.api_key or billed_key(request.provider, request.headers)
    headers: Mapping[str, Any] = request
    if provider is None:
        provider = "anthropic" if "anthropic-version" in headers else "openai"
    return billed_key(provider, headers)


def requests_for(fake: FakeProvider, api_key: str) -> int:
    """How many requests carrying this key reached the provider."""
    return sum(1 for r in list(fake.records) if key_of(r) == api_key)


def billed_for(fake: FakeProvider, api_key: str) -> int:
    """Nano-USD the provider billed for this key's completed calls."""
    return sum(
        usage_cost(r.usage)
        for r in list(fake.records)
        if r.usage is not None and r.completed and key_of(r) == api_key
    )


def billed_total_for(fake: FakeProvider, api_key: str) -> int:
    """Nano-USD the provider billed for this key in all: completed calls and what aborted
    streams generated before they ended."""
    return sum(usage_cost(r.usage) for r in list(fake.records)
               if r.usage is not None and key_of(r) == api_key)
