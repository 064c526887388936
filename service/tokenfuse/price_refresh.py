"""`tokenfuse prices refresh`: regenerate `data/prices.json` from LiteLLM's public price
dataset (`model_prices_and_context_window.json`, also shipped inside the `litellm` wheel
as `litellm/model_prices_and_context_window_backup.json`).

The dataset gives USD per token as JSON decimals (`2.5e-06`); they are read as
`decimal.Decimal` (never float) and converted exactly to integer nano-USD per 1M tokens.
A value that is not a whole number of nano-USD per 1M tokens is not rounded: the model is
left unpriced, with the reason in the table. Only the providers tokenfuse routes are kept
(each provider names its dataset providers: `Provider.price_dataset_providers`), and only
the modes tokenfuse prices. Every entry records its source (dataset, URL, version, date).
Entries the dataset does not price are kept from the previous table's `unpriced` section
(hand-written reasons: retired, not a text model, ...), and its `adjustments` (a dataset
field corrected for the bound, with the reason) are applied again.

A provider with a price namespace (every vendor but OpenAI and Anthropic) gets its entries
under `<namespace>/<the model id its API takes>`: the dataset's `<litellm provider>/<id>`
key with its prefix replaced, and the id put in the vendor's form where LiteLLM's differs
(`Provider.price_model_id`). (Fees, tiers and keys per vendor, hence its length.)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import urllib.request
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from tokenfuse.money import NANO_PER_USD, nano_to_usd
from tokenfuse.pricing import BUILTIN_PRICES, TOKENS_PER_PRICE_UNIT
from tokenfuse.providers import PROVIDERS

DATASET_NAME = "LiteLLM model_prices_and_context_window.json"
DATASET_URL = ("https://github.com/BerriAI/litellm/blob/main/"
               "model_prices_and_context_window.json")
WHEEL_MEMBER = "litellm/model_prices_and_context_window_backup.json"
#: Dataset modes whose endpoints tokenfuse prices (chat / completions / responses /
#: embeddings); images, audio, realtime, moderation, video are refused unpriced.
PRICED_MODES = ("chat", "completion", "responses", "embedding")
NANO_PER_MILLION_PER_USD_PER_TOKEN = Decimal(10**9 * TOKENS_PER_PRICE_UNIT)
_TIERED = re.compile(r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
                     r"|cache_creation_input_token_cost(?:_above_1hr)?)_above_(\d+)k_tokens$")
#: dataset field -> table field (USD per 1M tokens)
_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",
    "output_cost_per_reasoning_token": "reasoning_output",
}
_TIER_FIELDS = ("input", "output", "cache_read", "cache_write", "cache_write_1h")


class InexactPrice(ValueError):
    """A dataset price that is not a whole number of nano-USD per 1M tokens."""


class ZeroPrice(ValueError):
    """The dataset prices a paid provider's tokens at 0: a gap in the dataset (e.g.
    Cohere's command-a-plus-05-2026, chat at 0.0 / 0.0), not a free model."""


@dataclass(frozen=True)
class Source:
    dataset: str
    url: str
    version: str
    date: str

    def record(self) -> dict[str, str]:
        return {"dataset": self.dataset, "url": self.url, "version": self.version,
                "date": self.date}


def nano_per_million(value: Any) -> int:
    """USD per token (a Decimal or int from the dataset) as integer nano-USD per 1M tokens;
    InexactPrice unless exact."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise InexactPrice(f"not a decimal number: {value!r}")
    nano = Decimal(value) * NANO_PER_MILLION_PER_USD_PER_TOKEN
    if not nano.is_finite() or nano < 0 or nano != nano.to_integral_value():
        raise InexactPrice(f"{value} USD per token is not a whole number of nano-USD per "
                           f"1M tokens ({nano})")
    return int(nano)


def usd_per_million(nano: int) -> str:
    """Integer nano-USD per 1M tokens as the table's decimal USD-per-1M text."""
    return nano_to_usd(nano)


def load_dataset(source: str, version: str | None = None, date: str | None = None
                 ) -> tuple[dict[str, Any], Source]:
    """The dataset from a JSON file, a `litellm` wheel, or an http(s) URL, and where it
    came from (the wheel's version unless `version` is given; `date` defaults to today)."""
    if source.startswith(("https://", "http://")):
        with urllib.request.urlopen(source, timeout=60) as response:
            raw = response.read()
        url, found_version = source, None
    elif source.endswith(".whl"):
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(WHEEL_MEMBER)
            found_version = _wheel_version(wheel)
        url = f"https://pypi.org/project/litellm/{found_version}/#{WHEEL_MEMBER}"
    else:
        raw = Path(source).read_bytes()
        url, found_version = DATASET_URL, None
    digest = hashlib.sha256(raw).hexdigest()[:16]
    info = Source(
        dataset=DATASET_NAME, url=url,
        version=version or (f"litellm {found_version}" if found_version
                            else f"sha256:{digest}"),
        date=date or datetime.now(UTC).date().isoformat())
    data = json.load(io.BytesIO(raw), parse_float=Decimal)
    if not isinstance(data, dict):
        raise ValueError("the dataset is not a JSON object")
    return data, info


