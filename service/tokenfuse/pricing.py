"""Model prices and cost arithmetic, integer nano-USD only.

Prices are stored as USD per 1M tokens (decimal strings) and held as integer
nano-USD per 1M tokens. A cost is rounded up once, over the whole request, so an
estimate computed from upper bounds of token counts is never below the settled cost.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenfuse.money import usd_to_nano

BUILTIN_PRICES = Path(__file__).with_name("data") / "prices.json"
TOKENS_PER_PRICE_UNIT = 1_000_000
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


@dataclass(frozen=True)
class ModelPrice:
    """Integer nano-USD per 1M tokens for each kind of token."""

    model: str
    input: int
    output: int
    cache_read: int
    cache_write: int
    max_output_tokens: int
    context_window: int = 0  # most input tokens one request can carry (0 = not known)
    reasoning: bool = False  # may bill hidden reasoning / thinking tokens as output


@dataclass(frozen=True)
class TokenUsage:
    """Tokens of one call. `input` excludes cache reads and cache writes."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    tool_fees_nano: int = 0  # per-use fees of server-side tools (web search, ...)


def cost_nano(price: ModelPrice, usage: TokenUsage) -> int:
    """Cost of `usage` at `price`, rounded up to a whole nano-USD."""
    total = (
        usage.input * price.input
        + usage.output * price.output
        + usage.cache_read * price.cache_read
        + usage.cache_write * price.cache_write
    )
    return -(-total // TOKENS_PER_PRICE_UNIT) + usage.tool_fees_nano


class PriceTable:
    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self._prices = prices

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The shipped table, with an operator's file (same format) layered on top."""
        prices = _read(BUILTIN_PRICES)
        if override is not None:
            prices.update(_read(override))
        return cls(prices)

    def lookup(self, model: str) -> ModelPrice | None:
        """Exact id or alias, else the id without a date/`-latest` suffix."""
        found = self._prices.get(model)
        if found is None:
            found = self._prices.get(_DATE_SUFFIX.sub("", model))
        return found

    def __len__(self) -> int:
        return len(self._prices)


def _read(path: Path) -> dict[str, ModelPrice]:
    data = json.loads(path.read_text())
    out: dict[str, ModelPrice] = {}
    for name, entry in data["models"].items():
        input_price = usd_to_nano(str(entry["input"]))
        price = ModelPrice(
            model=name,
            input=input_price,
            output=usd_to_nano(str(entry.get("output", "0"))),
            cache_read=usd_to_nano(str(entry.get("cache_read", entry["input"]))),
            cache_write=usd_to_nano(str(entry.get("cache_write", entry["input"]))),
            max_output_tokens=int(entry.get("max_output_tokens", 0)),
            context_window=int(entry.get("context_window", 0)),
            reasoning=entry.get("reasoning") is True,
        )
        out[name] = price
        for alias in entry.get("aliases", ()):
            out[alias] = price
    return out
