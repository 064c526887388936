"""The price table: generated exactly from LiteLLM's dataset, covering the models the
installed official SDKs list, and priced the way the providers bill (1-hour cache writes,
long-context tiers, web-search fees)."""

from __future__ import annotations

import json
import re
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic.types
import openai.types.shared
import pytest

from tokenfuse import cli, price_refresh
from tokenfuse.config import EstimateSettings, StreamSettings
from tokenfuse.policy import reservation
from tokenfuse.price_refresh import InexactPrice, Source, convert, nano_per_million
from tokenfuse.pricing import BUILTIN_PRICES, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import PROVIDERS

ROOT = Path(__file__).resolve().parents[1]
TABLE = PriceTable.load()
SOURCE = Source("test dataset", "https://example.invalid/prices.json", "v1", "2026-11-20")
ANTHROPIC = PROVIDERS["anthropic"]
OPENAI = PROVIDERS["openai"]


def _dataset(text: str) -> dict[str, Any]:
    return json.loads(text, parse_float=Decimal)


# ------------------------------------------------------------------ the converter


@pytest.mark.parametrize(("text", "nano"), [
    ("2.5e-06", 2_500_000_000), ("1.875e-06", 1_875_000_000), ("5e-09", 5_000_000),
    ("0.000168", 168_000_000_000), ("1.1e-06", 1_100_000_000), ("0", 0), ("3e-15", 3)])
def test_dataset_prices_convert_exactly(text: str, nano: int) -> None:
    value = json.loads(text, parse_float=Decimal)
    assert nano_per_million(value) == nano


@pytest.mark.parametrize("bad", [Decimal("1e-16"), Decimal("3.3333e-15"), Decimal("-1e-06"),
                                 2.5e-06, "2.5e-06", True])
def test_inexact_or_non_decimal_prices_are_refused(bad: Any) -> None:
    with pytest.raises(InexactPrice):
        nano_per_million(bad)


DATASET = """{
  "sample_spec": {"litellm_provider": "one of ...", "mode": "chat"},
  "claude-x": {"litellm_provider": "anthropic", "mode": "chat",
    "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
    "cache_read_input_token_cost": 3e-07, "cache_creation_input_token_cost": 3.75e-06,
    "cache_creation_input_token_cost_above_1hr": 6e-06,
    "input_cost_per_token_above_200k_tokens": 6e-06,
    "output_cost_per_token_above_200k_tokens": 2.25e-05,
    "input_cost_per_token_batches": 1.5e-06,
    "search_context_cost_per_query": {"search_context_size_low": 0.01,
                                      "search_context_size_high": 0.01},
    "max_input_tokens": 1000000, "max_output_tokens": 64000, "supports_reasoning": true},
  "claude-no-1h": {"litellm_provider": "anthropic", "mode": "chat",
    "input_cost_per_token": 1e-06, "output_cost_per_token": 5e-06,
    "cache_creation_input_token_cost": 1.25e-06},
  "claude-odd": {"litellm_provider": "anthropic", "mode": "chat",
    "input_cost_per_token": 3.33333e-16, "output_cost_per_token": 1e-06},
  "gpt-y": {"litellm_provider": "openai", "mode": "responses",
    "input_cost_per_token": 2.5e-06, "output_cost_per_token": 1.5e-05,
    "input_cost_per_token_above_272k_tokens": 5e-06,
    "output_cost_per_token_above_272k_tokens": 2.25e-05, "max_input_tokens": 1050000},
  "gpt-image-z": {"litellm_provider": "openai", "mode": "image_generation",
    "input_cost_per_token": 5e-06},
  "openai/gpt-y": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06},
  "ft:gpt-y": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-06},
  "replicate-q": {"litellm_provider": "replicate", "mode": "chat",
    "input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
  "bedrock/claude-x": {"litellm_provider": "bedrock", "mode": "chat",
    "input_cost_per_token": 3e-06}
}"""