def _wheel_version(wheel: zipfile.ZipFile) -> str | None:
    for name in wheel.namelist():
        if name.endswith(".dist-info/METADATA"):
            for line in wheel.read(name).decode().splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    return None


def dataset_providers() -> dict[str, str]:
    """Dataset provider name -> tokenfuse provider, for every routed provider."""
    return {dataset: name for name, provider in PROVIDERS.items()
            for dataset in provider.price_dataset_providers}


def convert(data: dict[str, Any], source: Source,
            providers: dict[str, str] | None = None,
            previous_unpriced: dict[str, Any] | None = None,
            adjustments: dict[str, Any] | None = None) -> dict[str, Any]:
    """The price table document (what `pricing.PriceTable` loads) for the dataset.
    `adjustments` (hand-written, kept across refreshes) correct a dataset field for the
    bound, each with its reason: e.g. OpenAI embeddings take 8,191 tokens per input (the
    dataset's `max_input_tokens`) but 300,000 per request."""
    providers = dataset_providers() if providers is None else providers
    models: dict[str, Any] = {}
    unpriced: dict[str, Any] = {}
    chosen: dict[str, tuple[int, str]] = {}  # table key -> (rank, dataset key) kept
    for name, spec in sorted(data.items()):
        if not isinstance(spec, dict) or spec.get("litellm_provider") not in providers:
            continue
        if spec.get("mode") not in PRICED_MODES or spec.get("input_cost_per_token") is None:
            continue
        provider = providers[spec["litellm_provider"]]
        keyed = table_key(name, spec, provider)
        if keyed is None:
            continue
        key, rank = keyed
        if key in chosen and chosen[key] <= (rank, name):
            continue  # another dataset key names the same model more exactly
        chosen[key] = (rank, name)
        models.pop(key, None)
        unpriced.pop(key, None)
        try:
            models[key] = _entry(spec, provider, source)
        except (InexactPrice, ZeroPrice) as exc:
            unpriced[key] = {"provider": provider, "reason": f"not priced: {exc}",
                             "source": source.record()}
    # Bare ids first (OpenAI, Anthropic), then each namespace's keys: a stable, readable diff.
    models = dict(sorted(models.items(), key=lambda item: ("/" in item[0], item[0])))
    for name, fix in (adjustments or {}).items():
        if name in models:
            fields = {k: v for k, v in fix.items() if k != "why"}
            models[name].update(fields)
            models[name]["adjusted"] = {k: str(fix.get("why", "")) for k in fields}
    for name, note in (previous_unpriced or {}).items():
        if name not in models and name not in unpriced:
            unpriced[name] = note
    return {
        "unit": "USD per 1M tokens (web_search_per_call: USD per call)",
        "generated_by": "tokenfuse prices refresh",
        "source": source.record(),
        "models": models,
        "unpriced": dict(sorted(unpriced.items())),
        "adjustments": dict(sorted((adjustments or {}).items())),
    }


def table_key(name: str, spec: dict[str, Any], provider: str) -> tuple[str, int] | None:
    """The table key of a dataset entry and its rank (0: the dataset names the vendor's id
    exactly; 1: mapped or unprefixed, kept only where no rank-0 key names the model), or None
    for an entry that names no routed model."""
    routed = PROVIDERS.get(provider)
    namespace = routed.price_namespace if routed else None
    if routed is None or namespace is None:  # bare ids: no prefixed or fine-tune templates
        return None if "/" in name or name.startswith("ft:") else (name, 0)
    if "ft:" in name:
        return None
    first, _, rest = name.partition("/")
    prefixed = bool(rest) and first in routed.price_dataset_providers
    if not prefixed and rest:
        return None  # another provider's key form
    model = rest if prefixed else name
    vendor = routed.price_model_id(model, str(spec.get("mode")), prefixed)
    if not vendor:
        return None
    return f"{namespace}/{vendor}", 0 if prefixed and vendor == model else 1


