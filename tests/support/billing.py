"""Test-side view of what the fake provider billed, priced at list prices."""

from __future__ import annotations

from tests.support.fake_provider import FakeProvider, Usage
from tokenfuse.pricing import PriceTable, TokenUsage, cost_nano

PRICES = PriceTable.load()


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
    return cost_nano(price, tokens)


def key_of(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")


def requests_for(fake: FakeProvider, api_key: str) -> int:
    """How many requests carrying this key reached the provider."""
    return sum(1 for r in list(fake.records) if key_of(r.headers) == api_key)


def billed_for(fake: FakeProvider, api_key: str) -> int:
    """Nano-USD the provider billed for this key's completed calls."""
    return sum(
        usage_cost(r.usage)
        for r in list(fake.records)
        if r.usage is not None and r.completed and key_of(r.headers) == api_key
    )