def test_convert_keeps_routed_providers_and_priced_modes_only() -> None:
    doc = convert(_dataset(DATASET), SOURCE)
    # (bedrock/claude-x has no output price: a gap of the dataset, unpriced)
    assert sorted(doc["models"]) == ["claude-no-1h", "claude-x", "gpt-y"]
    assert {e["provider"] for e in doc["models"].values()} == {"anthropic", "openai"}
    # The filter comes from the provider registry: a new provider extends it. The names are
    # LiteLLM's `litellm_provider` values (litellm 1.110.2's dataset).
    assert price_refresh.dataset_providers() == {
        "openai": "openai", "anthropic": "anthropic", "azure": "azure", "azure_text": "azure",
        "mistral": "mistral", "groq": "groq", "deepseek": "deepseek", "xai": "xai",
        "openrouter": "openrouter", "together_ai": "together", "fireworks_ai": "fireworks",
        "fireworks_ai-embedding-models": "fireworks", "cerebras": "cerebras",
        "perplexity": "perplexity", "ollama": "ollama", "ollama_chat": "ollama",
        "bedrock": "bedrock", "bedrock_converse": "bedrock",
        "cohere_chat": "cohere", "cohere": "cohere",
        "gemini": "gemini", "vertex_ai-language-models": "vertex", "vertex_ai": "vertex",
        "vertex_ai-anthropic_models": "vertex"}
    wider = convert(_dataset(DATASET), SOURCE, providers={
        "openai": "openai", "anthropic": "anthropic", "replicate": "openai"})
    assert "replicate-q" in wider["models"]


VENDOR_DATASET = """{
  "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo": {"litellm_provider": "together_ai",
    "mode": "chat", "input_cost_per_token": 8.8e-07, "output_cost_per_token": 8.8e-07},
  "together-ai-4.1b-8b": {"litellm_provider": "together_ai", "mode": "chat",
    "input_cost_per_token": 2e-07, "output_cost_per_token": 2e-07},
  "fireworks_ai/accounts/fireworks/models/glm-5p1": {"litellm_provider": "fireworks_ai",
    "mode": "chat", "input_cost_per_token": 1.4e-06, "output_cost_per_token": 4.4e-06},
  "fireworks_ai/glm-5p1": {"litellm_provider": "fireworks_ai", "mode": "chat",
    "input_cost_per_token": 9e-07, "output_cost_per_token": 9e-07},
  "fireworks_ai/kimi-k3": {"litellm_provider": "fireworks_ai", "mode": "chat",
    "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05},
  "fireworks_ai/kimi-k3-fast": {"litellm_provider": "fireworks_ai", "mode": "chat",
    "input_cost_per_token": 6e-06, "output_cost_per_token": 3e-05},
  "fireworks_ai/nomic-ai/nomic-embed-text-v1.5": {
    "litellm_provider": "fireworks_ai-embedding-models", "mode": "embedding",
    "input_cost_per_token": 8e-09, "output_cost_per_token": 0.0},
  "deepseek-chat": {"litellm_provider": "deepseek", "mode": "chat",
    "input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
  "deepseek/deepseek-chat": {"litellm_provider": "deepseek", "mode": "chat",
    "input_cost_per_token": 2.8e-07, "output_cost_per_token": 4.2e-07},
  "deepseek-v9": {"litellm_provider": "deepseek", "mode": "chat",
    "input_cost_per_token": 5e-07, "output_cost_per_token": 1e-06},
  "azure/eu/gpt-4o": {"litellm_provider": "azure", "mode": "chat",
    "input_cost_per_token": 2.75e-06, "output_cost_per_token": 1.1e-05},
  "azure/gpt-35-turbo-instruct": {"litellm_provider": "azure_text", "mode": "completion",
    "input_cost_per_token": 1.5e-06, "output_cost_per_token": 2e-06},
  "azure_ai/grok-3": {"litellm_provider": "azure_ai", "mode": "chat",
    "input_cost_per_token": 3e-06},
  "perplexity/pplx-7b-online": {"litellm_provider": "perplexity", "mode": "chat",
    "input_cost_per_token": 0.0, "output_cost_per_token": 2.8e-07,
    "input_cost_per_request": 0.005},
  "perplexity/sonar-deep-research": {"litellm_provider": "perplexity", "mode": "chat",
    "input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06,
    "citation_cost_per_token": 2e-06, "output_cost_per_reasoning_token": 3e-06,
    "search_context_cost_per_query": {"search_context_size_low": 0.005}},
  "xai/grok-z": {"litellm_provider": "xai", "mode": "chat",
    "input_cost_per_token": 2e-06, "output_cost_per_token": 6e-06,
    "input_cost_per_token_above_200k_tokens": 4e-06,
    "output_cost_per_token_above_200k_tokens": 1.2e-05},
  "groq/whisper-large-v3": {"litellm_provider": "groq", "mode": "audio_transcription",
    "input_cost_per_second": 3e-05}
}"""


