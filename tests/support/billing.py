"""Test-side view of what the fake provider billed, priced at list prices."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tests.support.fake_provider import FakeProvider, RequestRecord, Usage, billed_key
from tokenfuse.pricing import ModelPrice, PriceTable

PRICES = PriceTable.load()
#: Anthropic web search: $10 per 1,000 searches (docs.anthropic.com/en/docs/agents-and-tools/
#: tool-use/web-search-tool#usage-and-pricing), on top of the tokens; the price table's
#: per-call price (from the dataset) where it has one.
WEB_SEARCH_NANO = 10_000_000


def _tier(price: ModelPrice, total_input: int) -> ModelPrice:
    """The provider's long-context rule, written out independently of tokenfuse's: when
    the call's input (cache reads and writes included: platform.claude.com/docs/en/
    build-with-claude/context-windows; OpenAI counts cached tokens in prompt_tokens)
    exceeds a tier's threshold, the whole call is billed at that tier."""
    chosen = price
    for tier in price.tiers:
        if total_input > tier.above_tokens:
            chosen = tier.price
    return chosen


def usage_cost(usage: Usage) -> int:
    """What the provider bills for this usage, to the nano-dollar (rounded up once)."""
    price = PRICES.lookup(usage.model)
    assert price is not None, usage.model
    searches = usage.web_search_requests * (price.web_search or WEB_SEARCH_NANO)
    if usage.provider == "openai":
        # prompt_tokens include the cached ones; reasoning is inside completion_tokens.
        rate = _tier(price, usage.input_tokens)
        micro = ((usage.input_tokens - usage.cached_input_tokens) * rate.input
                 + usage.cached_input_tokens * rate.cache_read
                 + usage.output_tokens * rate.output)
    else:
        # input_tokens exclude cache reads and both kinds of cache writes.
        total = (usage.input_tokens + usage.cached_input_tokens
                 + usage.cache_creation_input_tokens + usage.cache_creation_1h_input_tokens)
        rate = _tier(price, total)
        one_hour = rate.cache_write if rate.cache_write_1h is None else rate.cache_write_1h
        micro = (usage.input_tokens * rate.input
                 + usage.cached_input_tokens * rate.cache_read
                 + usage.cache_creation_input_tokens * rate.cache_write
                 + usage.cache_creation_1h_input_tokens * one_hour
                 + usage.output_tokens * rate.output)
    return -(-micro // 1_000_000) + searches


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


# ------------------------------------------------ what tokenfuse recorded (the CLI's view)

def day_window(stack: Any, key: str) -> dict[str, Any]:
    """`budget status --json`'s day window of a key (a `harness.Stack`)."""
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return doc["windows"]["day"]


def set_daily(stack: Any, key: str, nano: int) -> None:
    """A daily budget of `nano` nano-USD on a key."""
    done = stack.cli("budget", "set", "--key", key, "--daily",
                     f"{nano // 10**9}.{nano % 10**9:09d}")
    assert done.returncode == 0, done.stderr


def vertex_project(token: str) -> str:
    """A project of a test's own for a Vertex token (OAuth callers are charged as it)."""
    return "proj-" + token[-12:]


def vertex_caller(token: str) -> str:
    """Whom tokenfuse charges for an OAuth token on Vertex: its project."""
    return f"vertex-project:{vertex_project(token)}"
