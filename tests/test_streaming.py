"""Streams are metered as they flow and end the moment the budget is crossed."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import httpx2
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import billed_for, key_of, usage_cost
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tests.support.paced_stream import PacedStream
from tokenfuse.providers import PROVIDERS

HAIKU = "claude-haiku-4-5"
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default
# gpt-4o-mini output: 600 nano-USD per token; claude-haiku-4-5: 5,000.
OUTPUT_NANO = {"gpt-4o-mini": 600, HAIKU: 5000}
#: How many tokens tokenfuse counts per token billed, in percent: Claude's tokenizer is not
#: public, its count is a bound (cl100k x 2.05; the fake's Claude bills cl100k).
COUNT_PERCENT = {"gpt-4o-mini": 100, HAIKU: PROVIDERS["anthropic"].tokenizer(HAIKU).percent}


def status(stack: Stack, key: str) -> dict:
    return json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)


def provider_cost(fake: FakeProvider, key: str) -> int:
    """What the provider billed for this key, aborted streams included."""
    return sum(usage_cost(r.usage) for r in list(fake.records)
               if r.usage is not None and key_of(r.headers) == key)


def records_for(fake: FakeProvider, key: str) -> list:
    return [r for r in list(fake.records) if key_of(r.headers) == key]


@pytest.mark.parametrize("model", ["gpt-4o-mini", HAIKU])
def test_stream_is_cut_at_the_budget(stack: Stack, fake: FakeProvider, api_key: str,
                                     model: str) -> None:
    budget_nano = 150 * OUTPUT_NANO[model]  # worth 150 output tokens (input costs ~4 more)
    budget_usd = f"0.{budget_nano:09d}"
    assert stack.cli("budget", "set", "--key", api_key, "--daily", budget_usd).returncode == 0
    delivered = 0
    # A provider generating ~500 tokens/s, thousands of them unless stopped.
    headers = {"x-fake-chunk-delay-ms": "2", "x-fake-output-tokens": "4000"}
    if model == HAIKU:
        with pytest.raises(anthropic.APIStatusError) as raised, \
                anthropic_client(stack, api_key).messages.stream(
                    model=model, max_tokens=4000, extra_headers=headers,
                    messages=[{"role": "user", "content": "write a novel"}]) as stream:
            for _text in stream.text_stream:
                delivered += 1
        body = raised.value.body
        assert isinstance(body, dict) and body["error"]["code"] == "budget_exceeded"
        assert "budget exhausted" in body["error"]["message"]
    else:
        with pytest.raises(openai.APIError) as raised_o:
            for chunk in openai_client(stack, api_key).chat.completions.create(
                    model=model, stream=True, extra_headers=headers,
                    messages=[{"role": "user", "content": "write a novel"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    delivered += 1
        assert "budget exhausted" in raised_o.value.message
    # Counted with the model's tokenizer (Claude: with its bound, so cut earlier).
    assert 80 * 100 // COUNT_PERCENT[model] < delivered <= 150, delivered
    print(f"\n{model}: delivered {delivered} of a 150-token budget", end=" ")
    assert fake.wait_for_requests(1)
    wait_until(lambda: any(not r.completed for r in records_for(fake, api_key)),
               what="the provider to see the disconnect")
    record = records_for(fake, api_key)[-1]
    assert not record.completed
    # The provider stopped generating soon after the cut (bounded by the grace).
    assert record.output_tokens_sent <= delivered + GRACE, record.output_tokens_sent
    print(f"provider generated {record.output_tokens_sent}", end=" ")
    doc = status(stack, api_key)
    day = doc["windows"]["day"]
    assert day["reserved_nano_usd"] == 0
    assert day["spent_nano_usd"] <= budget_nano
    assert provider_cost(fake, api_key) <= day["spent_nano_usd"]  # provider billed ≤ charged
    print(f"billed {provider_cost(fake, api_key)} charged {day['spent_nano_usd']} "
          f"budget {budget_nano}")


def test_injected_include_usage_is_invisible(stack: Stack, fake: FakeProvider,
                                            api_key: str) -> None:
    client = openai_client(stack, api_key)
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=12, stream=True,
        messages=[{"role": "user", "content": "count"}]))
    assert chunks and all(c.choices for c in chunks)  # no usage-only chunk
    assert all(c.usage is None for c in chunks)
    sent = json.loads(records_for(fake, api_key)[-1].body)
    assert sent["stream_options"] == {"include_usage": True}  # tokenfuse asked for it
    # ... and so settlement is exact, to the nano-dollar:
    assert status(stack, api_key)["windows"]["day"]["spent_nano_usd"] == billed_for(
        fake, api_key)


def test_include_usage_visible_when_asked(stack: Stack, fake: FakeProvider,
                                          api_key: str) -> None:
    chunks = list(openai_client(stack, api_key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=12, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "count"}]))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_stream_text_is_unchanged(stack: Stack, api_key: str) -> None:
    client = anthropic_client(stack, api_key)
    plain = client.messages.create(model=HAIKU, max_tokens=40,
                                   messages=[{"role": "user", "content": "same"}])
    with client.messages.stream(model=HAIKU, max_tokens=40,
                                messages=[{"role": "user", "content": "same"}],
                                extra_headers={"x-fake-crlf": "1"}) as stream:
        text = "".join(stream.text_stream)
    assert text == plain.content[0].text  # type: ignore[union-attr]


def test_long_stream_extends_and_settles_exactly(stack: Stack, fake: FakeProvider,
                                                 api_key: str) -> None:
    """No max_tokens: the reservation starts at 256 tokens and extends, many times."""
    text = "".join(
        c.choices[0].delta.content or ""
        for c in openai_client(stack, api_key).chat.completions.create(
            model="gpt-4o-mini", stream=True, extra_headers={"x-fake-output-tokens": "1500"},
            messages=[{"role": "user", "content": "long"}])
        if c.choices)
    assert len(text) > 1500
    # Settled before [DONE] went out: the budget is exact when the SDK's loop ends.
    day = status(stack, api_key)["windows"]["day"]
    assert day["reserved_nano_usd"] == 0
    wait_until(lambda: [r.completed for r in records_for(fake, api_key)] == [True],
               what="the fake's record")  # its own bookkeeping may trail its last bytes
    assert day["spent_nano_usd"] == billed_for(fake, api_key)
    assert "tokenfuse_stream_extensions_total" in stack.processor.metrics()


def test_concurrent_streams_share_one_budget(stack: Stack, fake: FakeProvider,
                                             api_key: str) -> None:
    budget_nano = 2_000_000  # $0.002: ~3,300 gpt-4o-mini output tokens in all
    assert stack.cli("budget", "set", "--key", api_key, "--daily", "0.002").returncode == 0

    async def one(client: openai.AsyncOpenAI) -> str:
        try:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", stream=True, max_tokens=3000,
                extra_headers={"x-fake-chunk-delay-ms": "1"},
                messages=[{"role": "user", "content": "go"}])
            async for _ in stream:
                pass
            return "completed"
        except openai.APIStatusError as exc:
            return f"refused_{exc.status_code}"
        except openai.APIError:
            return "cut"

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=stack.envoy.base_url + "/openai/v1",
                                    api_key=api_key, max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(one(client) for _ in range(12)))
        finally:
            await client.close()

    outcomes = asyncio.run(run())
    assert "cut" in outcomes
    wait_until(lambda: all(r.usage is not None for r in records_for(fake, api_key)),
               what="every stream to be billed")
    day = status(stack, api_key)["windows"]["day"]
    assert day["reserved_nano_usd"] == 0
    assert provider_cost(fake, api_key) <= day["spent_nano_usd"] <= budget_nano




def test_kill_switch_ends_streams_within_a_chunk(stack: Stack, fake: FakeProvider,
                                                 api_key: str) -> None:
    consumer = PacedStream(stack, api_key)
    assert consumer.started.wait(20)
    assert stack.cli("kill", "--key", api_key).returncode == 0
    at_kill = consumer.chunks
    consumer.thread.join(20)
    assert consumer.error is not None and "kill switch" in consumer.error.message
    assert consumer.chunks - at_kill <= 2  # the chunk in flight, at most one more
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client(stack, api_key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert refused.value.status_code == 402
    assert refused.value.response.json()["error"]["code"] == "killed"
    assert status(stack, api_key)["killed"] is True
    assert stack.cli("kill", "--key", api_key, "--lift").returncode == 0
    reply = openai_client(stack, api_key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert reply.usage is not None
    assert status(stack, api_key)["windows"]["total"]["reserved_nano_usd"] == 0


def test_lowering_the_budget_below_spend_ends_the_stream(stack: Stack,
                                                         api_key: str) -> None:
    consumer = PacedStream(stack, api_key)
    assert consumer.started.wait(20)
    assert stack.cli("budget", "set", "--key", api_key, "--hourly", "0.000001").returncode == 0
    at_change = consumer.chunks
    consumer.thread.join(20)
    assert consumer.error is not None and "budget exhausted" in consumer.error.message
    assert consumer.chunks - at_change <= 2


def test_garbage_from_upstream_is_passed_and_counted(stack: Stack, fake: FakeProvider,
                                                     api_key: str) -> None:
    client = anthropic_client(stack, api_key)
    with client.messages.stream(model=HAIKU, max_tokens=20,
                                messages=[{"role": "user", "content": "g"}],
                                extra_headers={"x-fake-garbage": "1"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens == 20  # valid traffic was not broken
    day = status(stack, api_key)["windows"]["day"]
    assert day["spent_nano_usd"] == billed_for(fake, api_key) and day["reserved_nano_usd"] == 0
    assert "unparseable SSE event from upstream" in stack.processor.log_text()


@pytest.mark.parametrize("model", ["gpt-4o-mini", HAIKU])
def test_truncated_upstream_stream_settles_from_counted(stack: Stack, fake: FakeProvider,
                                                        api_key: str, model: str) -> None:
    # The provider dies after 40 tokens, generating ~500 tokens/s until then. (A provider
    # that blasts tokens and resets within the processor's per-chunk latency can lose the
    # last chunks: Envoy drops unanswered chunks on reset. The grace covers a few.)
    headers = {"x-fake-truncate-after": "40", "x-fake-chunk-delay-ms": "2"}
    # The anthropic SDK (on httpx2) lets the transport's protocol error through as is.
    with pytest.raises((openai.APIError, anthropic.APIError, httpx.HTTPError,
                        httpx2.HTTPError)):
        if model == HAIKU:
            with anthropic_client(stack, api_key).messages.stream(
                    model=model, max_tokens=500, extra_headers=headers,
                    messages=[{"role": "user", "content": "t"}]) as stream:
                for _ in stream.text_stream:
                    pass
        else:
            for _ in openai_client(stack, api_key).chat.completions.create(
                    model=model, max_tokens=500, stream=True, extra_headers=headers,
                    messages=[{"role": "user", "content": "t"}]):
                pass
    wait_until(lambda: status(stack, api_key)["windows"]["day"]["reserved_nano_usd"] == 0,
               what="settlement")
    charged = status(stack, api_key)["windows"]["day"]["spent_nano_usd"]
    generated = provider_cost(fake, api_key)
    assert generated > 0
    # Charged from what was counted (+ the grace): at least what the provider billed,
    # at most the grace above it (Claude: above its count scaled to the bound).
    assert generated <= charged <= (generated * COUNT_PERCENT[model] // 100
                                    + (GRACE + 2) * OUTPUT_NANO[model] + 10_000)
