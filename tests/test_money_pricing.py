"""Money parsing and price arithmetic: integer nano-USD, rounding only upward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfuse.money import nano_to_usd, usd_to_nano
from tokenfuse.pricing import BUILTIN_PRICES, ModelPrice, PriceTable, TokenUsage, cost_nano


def test_usd_parses_exactly() -> None:
    assert usd_to_nano("50.00") == 50_000_000_000
    assert usd_to_nano("0.01") == 10_000_000
    assert usd_to_nano("0.000000001") == 1
    assert usd_to_nano("7") == 7_000_000_000


@pytest.mark.parametrize("bad", ["-1", "abc", "0.0000000001", "NaN", "inf", ""])
def test_usd_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        usd_to_nano(bad)


@given(st.integers(min_value=0, max_value=2**53))
def test_usd_round_trip(nano: int) -> None:
    assert usd_to_nano(nano_to_usd(nano)) == nano


def test_builtin_table_is_integer_and_covers_both_providers() -> None:
    data = json.loads(BUILTIN_PRICES.read_text())
    providers = {entry["provider"] for entry in data["models"].values()}
    assert {"openai", "anthropic"} <= providers
    for name, entry in data["models"].items():
        for field in ("input", "output", "cache_read", "cache_write"):
            if field in entry:
                assert isinstance(entry[field], str), f"{name}.{field} must be a string"
    table = PriceTable.load()
    mini = table.lookup("gpt-4o-mini")
    assert mini is not None and (mini.input, mini.output, mini.cache_read) == (
        150_000_000, 600_000_000, 75_000_000)


def test_lookup_aliases_and_dated_ids() -> None:
    table = PriceTable.load()
    haiku = table.lookup("claude-haiku-4-5-20251001")  # its own entry in the dataset
    assert haiku is not None and haiku.model == "claude-haiku-4-5-20251001"
    sonnet = table.lookup("claude-sonnet-5-20991231")  # a dated id falls back to its family
    assert sonnet is not None and sonnet.model == "claude-sonnet-5"
    dated = table.lookup("gpt-4o-mini-2099-01-01")
    assert dated is not None and dated.model == "gpt-4o-mini"
    assert table.lookup("no-such-model") is None


def test_operator_override_file(tmp_path: Path) -> None:
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"models": {
        "gpt-4o-mini": {"provider": "openai", "input": "1", "output": "2"},
        "my-local-llm": {"provider": "openai", "input": "0.5", "output": "0.5"},
    }}))
    table = PriceTable.load(override)
    assert table.lookup("gpt-4o-mini").input == 1_000_000_000  # type: ignore[union-attr]
    assert table.lookup("my-local-llm") is not None


def test_cost_rounds_up_once() -> None:
    price = ModelPrice("m", input=150_000_000, output=600_000_000, cache_read=75_000_000,
                       cache_write=150_000_000, max_output_tokens=0)
    # 1 input token at $0.15/M = 150 nano exactly; 1 cache-read token = 75 nano.
    assert cost_nano(price, TokenUsage(input=1)) == 150
    assert cost_nano(price, TokenUsage(cache_read=1)) == 75
    odd = ModelPrice("m", input=37_500_000, output=0, cache_read=0, cache_write=0,
                     max_output_tokens=0)
    assert cost_nano(odd, TokenUsage(input=1)) == 38  # 37.5 nano rounds up
    assert cost_nano(odd, TokenUsage(input=2)) == 75


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
       st.integers(0, 10**6))
def test_cost_is_monotonic(a: int, b: int, c: int, d: int) -> None:
    price = PriceTable.load().lookup("claude-haiku-5-5")  # tiered above 100k input
    assert price is not None and price.tiers
    small = cost_nano(price, TokenUsage(a, b, c, d))
    assert cost_nano(price, TokenUsage(a + 1, b, c, d)) >= small
    assert cost_nano(price, TokenUsage(a, b + 1, c, d)) >= small
    assert isinstance(small, int)