def test_vendor_entries_are_keyed_by_the_id_the_vendors_api_takes() -> None:
    doc = convert(_dataset(VENDOR_DATASET), SOURCE)
    models = doc["models"]
    assert sorted(models) == [
        "azure/eu/gpt-4o", "azure/gpt-35-turbo-instruct", "deepseek/deepseek-chat",
        "deepseek/deepseek-v9", "fireworks/accounts/fireworks/models/glm-5p1",
        "fireworks/accounts/fireworks/models/kimi-k3",
        "fireworks/accounts/fireworks/routers/kimi-k3-fast",
        "fireworks/nomic-ai/nomic-embed-text-v1.5", "perplexity/pplx-7b-online",
        "perplexity/sonar-deep-research", "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "xai/grok-z"]
    # The dataset's exact key wins over an unprefixed duplicate naming the same model.
    assert (models["fireworks/accounts/fireworks/models/glm-5p1"]["input"],
            models["deepseek/deepseek-chat"]["input"]) == ("1.40", "0.28")
    assert models["fireworks/nomic-ai/nomic-embed-text-v1.5"]["provider"] == "fireworks"
    assert models["azure/gpt-35-turbo-instruct"]["mode"] == "completion"
    # Per-request and citation fees are carried, exactly.
    assert models["perplexity/pplx-7b-online"]["request_fee_per_call"] == "0.005"
    research = models["perplexity/sonar-deep-research"]
    assert (research["citation"], research["reasoning_output"],
            research["web_search_per_call"]) == ("2.00", "3.00", "0.005")
    assert models["xai/grok-z"]["tiers"][0]["input"] == "4.00"
    assert all(entry["source"] == SOURCE.record() for entry in models.values())


def test_convert_records_source_tiers_1h_writes_and_web_search() -> None:
    doc = convert(_dataset(DATASET), SOURCE)
    x = doc["models"]["claude-x"]
    assert x["source"] == {"dataset": "test dataset", "url": "https://example.invalid/prices.json",
                           "version": "v1", "date": "2026-11-20"}
    assert doc["source"] == x["source"]
    assert (x["input"], x["output"], x["cache_read"], x["cache_write"], x["cache_write_1h"]) == (
        "3.00", "15.00", "0.30", "3.75", "6.00")
    assert x["web_search_per_call"] == "0.01"
    assert (x["context_window"], x["max_output_tokens"], x["reasoning"]) == (1000000, 64000, True)
    (tier,) = x["tiers"]
    # The tier's cache prices are not in the dataset: scaled as its input is, and marked.
    assert tier == {"above_tokens": 200000, "input": "6.00", "output": "22.50",
                    "cache_read": "0.60", "cache_write": "7.50", "cache_write_1h": "12.00",
                    "derived": ["cache_read", "cache_write", "cache_write_1h"]}
    # No 1-hour price in the dataset: Anthropic's documented 2x input.
    assert doc["models"]["claude-no-1h"]["cache_write_1h"] == "2.00"
    assert "cache_write_1h" not in doc["models"]["gpt-y"]


def test_a_value_that_does_not_convert_exactly_leaves_the_model_unpriced_with_why() -> None:
    doc = convert(_dataset(DATASET), SOURCE)
    assert "claude-odd" not in doc["models"]
    note = doc["unpriced"]["claude-odd"]
    assert note["provider"] == "anthropic" and note["source"] == SOURCE.record()
    assert "not a whole number of nano-USD per 1M tokens" in note["reason"]


def test_refresh_command_writes_a_loadable_table_and_keeps_hand_written_reasons(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "model_prices_and_context_window.json"
    source.write_text(DATASET)
    output = tmp_path / "prices.json"
    output.write_text(json.dumps({"models": {}, "unpriced": {
        "claude-retired": {"provider": "anthropic", "reason": "retired 2025-01-01"},
        "gpt-y": {"provider": "openai", "reason": "was not in the dataset"}},
        "adjustments": {"gpt-y": {"context_window": 2000000, "why": "per request, not input"}}}))
    code = cli.main(["prices", "refresh", "--source", str(source), "--output", str(output),
                     "--version", "abc1234", "--date", "2026-11-20"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "anthropic: 2 models priced, 1 with long-context tiers, 2 unpriced" in out
    assert "claude-odd" in err
    doc = json.loads(output.read_text())
    assert doc["source"]["version"] == "abc1234"
    assert doc["models"]["gpt-y"]["source"]["date"] == "2026-11-20"
    assert "gpt-y" not in doc["unpriced"]  # priced now
    assert doc["unpriced"]["claude-retired"]["reason"] == "retired 2025-01-01"
    # A hand-written correction is applied again, with its reason, and kept.
    assert doc["models"]["gpt-y"]["context_window"] == 2000000
    assert doc["models"]["gpt-y"]["adjusted"] == {"context_window": "per request, not input"}
    assert "gpt-y" in doc["adjustments"]
    table = PriceTable.load(output)
    assert table.lookup("claude-retired") is None
    assert table.unpriced_reason("claude-retired") == "retired 2025-01-01"
    x = table.lookup("claude-x")
    assert x is not None and (x.input, x.write_1h, x.web_search) == (
        3_000_000_000, 6_000_000_000, 10_000_000)
    assert [t.above_tokens for t in x.tiers] == [200_000]


def test_refresh_refuses_a_missing_source(tmp_path: Path) -> None:
    assert cli.main(["prices", "refresh", "--source", str(tmp_path / "none.json"),
                     "--output", str(tmp_path / "p.json")]) == 2


# ------------------------------------------------------------------ the shipped table


def test_every_shipped_entry_is_exact_and_names_its_source() -> None:
    doc = json.loads(BUILTIN_PRICES.read_text())
    assert doc["source"]["dataset"] == price_refresh.DATASET_NAME
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["source"]["date"])
    for name, entry in doc["models"].items():
        assert set(entry["source"]) == {"dataset", "url", "version", "date"}, name
        assert entry["source"]["version"] and entry["source"]["url"].startswith("https://")
        for key in ("input", "output", "cache_read", "cache_write", "cache_write_1h"):
            if key in entry:
                assert isinstance(entry[key], str), (name, key)
    for name, note in doc["unpriced"].items():
        assert note["reason"], name
        assert name not in doc["models"]
    for name, fix in doc["adjustments"].items():
        assert fix["why"] and doc["models"][name]["adjusted"], name
    # Embeddings: 8,191 tokens per input, 300,000 per request (what the bound needs).
    embedding = TABLE.lookup("text-embedding-3-small")
    assert embedding is not None and embedding.context_window == 300_000


def _literals(alias: Any) -> list[str]:
    out: list[str] = []
    if typing.get_origin(alias) is typing.Literal:
        return [a for a in typing.get_args(alias) if isinstance(a, str)]
    for arg in typing.get_args(alias):
        out.extend(_literals(arg))
    return out


def _sdk_models() -> list[tuple[str, str]]:
    shared = openai.types.shared
    openai_ids = {*_literals(shared.ChatModel), *_literals(shared.ResponsesModel),
                  *_literals(shared.AllModels)}
    anthropic_ids = set(_literals(anthropic.types.Model))
    return sorted({("openai", m) for m in openai_ids} | {("anthropic", m) for m in anthropic_ids})


SDK_MODELS = _sdk_models()


def test_the_installed_sdks_list_models() -> None:
    assert len([m for p, m in SDK_MODELS if p == "openai"]) > 50
    assert len([m for p, m in SDK_MODELS if p == "anthropic"]) > 10


@pytest.mark.parametrize(("provider", "model"), SDK_MODELS)
def test_every_sdk_model_has_a_price_or_a_reason(provider: str, model: str) -> None:
    price = TABLE.lookup(model)
    reason = TABLE.unpriced_reason(model)
    assert price is not None or reason, f"{provider} SDK lists {model}: no price, no reason"
    assert price is None or reason is None  # never both


def test_current_models_are_priced() -> None:
    for model in ("gpt-5.4", "gpt-5.5", "gpt-5.4-mini", "claude-opus-4-7", "claude-sonnet-5",
                  "claude-haiku-4-5"):
        assert TABLE.lookup(model) is not None, model


#: The dataset (litellm 1.110.2, 2026-11-20) has no `openrouter` entry: OpenRouter is priced
#: only by the operator's file (it reports the bill in its usage, which settles).
NOT_IN_DATASET = {"openrouter"}


def test_every_vendor_with_dataset_names_has_prices_under_its_namespace() -> None:
    doc = json.loads(BUILTIN_PRICES.read_text())
    counts = {name: 0 for name in PROVIDERS}
    for key, entry in doc["models"].items():
        provider = PROVIDERS[entry["provider"]]
        counts[provider.name] += 1
        if provider.price_namespace:
            assert key.startswith(provider.price_namespace + "/"), key
        else:
            assert "/" not in key, key  # a bare id is OpenAI's or Anthropic's
    for name, provider in PROVIDERS.items():
        if provider.price_dataset_providers and name not in NOT_IN_DATASET:
            assert counts[name] > 0, f"{name}: no prices"
    assert counts["openrouter"] == 0  # priced by a refresh? then drop it from NOT_IN_DATASET
    assert counts["fireworks"] > 200 and counts["azure"] > 200 and counts["xai"] > 30


# (provider, model as the client sends it, the dataset's key, its USD-per-token text:
# input, output, cache read) copied from litellm 1.110.2's dataset.
VENDOR_SAMPLES = [
    ("mistral", "mistral-large-latest", "mistral/mistral-large-latest",
     "5e-07", "1.5e-06", "5e-08"),
    ("groq", "openai/gpt-oss-120b", "groq/openai/gpt-oss-120b", "1.5e-07", "6e-07", "7.5e-08"),
    ("deepseek", "deepseek-v4-pro", "deepseek/deepseek-v4-pro", "1.32e-06", "3.96e-06",
     "4.4e-08"),
    ("xai", "grok-4.7", "xai/grok-4.7", "2e-06", "6e-06", "5e-07"),
    ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo",
     "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo", "1.04e-06", "1.04e-06", None),
    ("fireworks", "accounts/fireworks/models/llama-v3p1-8b-instruct",
     "fireworks_ai/accounts/fireworks/models/llama-v3p1-8b-instruct", "1e-07", "1e-07", None),
    ("fireworks", "accounts/fireworks/models/glm-5p1", "fireworks_ai/glm-5p1",
     "1.4e-06", "4.4e-06", "2.6e-07"),
    ("cerebras", "gpt-oss-120b", "cerebras/gpt-oss-120b", "3.5e-07", "7.5e-07", None),
    ("perplexity", "sonar-pro", "perplexity/sonar-pro", "3e-06", "1.5e-05", None),
    ("azure", "gpt-4o", "azure/gpt-4o", "2.5e-06", "1e-05", "1.25e-06"),
    ("azure", "eu/gpt-4o", "azure/eu/gpt-4o", "2.75e-06", "1.1e-05", "1.375e-06"),
    ("ollama", "llama3", "ollama/llama3", "0.0", "0.0", None),
]


@pytest.mark.parametrize(("provider", "model", "dataset_key", "input_usd", "output_usd",
                          "cache_read_usd"), VENDOR_SAMPLES)
def test_a_vendor_price_is_the_dataset_value_converted_exactly(
        provider: str, model: str, dataset_key: str, input_usd: str, output_usd: str,
        cache_read_usd: str | None) -> None:
    price = TABLE.lookup(model, PROVIDERS[provider].price_namespace)
    assert price is not None, (provider, model)
    expected = [nano_per_million(Decimal(v)) for v in (input_usd, output_usd)]
    assert [price.input, price.output] == expected
    # Without a cache price in the dataset, a cache read bills at the input price.
    assert price.cache_read == nano_per_million(Decimal(cache_read_usd or input_usd))


def test_sample_prices_in_nano_usd_per_million_tokens() -> None:
    groq = TABLE.lookup("openai/gpt-oss-120b", "groq")
    xai = TABLE.lookup("grok-4.7", "xai")
    sonar = TABLE.lookup("sonar-pro", "perplexity")
    assert groq is not None and (groq.input, groq.output, groq.cache_read) == (
        150_000_000, 600_000_000, 75_000_000)
    assert xai is not None and [(t.above_tokens, t.price.input) for t in xai.tiers] == [
        (200_000, 4_000_000_000)]
    assert sonar is not None and sonar.web_search == 14_000_000  # $0.014, high context


def test_namespaced_lookups_never_fall_back_to_bare_ids() -> None:
    assert TABLE.lookup("gpt-4o") is not None  # OpenAI's
    for provider in ("groq", "mistral", "together", "openrouter", "cerebras", "ollama"):
        assert TABLE.lookup("gpt-4o", provider) is None, provider
        assert TABLE.lookup("gpt-4o-2024-08-06", provider) is None, provider
    azure = TABLE.lookup("gpt-4o", "azure")
    assert azure is not None and azure.model == "azure/gpt-4o"
    # A vendor's id is not another vendor's: Groq's gpt-oss is not Fireworks' or Cerebras'.
    assert TABLE.lookup("openai/gpt-oss-120b", "fireworks") is None
    assert TABLE.lookup("openai/gpt-oss-120b", "openrouter") is None
    # Nor does a namespaced key answer a bare lookup.
    assert TABLE.lookup("deepseek-chat") is None and TABLE.lookup("grok-4.7") is None
    # Listed by the vendor's SDK but not priced: refused with the reason, not guessed.
    assert TABLE.lookup("llama-3.3-70b-versatile", "groq") is None
    assert "groq SDK" in (TABLE.unpriced_reason("llama-3.3-70b-versatile", "groq") or "")


def test_an_operator_wildcard_prices_every_model_of_a_self_hosted_upstream(
        tmp_path: Path) -> None:
    override = tmp_path / "prices.json"
    override.write_text(json.dumps({"models": {
        "vllm/*": {"input": "0", "output": "0"},
        "ollama/*": {"input": "0", "output": "0"},
        "groq/llama-3.3-70b-versatile": {"input": "0.59", "output": "0.79"}}}))
    table = PriceTable.load(override)
    vllm = table.lookup("meta-llama/Llama-3.1-8B-Instruct", "vllm")
    assert vllm is not None and (vllm.input, vllm.output) == (0, 0)
    assert cost_nano(vllm, TokenUsage(input=10_000, output=5_000)) == 0
    # The shipped exact price still wins over the wildcard; other models take the wildcard.
    exact = table.lookup("llama3", "ollama")
    assert exact is not None and exact.model == "ollama/llama3"
    assert table.lookup("qwen3:8b", "ollama") is not None
    # A wildcard is its namespace's only: no other vendor, no bare id.
    assert table.lookup("qwen3:8b", "groq") is None and table.lookup("qwen3:8b") is None
    groq = table.lookup("llama-3.3-70b-versatile", "groq")
    assert groq is not None and (groq.input, groq.output) == (590_000_000, 790_000_000)
    assert table.unpriced_reason("llama-3.3-70b-versatile", "groq") is None
    assert TABLE.lookup("anything", "vllm") is None  # no operator file: refused


def _quick_start_models() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r'model="([^"]+)"', quick)


def test_readme_quick_start_uses_current_models() -> None:
    models = _quick_start_models()
    assert len(models) >= 2
    deprecated_openai = (Path(openai.types.shared.__file__).parent / "chat_model.py").read_text()
    deprecated_openai = deprecated_openai.split('"""Deprecated values:', 1)[-1]
    from anthropic._data import DEPRECATED_MODELS  # what the SDK warns about

    for model in models:
        assert TABLE.lookup(model) is not None, model
        assert model not in DEPRECATED_MODELS, model
        assert f'"{model}"' not in deprecated_openai, model


# ------------------------------------------------------------------ billing details

ESTIMATE = EstimateSettings()
STREAMS = StreamSettings()


def test_one_hour_cache_writes_bill_at_twice_input() -> None:
    opus = TABLE.lookup("claude-opus-4-7")
    assert opus is not None
    assert (opus.input, opus.cache_write, opus.write_1h) == (
        5_000_000_000, 6_250_000_000, 10_000_000_000)
    usage = ANTHROPIC.usage({"usage": {
        "input_tokens": 10, "output_tokens": 0, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 1_000_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 0,
                           "ephemeral_1h_input_tokens": 1_000_000}}})
    assert usage is not None and (usage.cache_write, usage.cache_write_1h) == (0, 1_000_000)
    # $10 for a million 1-hour writes (was priced $6.25: 37.5 % under the bill).
    assert cost_nano(opus, usage) == 10 * 5_000 + 10_000_000_000


