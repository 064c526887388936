"""Pre-call estimates are upper bounds of what the provider bills."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fake_provider import (
    anthropic_input_tokens,
    counting_for,
    openai_prompt_tokens,
)
from tokenfuse.config import load_settings
from tokenfuse.metering.tokens import PER_IMAGE_TOKENS, estimate_input_tokens
from tokenfuse.policy import reservation
from tokenfuse.pricing import ModelPrice, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import PROVIDERS, Call

text = st.text(st.characters(codec="utf-8"), max_size=200)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                           "content": text}),
    min_size=1, max_size=6)


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4-turbo"])  # o200k, cl100k
@settings(max_examples=150, deadline=None)
@given(msgs=messages)
def test_openai_estimate_covers_prompt_tokens(model: str, msgs: list[dict[str, str]]) -> None:
    tokenizer = PROVIDERS["openai"].tokenizer(model)
    with counting_for("openai", model):
        billed = openai_prompt_tokens(msgs, model)
    assert estimate_input_tokens([], msgs, 0, tokenizer) >= billed


@settings(max_examples=150, deadline=None)
@given(text, messages)
def test_anthropic_estimate_covers_input_tokens(system: str,
                                                msgs: list[dict[str, str]]) -> None:
    msgs = [{**m, "role": "user" if m["role"] == "system" else m["role"]} for m in msgs]
    tokenizer = PROVIDERS["anthropic"].tokenizer("claude-haiku-4-5")
    estimate = estimate_input_tokens([system], msgs, 0, tokenizer)
    with counting_for("anthropic", "claude-haiku-4-5"):
        assert estimate >= anthropic_input_tokens(system, msgs)


def test_images_are_not_tokenized_as_text() -> None:
    huge = "data:image/png;base64," + "A" * 2_000_000
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": huge}}]}]
    estimate = estimate_input_tokens([], msgs, margin_percent=0)
    assert PER_IMAGE_TOKENS < estimate < PER_IMAGE_TOKENS + 50


def test_margin_is_applied() -> None:
    msgs = [{"role": "user", "content": "word " * 1000}]
    plain = estimate_input_tokens([], msgs, margin_percent=0)
    assert estimate_input_tokens([], msgs, margin_percent=10) == plain + -(-plain // 10)


class _Estimates:
    """The reservation policy under the settings of the environment."""

    def __init__(self) -> None:
        self.settings = load_settings().estimate
        self.prices = PriceTable.load()

    def price(self, model: str) -> ModelPrice | None:
        return reservation.price_for(self.prices, model, self.settings)

    def estimate(self, call: Call, price: ModelPrice) -> int:
        return reservation.estimate(call, price, self.settings, PROVIDERS["openai"])


def _processor(monkeypatch: pytest.MonkeyPatch, **env: str) -> _Estimates:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return _Estimates()


def test_unknown_model_refused_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENFUSE_UNKNOWN_MODEL", raising=False)
    assert _processor(monkeypatch).price("my-private-model") is None


def test_unknown_model_priced_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    processor = _processor(monkeypatch, TOKENFUSE_UNKNOWN_MODEL="price",
                           TOKENFUSE_UNKNOWN_MODEL_INPUT_USD_PER_MTOK="2",
                           TOKENFUSE_UNKNOWN_MODEL_OUTPUT_USD_PER_MTOK="8")
    price = processor.price("my-private-model")
    assert price is not None and (price.input, price.output) == (2_000_000_000, 8_000_000_000)


def test_estimate_uses_max_tokens_times_n_and_the_models_maximum(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No cap: the model may write its maximum output (the default applies only to a model
    whose maximum is not known)."""
    processor = _processor(monkeypatch, TOKENFUSE_DEFAULT_OUTPUT_TOKENS="1000")
    price = PriceTable.load().lookup("gpt-4o-mini")
    assert price is not None and price.max_output_tokens > 1000
    openai = PROVIDERS["openai"]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    no_cap = processor.estimate(openai.parse_request("/v1/chat/completions", body), price)
    capped_body = {**body, "max_tokens": 10, "n": 3}
    capped = processor.estimate(openai.parse_request("/v1/chat/completions", capped_body),
                                price)
    output_only = cost_nano(price, TokenUsage(output=price.max_output_tokens))
    # the capped body's extra keys ("max_tokens", "n" and their values) count as input
    extra = reservation.input_cost(openai.parse_request("/v1/chat/completions", capped_body),
                                   price, 10, openai) - reservation.input_cost(
        openai.parse_request("/v1/chat/completions", body), price, 10, openai)
    assert no_cap - output_only == capped - cost_nano(price, TokenUsage(output=30)) - extra
    assert no_cap > output_only
    unknown = ModelPrice("x", price.input, price.output, price.cache_read, price.cache_write,
                         max_output_tokens=0)
    assert processor.estimate(openai.parse_request("/v1/chat/completions", body), unknown) \
        == reservation.input_cost(openai.parse_request("/v1/chat/completions", body),
                                  unknown, 10, openai) \
        + cost_nano(unknown, TokenUsage(output=1000))


def test_fingerprint_tiers() -> None:
    from tokenfuse.policy.loopguard import fingerprint, near_duplicate_fingerprint

    a = [{"role": "user", "content": "Retry 3 of 5 at 2026-11-21T10:00:00Z"}]
    b = [{"role": "user", "content": "retry 4 of 5   at 2026-11-21T10:00:09Z"}]
    assert near_duplicate_fingerprint("k" * 32, "m", a) == near_duplicate_fingerprint(
        "k" * 32, "m", b)
    assert fingerprint("k" * 32, "m", a) != fingerprint("k" * 32, "m", b)
    # Only the last 3 messages count; case and whitespace never do.
    last3 = [{"role": "user", "content": f"recent {c}"} for c in "xyz"]
    older_a = [{"role": "user", "content": "ancient history"}, *last3]
    older_b = [{"role": "user", "content": "something else long ago"}, *last3]
    assert fingerprint("k" * 32, "m", older_a) == fingerprint("k" * 32, "m", older_b)
    upper = [{"role": "user", "content": "RETRY 3 OF 5  AT 2026-11-21T10:00:00Z"}]
    assert fingerprint("k" * 32, "m", upper) == fingerprint("k" * 32, "m", a)
    assert fingerprint("k" * 32, "m", a) != fingerprint("j" * 32, "m", a)


def test_the_window_bounds_each_input_of_an_embedding_list_on_its_own() -> None:
    """A dataset's embedding window is per input (Cohere v3: 512 per text, 96 texts per
    call): a list's bound is capped at the window times its inputs, never at one window."""
    price = ModelPrice(model="e", input=100_000, output=0, cache_read=0, cache_write=0,
                       max_output_tokens=0, context_window=512)
    provider = PROVIDERS["openai"]
    text = "word " * 600  # ~600 tokens: above one window
    one = provider.parse_request("/v1/embeddings", {"model": "e", "input": text})
    many = provider.parse_request("/v1/embeddings", {"model": "e", "input": [text] * 20})
    tokens = provider.parse_request("/v1/embeddings", {"model": "e", "input": [1, 2, 3]})
    assert (one.inputs, many.inputs, tokens.inputs) == (1, 20, 1)
    assert reservation.input_tokens(one, price, 0, provider) == 512
    assert reservation.input_tokens(many, price, 0, provider) == 20 * 512
    short = provider.parse_request("/v1/embeddings", {"model": "e", "input": ["hi"] * 20})
    assert reservation.input_tokens(short, price, 0, provider) < 512  # counted, not capped