def _entry(spec: dict[str, Any], provider: str, source: Source) -> dict[str, Any]:
    nano = {field: nano_per_million(spec[key]) for key, field in _FIELDS.items()
            if spec.get(key) is not None}
    billed = "input" if spec["mode"] == "embedding" else "output"
    if not nano.get(billed) and not PROVIDERS[provider].self_hosted:
        raise ZeroPrice(f"the dataset prices its {billed} at 0, a gap rather than a free "
                        "model (price it in TOKENFUSE_PRICES_FILE if it is free)")
    if "cache_write_1h" not in nano and "cache_write" in nano:
        multiplier = PROVIDERS[provider].cache_write_1h_input_multiple
        if multiplier:
            nano["cache_write_1h"] = nano["input"] * multiplier
    entry: dict[str, Any] = {"provider": provider, "mode": spec["mode"]}
    entry.update({field: usd_per_million(value) for field, value in nano.items()})
    search = _web_search(spec.get("search_context_cost_per_query"))
    if search is not None:
        entry["web_search_per_call"] = nano_to_usd(search)
    if spec.get("input_cost_per_request") is not None:  # a fee per request (Perplexity)
        entry["request_fee_per_call"] = nano_to_usd(_per_call(spec["input_cost_per_request"]))
    if spec.get("citation_cost_per_token") is not None:  # Perplexity's citation tokens
        entry["citation"] = usd_per_million(nano_per_million(spec["citation_cost_per_token"]))
    entry["max_output_tokens"] = int(spec.get("max_output_tokens") or 0)
    entry["context_window"] = int(spec.get("max_input_tokens") or 0)
    entry["reasoning"] = spec.get("supports_reasoning") is True
    if spec.get("deprecation_date"):
        entry["deprecation_date"] = str(spec["deprecation_date"])
    tiers = _tiers(spec, nano)
    if tiers:
        entry["tiers"] = tiers
    entry["source"] = source.record()
    return entry


def _web_search(cost: Any) -> int | None:
    """The largest per-query web-search price (any search context size), in nano-USD."""
    if not isinstance(cost, dict) or not cost:
        return None
    return max(_per_call(value, "web search price") for value in cost.values())


def _per_call(value: Any, what: str = "price per request") -> int:
    """USD per call as integer nano-USD; InexactPrice unless exact."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise InexactPrice(f"{what} {value!r} is not a decimal number")
    nano = Decimal(value) * NANO_PER_USD
    if nano < 0 or nano != nano.to_integral_value():
        raise InexactPrice(f"{what} {value} USD is finer than a nano-dollar")
    return int(nano)


def _tiers(spec: dict[str, Any], base: dict[str, int]) -> list[dict[str, Any]]:
    """Long-context tiers, lowest threshold first. A field the tier lacks is the base
    price scaled as the tier's input is (marked `derived`)."""
    found: dict[int, dict[str, int]] = {}
    for key, value in spec.items():
        match = _TIERED.match(key)
        if match and value is not None:
            found.setdefault(int(match.group(2)) * 1000, {})[_FIELDS[match.group(1)]] = \
                nano_per_million(value)
    out = []
    for threshold, tier in sorted(found.items()):
        if "input" not in tier:
            raise InexactPrice(f"a tier above {threshold} tokens without an input price")
        derived = []
        for field in _TIER_FIELDS:
            if field not in tier and field in base:
                scaled = -(-base[field] * tier["input"] // base["input"]) if base["input"] \
                    else base[field]
                tier[field] = scaled
                derived.append(field)
        row: dict[str, Any] = {"above_tokens": threshold}
        row.update({f: usd_per_million(tier[f]) for f in _TIER_FIELDS if f in tier})
        if derived:
            row["derived"] = derived
        out.append(row)
    return out


def refresh(source: str, output: Path = BUILTIN_PRICES, version: str | None = None,
            date: str | None = None) -> dict[str, Any]:
    """Regenerate the table at `output` from `source`; returns the new document."""
    data, info = load_dataset(source, version, date)
    previous: dict[str, Any] = json.loads(output.read_text()) if output.exists() else {}
    document = convert(data, info, previous_unpriced=previous.get("unpriced", {}),
                       adjustments=previous.get("adjustments", {}))
    output.write_text(json.dumps(document, indent=2) + "\n")
    return document


def summary(document: dict[str, Any]) -> str:
    """One line per provider: models priced, tiered, unpriced."""
    lines = []
    for provider in PROVIDERS:
        entries = [e for e in document["models"].values() if e["provider"] == provider]
        unpriced = [n for n, e in document["unpriced"].items()
                    if isinstance(e, dict) and e.get("provider") == provider]
        lines.append(f"{provider}: {len(entries)} models priced, "
                     f"{sum(1 for e in entries if e.get('tiers'))} with long-context tiers, "
                     f"{len(unpriced)} unpriced")
    return "\n".join(lines)