def test_stream_cache_writes_are_not_counted_twice() -> None:
    start = ANTHROPIC.usage({"type": "message_start", "message": {"usage": {
        "input_tokens": 50, "output_tokens": 1, "cache_creation_input_tokens": 700,
        "cache_creation": {"ephemeral_5m_input_tokens": 200,
                           "ephemeral_1h_input_tokens": 500}}}})
    delta = ANTHROPIC.usage({"type": "message_delta", "usage": {
        "input_tokens": 50, "output_tokens": 30, "cache_creation_input_tokens": 700}})
    assert start is not None and delta is not None
    merged = ANTHROPIC.merge_usage(ANTHROPIC.merge_usage(None, start), delta)
    assert (merged.cache_write, merged.cache_write_1h, merged.output) == (200, 500, 30)


def _messages_call(body: dict[str, Any]) -> Any:
    return ANTHROPIC.parse_request("/v1/messages", {
        "model": "claude-opus-4-7", "max_tokens": 10,
        "messages": [{"role": "user", "content": "x " * 2000}], **body})


def test_the_bound_prices_a_1h_cache_request_at_the_1h_rate() -> None:
    opus = TABLE.lookup("claude-opus-4-7")
    assert opus is not None
    short = _messages_call({"system": [{"type": "text", "text": "s",
                                        "cache_control": {"type": "ephemeral"}}]})
    long = _messages_call({"system": [{"type": "text", "text": "s",
                                       "cache_control": {"type": "ephemeral", "ttl": "1h"}}]})
    assert not short.long_cache_writes and long.long_cache_writes
    margin = ESTIMATE.input_margin_percent
    tokens = reservation.input_tokens(long, opus, margin, ANTHROPIC)
    assert reservation.input_cost(long, opus, margin, ANTHROPIC) == \
        -(-tokens * opus.write_1h // 1_000_000)
    tokens = reservation.input_tokens(short, opus, margin, ANTHROPIC)
    assert reservation.input_cost(short, opus, margin, ANTHROPIC) == \
        -(-tokens * opus.cache_write // 1_000_000)


def test_long_context_tier_prices_the_whole_call() -> None:
    gpt = TABLE.lookup("gpt-5.4")
    assert gpt is not None and [t.above_tokens for t in gpt.tiers] == [272_000]
    at_threshold = TokenUsage(input=272_000 - 1000, cache_read=1000, output=1000)
    above = TokenUsage(input=272_001 - 1000, cache_read=1000, output=1000)
    # $2.50 / $0.25 cached / $15 out, and above 272k input $5 / $0.50 / $22.50 for all.
    assert cost_nano(gpt, at_threshold) == 271_000 * 2_500 + 1000 * 250 + 1000 * 15_000
    assert cost_nano(gpt, above) == 271_001 * 5_000 + 1000 * 500 + 1000 * 22_500
    haiku = TABLE.lookup("claude-haiku-5-5")  # Anthropic counts cache reads and writes too
    assert haiku is not None and haiku.tiers[0].above_tokens == 100_000
    cached = TokenUsage(input=1, cache_read=60_000, cache_write=20_000, cache_write_1h=20_000)
    tier = haiku.tiers[0].price
    assert cost_nano(haiku, cached) == -(-(tier.input + 60_000 * tier.cache_read
                                           + 20_000 * tier.cache_write
                                           + 20_000 * tier.write_1h) // 1_000_000)


def test_a_bound_above_the_threshold_reserves_at_the_higher_tier() -> None:
    gpt = TABLE.lookup("gpt-5.4")
    assert gpt is not None
    call = OPENAI.parse_request("/v1/responses", {
        "model": "gpt-5.4", "input": "word " * 300_000, "max_output_tokens": 1000})
    call.hidden_output = True
    tokens = reservation.input_tokens(call, gpt, ESTIMATE.input_margin_percent, OPENAI)
    assert tokens > 272_000
    plan = reservation.plan(call, gpt, ESTIMATE, STREAMS, OPENAI)
    tier = gpt.tiers[0].price
    assert plan.price is not None and plan.price.input == tier.input == 5_000_000_000
    assert plan.desired_nano == -(-tokens * tier.input // 1_000_000) + 1000 * 22_500
    # The bound is never under the bill, whichever tier the provider's count selects.
    for actual in (272_000, 272_001, tokens):
        assert plan.desired_nano >= cost_nano(gpt, TokenUsage(input=actual, output=1000))
    small = OPENAI.parse_request("/v1/responses", {
        "model": "gpt-5.4", "input": "hi", "max_output_tokens": 1000})
    assert reservation.plan(small, gpt, ESTIMATE, STREAMS, OPENAI).price == gpt.at_input(0)


def test_web_search_fee_is_in_the_bound_and_the_bill() -> None:
    sonnet = TABLE.lookup("claude-sonnet-5")
    assert sonnet is not None and sonnet.web_search == 10_000_000  # dataset: $0.01 per query
    call = _messages_call({"model": "claude-sonnet-5", "tools": [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]})
    assert call.server_tool_uses == 3
    tokens = reservation.input_tokens(call, sonnet, ESTIMATE.input_margin_percent, ANTHROPIC)
    assert reservation.input_cost(call, sonnet, ESTIMATE.input_margin_percent, ANTHROPIC) == \
        -(-tokens * sonnet.cache_write // 1_000_000) + 3 * 10_000_000
    usage = ANTHROPIC.usage({"usage": {"input_tokens": 100, "output_tokens": 10,
                                       "server_tool_use": {"web_search_requests": 2}}})
    assert usage is not None
    assert cost_nano(sonnet, usage) == cost_nano(sonnet, TokenUsage(100, 10)) + 20_000_000


def test_reasoning_reported_apart_is_billed_once_at_its_rate() -> None:
    gpt = TABLE.lookup("gpt-5.4-mini")
    assert gpt is not None
    # OpenAI: reasoning is inside completion_tokens; the usage keeps it there.
    usage = OPENAI.usage({"usage": {"prompt_tokens": 10, "completion_tokens": 100,
                                    "completion_tokens_details": {"reasoning_tokens": 80}}})
    assert usage is not None and (usage.output, usage.reasoning) == (100, 0)
    # A provider that reports thoughts apart (Gemini, issue 14) sets `reasoning`.
    apart = TokenUsage(input=10, output=20, reasoning=80)
    assert cost_nano(gpt, apart) == cost_nano(gpt, TokenUsage(input=10, output=100))


def test_a_zero_price_of_a_paid_provider_is_a_gap_but_a_local_model_may_be_free() -> None:
    """The dataset prices some paid models at 0 (Cohere's command-a-plus-05-2026 chat at
    0.0/0.0, LiteLLM 1.110.2): unpriced, so the unknown-model policy refuses it; a local
    Ollama model at 0 is free for real."""
    data = {
        "gpt-free": {"litellm_provider": "openai", "mode": "chat",
                     "input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
        "text-embedding-free": {"litellm_provider": "openai", "mode": "embedding",
                                "input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
        "gpt-input-free": {"litellm_provider": "openai", "mode": "chat",
                           "input_cost_per_token": 0.0, "output_cost_per_token": 1e-06},
        "ollama/llama-local": {"litellm_provider": "ollama", "mode": "chat",
                               "input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
    }
    doc = convert(_dataset(json.dumps(data)), SOURCE)
    for gap in ("gpt-free", "text-embedding-free"):
        assert gap not in doc["models"]
        assert "a gap rather than a free model" in doc["unpriced"][gap]["reason"]
    assert doc["models"]["gpt-input-free"]["output"] == "1.00"
    assert doc["models"]["ollama/llama-local"]["output"] == "0.00"
