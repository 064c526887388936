"""Real multilingual text through the gateway: counted in the model's own tokenizer, so a
stream within its budget is not cut, and a completed stream is billed the provider's usage
to the nano-dollar (issue 12: a Hindi gpt-4o stream costing $0.004 was cut at 107 of its
400 deltas under a $0.006 budget, counted in cl100k)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import billed_for, billed_total_for, key_of
from tests.support.fake_provider import OUTPUT_TEXTS, FakeProvider
from tests.support.harness import Stack, wait_until

HAIKU = "claude-haiku-4-5"
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default


def day(stack: Stack, key: str) -> dict:
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return doc["windows"]["day"]


def set_daily(stack: Stack, key: str, usd: str) -> None:
    assert stack.cli("budget", "set", "--key", key, "--daily", usd).returncode == 0


def records_for(fake: FakeProvider, key: str) -> list:
    return [r for r in list(fake.records) if key_of(r) == key]


def stream_openai(stack: Stack, key: str, model: str, headers: dict[str, str],
                  **kw: object) -> tuple[str, int]:
    """The text and the number of content deltas the client received."""
    text, deltas = [], 0
    for chunk in openai_client(stack, key).chat.completions.create(
            model=model, stream=True, extra_headers=headers,
            messages=[{"role": "user", "content": "Tell me about the library."}], **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
            deltas += 1
    return "".join(text), deltas


def stream_claude(stack: Stack, key: str, headers: dict[str, str],
                  max_tokens: int) -> tuple[str, int]:
    with anthropic_client(stack, key).messages.stream(
            model=HAIKU, max_tokens=max_tokens, extra_headers=headers,
            messages=[{"role": "user", "content": "Tell me about the library."}]) as stream:
        pieces = list(stream.text_stream)
    return "".join(pieces), len(pieces)


def test_hindi_stream_within_its_budget_completes_and_is_billed_exactly(
        stack: Stack, fake: FakeProvider, api_key: str) -> None:
    """The issue's scenario: gpt-4o answers 400 tokens of Hindi ($0.004 of output) under a
    $0.006 daily budget."""
    set_daily(stack, api_key, "0.006")
    headers = {"x-fake-output-text": "hindi", "x-fake-output-tokens": "400",
               "x-fake-chunk-delay-ms": "1"}
    text, deltas = stream_openai(stack, api_key, "gpt-4o", headers)  # no exception: uncut
    record = the_record(fake, api_key)
    assert record.usage is not None and record.usage.output_tokens == 400
    assert "लाइब्रेरी" in text
    print(f"\nhindi gpt-4o: {deltas} deltas delivered, 400 tokens billed", end=" ")
    spent = day(stack, api_key)
    assert spent["reserved_nano_usd"] == 0
    assert spent["spent_nano_usd"] == billed_for(fake, api_key) <= 6_000_000
    print(f"spent {spent['spent_nano_usd']} nano-USD of 6000000", end=" ")


def the_record(fake: FakeProvider, key: str):
    """The key's one request, once the fake has finished it (its bookkeeping may trail the
    last byte the client read)."""
    wait_until(lambda: [r.completed for r in records_for(fake, key)] == [True],
               what="the fake's record")
    (record,) = records_for(fake, key)
    return record


@pytest.mark.parametrize("language", OUTPUT_TEXTS)
@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4-turbo", HAIKU])
def test_completed_multilingual_stream_is_billed_the_provider_usage(
        stack: Stack, fake: FakeProvider, api_key: str, model: str, language: str) -> None:
    headers = {"x-fake-output-text": language, "x-fake-output-tokens": "300"}
    if model == HAIKU:
        stream_claude(stack, api_key, headers, max_tokens=1000)
    else:
        stream_openai(stack, api_key, model, headers)
    record = the_record(fake, api_key)
    assert record.usage is not None and record.usage.output_tokens == 300
    spent = day(stack, api_key)
    assert spent["reserved_nano_usd"] == 0
    assert spent["spent_nano_usd"] == billed_for(fake, api_key)  # to the nano-dollar


@pytest.mark.parametrize("model", ["gpt-4o", HAIKU])
@pytest.mark.parametrize("language", ["hindi", "english"])
def test_cut_multilingual_stream_keeps_the_budget(stack: Stack, fake: FakeProvider,
                                                  api_key: str, model: str,
                                                  language: str) -> None:
    """A stream that runs past its budget is cut; without the provider's usage it is charged
    what was counted plus the grace, which covers what the provider generated."""
    set_daily(stack, api_key, "0.002")
    headers = {"x-fake-output-text": language, "x-fake-output-tokens": "4000",
               "x-fake-chunk-delay-ms": "2"}
    with pytest.raises((openai.APIError, anthropic.APIStatusError)):
        if model == HAIKU:
            stream_claude(stack, api_key, headers, max_tokens=4000)
        else:
            stream_openai(stack, api_key, model, headers)
    wait_until(lambda: any(not r.completed for r in records_for(fake, api_key)),
               what="the provider to see the disconnect")
    spent = day(stack, api_key)
    assert spent["reserved_nano_usd"] == 0
    billed = billed_total_for(fake, api_key)  # what the provider generated before it stopped
    assert 0 < billed <= spent["spent_nano_usd"] <= 2_000_000
    print(f"\n{model} {language}: provider billed {billed}, charged {spent['spent_nano_usd']} "
          f"of 2000000", end=" ")
