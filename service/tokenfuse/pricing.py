"""Model prices and cost arithmetic, integer nano-USD only.

Prices are stored as USD per 1M tokens (decimal strings, `data/prices.json`, generated
from a public price dataset by `tokenfuse prices refresh`) and held as integer nano-USD
per 1M tokens. A cost is rounded up once, over the whole request, so an estimate computed
from upper bounds of token counts is never below the settled cost.

Long-context tiers: a model may price a call higher when its input (cache reads and writes
included) exceeds a threshold; the whole call is then priced at that tier
(`ModelPrice.at_input`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenfuse.money import usd_to_nano

BUILTIN_PRICES = Path(__file__).with_name("data") / "prices.json"
TOKENS_PER_PRICE_UNIT = 1_000_000
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


@dataclass(frozen=True)
class ModelPrice:
    """Integer nano-USD per 1M tokens for each kind of token (per call for web search)."""

    model: str
    input: int
    output: int
    cache_read: int
    cache_write: int  # cache writes with the default (5-minute) lifetime
    max_output_tokens: int
    context_window: int = 0  # most input tokens one request can carry (0 = not known)
    reasoning: bool = False  # may bill hidden reasoning / thinking tokens as output
    cache_write_1h: int | None = None  # 1-hour cache writes (None: as `cache_write`)
    reasoning_output: int | None = None  # reasoning reported apart (None: as `output`)
    web_search: int = 0  # nano-USD per web search (0: the provider's documented fee)
    #: Higher prices for calls whose input exceeds a threshold, lowest threshold first.
    tiers: tuple[Tier, ...] = ()

    @property
    def write_1h(self) -> int:
        return self.cache_write if self.cache_write_1h is None else self.cache_write_1h

    @property
    def reasoning_rate(self) -> int:
        return self.output if self.reasoning_output is None else self.reasoning_output

    def at_input(self, input_tokens: int) -> ModelPrice:
        """The flat price (no tiers) of a call with this much input in all (cache reads
        and writes included): the highest tier whose threshold it exceeds, else the base."""
        chosen = self
        for tier in self.tiers:
            if input_tokens > tier.above_tokens:
                chosen = tier.price
        return replace(chosen, tiers=()) if chosen.tiers else chosen


@dataclass(frozen=True)
class Tier:
    """The price of a call whose input exceeds `above_tokens`."""

    above_tokens: int
    price: ModelPrice


@dataclass(frozen=True)
class TokenUsage:
    """Tokens of one call. `input` excludes cache reads and cache writes; `output`
    includes reasoning where the provider counts it there (OpenAI, Anthropic)."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0  # 5-minute (default lifetime) cache writes
    tool_fees_nano: int = 0  # per-use fees of server-side tools priced by the provider
    cache_write_1h: int = 0  # 1-hour cache writes
    reasoning: int = 0  # reasoning reported apart from `output` (not included in it)
    web_searches: int = 0  # web-search uses, priced at the model's `web_search`
    web_search_nano: int = 0  # the provider's documented fee, for a price without one
    #: The provider's own bill of the call, when its usage reports one (OpenRouter's
    #: `cost`, Perplexity's `cost.total_cost`): the settled cost, whatever the table says.
    billed_nano: int | None = None

    @property
    def total_input(self) -> int:
        """Every input token the provider counts towards a long-context threshold."""
        return self.input + self.cache_read + self.cache_write + self.cache_write_1h


