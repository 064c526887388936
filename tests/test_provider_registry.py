"""The provider registry: one routing rule for every vendor, operator-declared upstreams,
Azure deployments and identities, per-vendor price namespaces, reset headers and usage
quirks (pure), and through Envoy: an unconfigured provider is refused, never forwarded; a
declared upstream is routed, priced from the operator's file and settled exactly."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.support.billing import requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack
from tokenfuse.config import ConfigError, load_settings
from tokenfuse.money import reported_usd_to_nano
from tokenfuse.pricing import ModelPrice, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import BUILTIN, PROVIDERS, declare, provider_for_path

BASE_ENV = {"TOKENFUSE_SECRET": "s", "REDIS_URL": "redis://127.0.0.1:1/0"}


@pytest.fixture(autouse=True)
def _registry_restored() -> Iterator[None]:
    yield
    declare({}, {})


def test_every_builtin_is_routed_by_its_own_path() -> None:
    cases = {
        "/groq/openai/v1/chat/completions": ("groq", "/openai/v1/chat/completions"),
        "/mistral/v1/chat/completions": ("mistral", "/v1/chat/completions"),
        "/azure/openai/deployments/d/chat/completions?api-version=2024-10-21":
            ("azure", "/openai/deployments/d/chat/completions?api-version=2024-10-21"),
        "/openrouter/api/v1/chat/completions": ("openrouter", "/api/v1/chat/completions"),
        "/perplexity/chat/completions": ("perplexity", "/chat/completions"),
        "/fireworks/inference/v1/chat/completions":
            ("fireworks", "/inference/v1/chat/completions"),
        "/ollama/v1/chat/completions": ("ollama", "/v1/chat/completions"),
        "/openai/v1/chat/completions": ("openai", "/v1/chat/completions"),
    }
    for path, routed in cases.items():
        assert provider_for_path(path) == routed
    assert provider_for_path("/openairouter/v1/chat") is None
    assert provider_for_path("/vllm/v1/chat/completions") is None  # not declared
    names = {"azure", "mistral", "groq", "deepseek", "xai", "openrouter", "together",
             "fireworks", "cerebras", "perplexity", "ollama", "openai", "anthropic"}
    assert names <= BUILTIN.keys()


def test_declared_upstreams_are_routed_and_validated() -> None:
    settings = load_settings({**BASE_ENV, "TOKENFUSE_OPENAI_COMPATIBLE":
                              "vllm=http://10.0.0.5:8000, Lab=https://llm.internal/base"})
    assert settings.envoy.upstreams["vllm"] == "http://10.0.0.5:8000"
    assert settings.envoy.upstreams["lab"] == "https://llm.internal/base"
    assert provider_for_path("/lab/v1/chat/completions") == ("lab", "/v1/chat/completions")
    assert PROVIDERS["vllm"].price_namespace == "vllm"
    for bad in ("openai=http://x", "direct=http://x", "vllm", "a b=http://x",
                "vllm=ftp://x", "vllm=http://a,vllm=http://b"):
        with pytest.raises(ConfigError):
            load_settings({**BASE_ENV, "TOKENFUSE_OPENAI_COMPATIBLE": bad})
    load_settings(BASE_ENV)
    assert "vllm" not in PROVIDERS  # a new reading replaces the declaration


def test_azure_is_unconfigured_until_its_upstream_is_set() -> None:
    assert load_settings(BASE_ENV).envoy.upstreams["azure"] == ""
    given = load_settings({**BASE_ENV, "TOKENFUSE_UPSTREAM_AZURE": "https://r.openai.azure.com"})
    assert given.envoy.upstreams["azure"] == "https://r.openai.azure.com"
    assert given.envoy.upstreams["groq"] == "https://api.groq.com"
    off = load_settings({**BASE_ENV, "TOKENFUSE_UPSTREAM_GROQ": ""})  # turned off
    assert off.envoy.upstreams["groq"] == ""


def test_azure_deployments_name_the_model() -> None:
    load_settings({**BASE_ENV, "TOKENFUSE_AZURE_DEPLOYMENTS": "Prod-4o=gpt-4o,mini=gpt-4o-mini"})
    azure = PROVIDERS["azure"]
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    call = azure.parse_request(
        "/openai/deployments/Prod-4o/chat/completions?api-version=2024-10-21", body)
    assert (call.model, call.endpoint) == ("gpt-4o", "chat.completions")
    assert call.hide_usage_chunk and call.new_body is not None
    assert "model" not in call.new_body  # tokenfuse adds include_usage, not a model
    old = azure.parse_request(
        "/openai/deployments/Prod-4o/chat/completions?api-version=2024-06-01", body)
    assert not old.hide_usage_chunk and old.new_body is None  # 400 on that api-version
    assert azure.parse_request("/openai/v1/chat/completions",
                               {"model": "mini", "messages": []}).model == "gpt-4o-mini"
    unmapped = azure.parse_request("/openai/deployments/other/embeddings?api-version=x",
                                   {"input": "a"})
    assert unmapped.model == "deployment:other"  # the unknown-model policy decides
    assert PriceTable.load().lookup(unmapped.model, azure.price_namespace) is None


def _jwt(claims: dict[str, str]) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{payload}.signature"


def test_azure_identity_is_the_key_or_the_entra_principal() -> None:
    azure = PROVIDERS["azure"]
    assert azure.caller_key({"api-key": "k1"}) == "k1"
    one = _jwt({"tid": "tenant", "oid": "object", "exp": "1"})
    renewed = _jwt({"tid": "tenant", "oid": "object", "exp": "2"})
    # A token renewed every hour is the same principal: the same budget.
    assert azure.caller_key({"authorization": f"Bearer {one}"}) == "entra:tenant/object"
    assert azure.caller_key({"authorization": f"Bearer {renewed}"}) == "entra:tenant/object"
    assert azure.caller_key({"authorization": "Bearer opaque"}) == "opaque"
    assert azure.pooled_credential("s") == (("api-key", "s"), ("authorization",))


def test_cap_fields_are_the_ones_each_vendor_honours() -> None:
    ollama, mistral, groq = PROVIDERS["ollama"], PROVIDERS["mistral"], PROVIDERS["groq"]
    body = {"model": "m", "messages": [], "max_completion_tokens": 10}
    # Ollama ignores max_completion_tokens: it bounds nothing, the clamp writes max_tokens.
    call = ollama.parse_request("/v1/chat/completions", body)
    assert call.max_output_tokens is None
    assert ollama.with_output_cap(body, call, 64)["max_tokens"] == 64
    assert groq.parse_request("/openai/v1/chat/completions", body).max_output_tokens == 10
    capped = mistral.with_output_cap({"model": "m"}, mistral.parse_request(
        "/v1/chat/completions", {"model": "m", "messages": []}), 32)
    assert capped == {"model": "m", "max_tokens": 32}  # Mistral refuses the other name


def test_stream_usage_is_asked_only_where_the_vendor_accepts_it() -> None:
    body = {"model": "m", "messages": [], "stream": True}
    asked = {name for name in ("mistral", "groq", "deepseek", "xai", "openrouter", "together",
                               "fireworks", "cerebras", "perplexity", "ollama")
             if PROVIDERS[name].parse_request("/v1/chat/completions", body).hide_usage_chunk}
    assert asked == {"deepseek", "fireworks", "ollama"}
    groq = PROVIDERS["groq"]
    assert groq.parse_request("/openai/v1/chat/completions", body).new_body is None
    last = {"choices": [{"delta": {}, "finish_reason": "stop"}],
            "x_groq": {"id": "x", "usage": {"prompt_tokens": 7, "completion_tokens": 3}}}
    assert groq.usage(last) == TokenUsage(input=7, output=3, web_search_nano=25_000_000)


def test_reset_headers_per_vendor() -> None:
    groq, cerebras, mistral = PROVIDERS["groq"], PROVIDERS["cerebras"], PROVIDERS["mistral"]
    assert groq.retry_after_ms({"retry-after": "2"}) == 2000
    assert groq.retry_after_ms({"x-ratelimit-remaining-tokens": "0",
                                "x-ratelimit-reset-tokens": "7.66s",
                                "x-ratelimit-remaining-requests": "14",
                                "x-ratelimit-reset-requests": "2m59.56s"}) == 7660
    assert groq.retry_after_ms({"x-ratelimit-remaining-requests": "0",
                                "x-ratelimit-reset-requests": "2m59.56s"}) == 179560
    assert cerebras.retry_after_ms({"x-ratelimit-remaining-tokens-minute": "0",
                                    "x-ratelimit-reset-tokens-minute": "11.38286"}) == 11383
    assert mistral.retry_after_ms({"retry-after-ms": "250"}) == 250
    assert mistral.retry_after_ms({}) == -1


def test_vendor_usage_quirks() -> None:
    deepseek = PROVIDERS["deepseek"].usage({"usage": {
        "prompt_tokens": 100, "completion_tokens": 9, "prompt_cache_hit_tokens": 40,
        "prompt_cache_miss_tokens": 60}})
    assert deepseek is not None and (deepseek.input, deepseek.cache_read) == (60, 40)
    # xAI: reasoning is apart from completion_tokens; cost_in_usd_ticks is the bill.
    xai = PROVIDERS["xai"].usage({"usage": {
        "prompt_tokens": 10120, "completion_tokens": 1499, "total_tokens": 14428,
        "completion_tokens_details": {"reasoning_tokens": 2809},
        "cost_in_usd_ticks": 232856001}})
    assert xai is not None and (xai.output, xai.reasoning) == (1499, 2809)
    assert xai.billed_nano == 23285601  # 10 ticks per nano-USD, rounded up
    router = PROVIDERS["openrouter"].usage({"usage": {
        "prompt_tokens": 5, "completion_tokens": 2, "cost": Decimal("0.0000141")}})
    assert router is not None and router.billed_nano == 14100
    plex = PROVIDERS["perplexity"].usage({"usage": {
        "prompt_tokens": 480, "completion_tokens": 2823, "cost": {
            "input_tokens_cost": Decimal("0.00144"), "request_cost": Decimal("0.008"),
            "total_cost": Decimal("0.05178")}}})
    assert plex is not None and plex.billed_nano == 51_780_000
    price = ModelPrice("m", input=1, output=1, cache_read=1, cache_write=1,
                       max_output_tokens=0)
    assert cost_nano(price, plex) == 51_780_000  # the reported bill, not the table's


def test_reported_amounts_are_exact_and_rounded_up() -> None:
    assert reported_usd_to_nano(Decimal("0.05178")) == 51_780_000
    assert reported_usd_to_nano(Decimal("1E-10")) == 1
    assert reported_usd_to_nano(0) == 0
    for bad in (Decimal("-1"), Decimal("NaN"), "x"):
        with pytest.raises(ValueError):
            reported_usd_to_nano(bad)


def test_prices_are_per_vendor_and_never_fall_back_to_bare_ids(tmp_path: Path) -> None:
    file = tmp_path / "prices.json"
    file.write_text(json.dumps({"models": {
        "vllm/*": {"input": "0.10", "output": "0.20"},
        "vllm/llama-3-70b": {"input": "1", "output": "2"}}}))
    table = PriceTable.load(file)
    assert table.lookup("gpt-4o") is not None
    assert table.lookup("gpt-4o", "groq") is None
    wild = table.lookup("anything", "vllm")
    assert wild is not None and wild.input == 100_000_000
    exact = table.lookup("llama-3-70b", "vllm")
    assert exact is not None and exact.output == 2_000_000_000


# ---------------------------------------------------------------- through Envoy
SELF_HOSTED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def declared_stack(fake: FakeProvider, tmp_path_factory) -> Iterator[Stack]:
    prices = tmp_path_factory.mktemp("prices") / "prices.json"
    # An internal rate for every model of the self-hosted upstream.
    prices.write_text(json.dumps({"models": {"vllm/*": {"input": "0.5", "output": "1.5"}}}))
    s = Stack(fake.base_url, {"TOKENFUSE_OPENAI_COMPATIBLE": f"vllm={fake.base_url}",
                              "TOKENFUSE_UPSTREAM_AZURE": "",
                              "TOKENFUSE_PRICES_FILE": str(prices)}).start()
    yield s
    s.cleanup()


def test_unconfigured_provider_is_refused_not_forwarded(declared_stack: Stack,
                                                        fake: FakeProvider) -> None:
    key = f"az-{uuid.uuid4().hex}"
    client = openai.AzureOpenAI(azure_endpoint=f"{declared_stack.envoy.base_url}/azure",
                                api_key=key, api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="prod-4o",
                                       messages=[{"role": "user", "content": "hi"}])
    assert "TOKENFUSE_UPSTREAM_AZURE" in str(raised.value)
    assert raised.value.code == "provider_not_configured"
    assert requests_for(fake, key) == 0


def test_declared_upstream_is_priced_from_the_operator_file(declared_stack: Stack,
                                                            fake: FakeProvider) -> None:
    key = f"sk-vllm-{uuid.uuid4().hex}"
    client = openai.OpenAI(base_url=f"{declared_stack.envoy.base_url}/vllm/v1", api_key=key,
                           max_retries=0)
    answer = client.chat.completions.create(
        model=SELF_HOSTED_MODEL, messages=[{"role": "user", "content": "hello"}],
        max_tokens=20, extra_headers={"x-fake-output-tokens": "12"})
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    expected = -(-(answer.usage.prompt_tokens * 500_000_000 + 12 * 1_500_000_000)
                 // 1_000_000)
    status = declared_stack.cli("budget", "status", "--key", key, "--json")
    assert status.returncode == 0, status.stderr
    windows = json.loads(status.stdout)["windows"]
    # Settled before the answer reached the client: the provider's tokens at the rate.
    assert {w["spent_nano_usd"] for w in windows.values()} == {expected}
    assert {w["reserved_nano_usd"] for w in windows.values()} == {0}
    assert requests_for(fake, key) == 1


def test_openrouter_is_bounded_by_the_originating_vendors_price() -> None:
    """No OpenRouter prices in the dataset: its resold first-party models reserve at the
    originating vendor's list price (OpenRouter's `usage.cost` then settles the call)."""
    from tokenfuse.config import EstimateSettings
    from tokenfuse.policy.reservation import price_for

    table, router = PriceTable.load(), PROVIDERS["openrouter"]
    settings = EstimateSettings()
    assert price_for(table, "openai/gpt-4o", settings, router) == table.lookup("gpt-4o")
    claude = price_for(table, "anthropic/claude-haiku-4.5", settings, router)
    assert claude is not None and claude == table.lookup("claude-haiku-4-5")
    assert price_for(table, "openai/gpt-4o:nitro", settings, router) == table.lookup("gpt-4o")
    assert price_for(table, "meta-llama/llama-3.3-70b-instruct", settings, router) is None
    assert price_for(table, "gpt-4o", settings, router) is None  # no bare fallback


def _raw_post(stack: Stack, path: str, body: dict, headers: dict[str, str]) -> tuple[int, str]:
    """POST with the path exactly as given (HTTP clients resolve dot segments first)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", stack.envoy.port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(body),
                           {"content-type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_the_path_priced_is_the_path_forwarded(stack: Stack, fake: FakeProvider) -> None:
    """A deployment hidden behind dot segments is priced as the one the provider runs:
    Envoy resolves the path before the processor reads it."""
    key = f"az-{uuid.uuid4().hex}"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    status, text = _raw_post(
        stack, "/azure/openai/deployments/cheap/../prod-4o/chat/completions"
               "?api-version=2024-10-21", body, {"api-key": key})
    assert status == 400 and "deployment:prod-4o" in text  # unmapped here: refused as such
    status, _ = _raw_post(stack, "/openai/v1/chat%2Fcompletions",
                          {"model": "gpt-4o-mini", **body}, {"authorization": f"Bearer {key}"})
    assert status == 400
    assert requests_for(fake, key) == 0


def test_ambiguous_paths_are_refused_by_the_processor_too() -> None:
    from tokenfuse.extproc.request import _ambiguous_path

    for path in ("/azure/openai/deployments/a/../b/chat/completions", "/openai/./v1/x",
                 "/openai//v1/x", "/azure/openai/deployments/a%2F..%2Fb/chat", "/x/%2e%2e/y"):
        assert _ambiguous_path(path), path
    assert not _ambiguous_path("/openai/v1/chat/completions?a=../b")
    assert not _ambiguous_path("/fireworks/inference/v1/chat/completions")


def test_perplexity_bounds_its_fees() -> None:
    plex = PROVIDERS["perplexity"]
    sonar = plex.parse_request("/chat/completions", {"model": "sonar-pro", "messages": []})
    assert sonar.request_fee_nano == 14_000_000  # $14 per 1,000 requests at most
    deep = plex.parse_request("/chat/completions",
                              {"model": "sonar-deep-research", "messages": []})
    assert deep.server_context and deep.hidden_output  # citations, reasoning unseen
    assert deep.request_fee_nano == 100 * 5_000_000


def test_legacy_completions_default_is_not_assumed_elsewhere() -> None:
    body = {"model": "m", "prompt": "def f():", "suffix": "return 1"}
    assert PROVIDERS["openai"].parse_request("/v1/completions", body).max_output_tokens == 16
    fim = PROVIDERS["mistral"].parse_request("/v1/fim/completions", body)
    assert fim.endpoint == "completions" and fim.max_output_tokens is None


def test_ollama_latest_tag_is_the_untagged_price() -> None:
    from tokenfuse.config import EstimateSettings
    from tokenfuse.policy.reservation import price_for

    table, ollama = PriceTable.load(), PROVIDERS["ollama"]
    untagged = table.lookup("llama3", "ollama")
    assert untagged is not None
    assert price_for(table, "llama3:latest", EstimateSettings(), ollama) == untagged
    assert price_for(table, "llama3:70b-q4", EstimateSettings(), ollama) is None


def test_cerebras_minus_one_is_no_cap() -> None:
    cerebras = PROVIDERS["cerebras"]
    body = {"model": "llama-3.3-70b", "messages": [], "max_completion_tokens": -1}
    call = cerebras.parse_request("/v1/chat/completions", body)
    assert call.max_output_tokens is None  # the model's maximum is reserved
    assert cerebras.with_output_cap(body, call, 512)["max_completion_tokens"] == 512
    with pytest.raises(Exception, match="positive integer"):
        PROVIDERS["groq"].parse_request("/openai/v1/chat/completions", body)


def test_one_tool_call_is_counted_once_whichever_readers_read_its_shape() -> None:
    """Cohere v2 writes OpenAI's `tool_calls`: both readers find the call, it counts once
    (it counted twice, and the tool-loop guard refused at half its limit)."""
    from tokenfuse.providers import tool_calls

    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "x"}'}}]}
    assert tool_calls(message) == [("get_weather", '{"city": "x"}')]
    mixed = {**message, "content": [{"type": "tool_use", "name": "search", "input": {}}]}
    assert sorted(name for name, _ in tool_calls(mixed)) == ["get_weather", "search"]