def cost_nano(price: ModelPrice, usage: TokenUsage) -> int:
    """Cost of `usage` at `price` (at the tier its input selects), rounded up to a whole
    nano-USD."""
    if usage.billed_nano is not None:
        return usage.billed_nano
    if price.tiers:
        price = price.at_input(usage.total_input)
    total = (
        usage.input * price.input
        + usage.output * price.output
        + usage.cache_read * price.cache_read
        + usage.cache_write * price.cache_write
        + usage.cache_write_1h * price.write_1h
        + usage.reasoning * price.reasoning_rate
    )
    search = usage.web_searches * (price.web_search or usage.web_search_nano)
    return -(-total // TOKENS_PER_PRICE_UNIT) + usage.tool_fees_nano + search


class PriceTable:
    def __init__(self, prices: dict[str, ModelPrice],
                 unpriced: dict[str, str] | None = None) -> None:
        self._prices = prices
        self._unpriced = unpriced or {}

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The shipped table, with an operator's file (same format) layered on top."""
        prices, unpriced = _read(BUILTIN_PRICES)
        if override is not None:
            more, more_unpriced = _read(override)
            prices.update(more)
            unpriced = {m: r for m, r in {**unpriced, **more_unpriced}.items()
                        if m not in more}
        return cls(prices, unpriced)

    def lookup(self, model: str, namespace: str | None = None) -> ModelPrice | None:
        """Exact id or alias, else the id without a date/`-latest` suffix. A provider
        with a `namespace` has its own ids, `<namespace>/<model>` (the same model id costs
        another price at another vendor); never a bare id."""
        if namespace:
            model = f"{namespace}/{model}"
        found = self._prices.get(model)
        if found is None and model not in self._unpriced:
            found = self._prices.get(_DATE_SUFFIX.sub("", model))
        if found is None and namespace:
            # An operator's price for every model of a self-hosted upstream.
            found = self._prices.get(f"{namespace}/*")
        return found

    def unpriced_reason(self, model: str, namespace: str | None = None) -> str | None:
        """Why the table deliberately has no price for this model (retired, not a text
        model, not in the dataset), or None."""
        return self._unpriced.get(f"{namespace}/{model}" if namespace else model)

    def models(self) -> list[str]:
        return sorted(self._prices)

    def __len__(self) -> int:
        return len(self._prices)


def _nano(entry: dict[str, Any], key: str, default: int) -> int:
    value = entry.get(key)
    return default if value is None else usd_to_nano(str(value))


def _price(name: str, entry: dict[str, Any], base: ModelPrice | None = None) -> ModelPrice:
    """One entry (or one tier of it: fields it lacks come from the tier's own input, or
    from the base entry)."""
    input_price = usd_to_nano(str(entry["input"]))
    write = _nano(entry, "cache_write", input_price)
    write_1h = entry.get("cache_write_1h")
    reasoning_output = entry.get("reasoning_output")
    return ModelPrice(
        model=name,
        input=input_price,
        output=_nano(entry, "output", base.output if base else 0),
        cache_read=_nano(entry, "cache_read", input_price),
        cache_write=write,
        max_output_tokens=base.max_output_tokens if base else
        int(entry.get("max_output_tokens", 0)),
        context_window=base.context_window if base else int(entry.get("context_window", 0)),
        reasoning=base.reasoning if base else entry.get("reasoning") is True,
        cache_write_1h=None if write_1h is None else usd_to_nano(str(write_1h)),
        reasoning_output=None if reasoning_output is None
        else usd_to_nano(str(reasoning_output)),
        web_search=_nano(entry, "web_search_per_call", base.web_search if base else 0),
    )


def _read(path: Path) -> tuple[dict[str, ModelPrice], dict[str, str]]:
    data = json.loads(path.read_text())
    out: dict[str, ModelPrice] = {}
    for name, entry in data.get("models", {}).items():
        price = _price(name, entry)
        tiers = tuple(Tier(int(t["above_tokens"]), _price(name, t, price))
                      for t in sorted(entry.get("tiers", ()),
                                      key=lambda t: int(t["above_tokens"])))
        if tiers:
            price = replace(price, tiers=tiers)
        out[name] = price
        for alias in entry.get("aliases", ()):
            out[alias] = price
    unpriced = {name: str(note.get("reason", "")) if isinstance(note, dict) else str(note)
                for name, note in data.get("unpriced", {}).items()}
    return out, unpriced
