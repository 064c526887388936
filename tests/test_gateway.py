"""End to end through the real envoy and processor with the official SDKs."""

from __future__ import annotations

import json
import re
import threading

import anthropic
import httpx
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import billed_for, key_of, requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tokenfuse.identity import key_id
from tokenfuse.state.keys import reservations_key

HAIKU = "claude-haiku-4-5"


def status(stack: Stack, key: str) -> dict:
    result = stack.cli("budget", "status", "--key", key, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def spent(stack: Stack, key: str) -> int:
    return status(stack, key)["windows"]["total"]["spent_nano_usd"]


def test_openai_sdk_settles_to_provider_usage(stack: Stack, fake: FakeProvider,
                                              api_key: str) -> None:
    client = openai_client(stack, api_key)
    prompts = ["hi", "Summarise the plot of Hamlet in one line, please. " * 20, "日本語で"]
    for i, prompt in enumerate(prompts):
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": prompt}],
            max_tokens=10 + i * 7,
            extra_headers={"x-fake-cached-tokens": "5"} if i == 1 else None,
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 10 + i * 7
    embedding = client.embeddings.create(model="text-embedding-3-small", input="a b c")
    assert embedding.usage.prompt_tokens > 0
    doc = status(stack, api_key)
    billed = billed_for(fake, api_key)
    assert billed > 0
    for window in doc["windows"].values():
        assert window["spent_nano_usd"] == billed
        assert window["reserved_nano_usd"] == 0


def test_anthropic_sdk_settles_cache_tokens(stack: Stack, fake: FakeProvider,
                                            api_key: str) -> None:
    client = anthropic_client(stack, api_key)
    message = client.messages.create(
        model=HAIKU, max_tokens=12, system="You are terse. " + "Reference text. " * 600,
        messages=[{"role": "user", "content": "Tell me about caching."}],
        extra_headers={"x-fake-cache-read": "1000", "x-fake-cache-creation": "300"},
    )
    assert message.usage.cache_read_input_tokens == 1000
    assert message.usage.cache_creation_input_tokens == 300
    # claude-haiku-4-5: input $1/M, output $5/M, cache read $0.10/M, cache write $1.25/M.
    expected = (message.usage.input_tokens * 1000 + 12 * 5000 + 1000 * 100 + 300 * 1250)
    assert spent(stack, api_key) == billed_for(fake, api_key) == expected


def test_reservation_covers_settlement_while_in_flight(stack: Stack, fake: FakeProvider,
                                                       api_key: str) -> None:
    caller = key_id(stack.secret.encode(), api_key)
    client = openai_client(stack, api_key)
    holder: dict[str, object] = {}
    release = threading.Event()

    def call() -> None:
        holder["reply"] = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=40,
            messages=[{"role": "user", "content": "word " * 300}],
            extra_headers={"x-fake-delay-ms": "1500"})
        release.set()

    worker = threading.Thread(target=call)
    worker.start()
    redis_client = stack.redis.client()
    wait_until(lambda: redis_client.hlen(reservations_key(caller)) == 1, what="reservation")
    record = next(iter(redis_client.hgetall(reservations_key(caller)).values())).decode()
    reserved = int(record.split("|")[0])
    assert status(stack, api_key)["windows"]["day"]["reserved_nano_usd"] == reserved
    worker.join(30)
    assert release.is_set()
    settled = spent(stack, api_key)
    assert 0 < settled <= reserved
    assert settled == billed_for(fake, api_key)
    assert redis_client.hlen(reservations_key(caller)) == 0


def test_every_settlement_was_covered_by_its_reservation(stack: Stack) -> None:
    """Across everything this session sent so far: settled <= reserved, always."""
    lines = re.findall(r"settled rid=\S+ basis=usage nano=(\d+) of (\d+) reserved",
                       stack.processor.log_text())
    assert lines, "no settlements logged"
    for actual, reserved in lines:
        assert int(actual) <= int(reserved)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_budget_exhausted_is_402_in_provider_format(stack: Stack, fake: FakeProvider,
                                                    api_key: str, sdk: str) -> None:
    assert stack.cli("budget", "set", "--key", api_key, "--daily", "0.00001").returncode == 0
    before = requests_for(fake, api_key)
    if sdk == "openai":
        with pytest.raises(openai.APIStatusError) as raised:
            openai_client(stack, api_key).chat.completions.create(
                model="gpt-4o-mini", max_tokens=500,
                messages=[{"role": "user", "content": "expensive"}])
        error = raised.value
        assert error.status_code == 402
        assert "daily" in error.message or "day budget" in error.message
        body = error.response.json()
        assert body["error"]["code"] == "budget_exceeded"
        assert body["error"]["type"] == "insufficient_quota"
    else:
        with pytest.raises(anthropic.APIStatusError) as raised_a:
            anthropic_client(stack, api_key).messages.create(
                model=HAIKU, max_tokens=500, messages=[{"role": "user", "content": "x"}])
        assert raised_a.value.status_code == 402
        body = raised_a.value.response.json()
        assert body["type"] == "error" and body["error"]["code"] == "budget_exceeded"
        assert "day budget exhausted" in body["error"]["message"]
    details = body["tokenfuse"]
    assert details["window"] == "day"
    assert details["limit_nano_usd"] == 10_000
    assert details["used_nano_usd"] == 0
    assert details["resets_at"] % 86400 == 0
    assert requests_for(fake, api_key) == before  # never reached the provider
    assert spent(stack, api_key) == 0


def test_budget_refusal_after_spending(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    """What is left cannot cover the input and a minimal answer (16 tokens): 402."""
    client = openai_client(stack, api_key)
    stack.cli("budget", "set", "--key", api_key, "--hourly", "0.00002")
    ok = client.chat.completions.create(model="gpt-4o-mini", max_tokens=20,
                                        messages=[{"role": "user", "content": "one"}])
    assert ok.usage is not None
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                       messages=[{"role": "user", "content": "two"}])
    assert raised.value.status_code == 402
    assert raised.value.response.json()["tokenfuse"]["window"] == "hour"
    assert requests_for(fake, api_key) == 1
    doc = status(stack, api_key)
    assert doc["windows"]["hour"]["spent_nano_usd"] == billed_for(fake, api_key)
    assert doc["windows"]["hour"]["limit_nano_usd"] == 20_000


def test_output_cap_clamped_to_what_the_budget_covers(stack: Stack, fake: FakeProvider,
                                                      api_key: str) -> None:
    """A cap the budget cannot cover is rewritten down to what it can: the provider then
    stops there itself, and the bill stays within the limit."""
    client = openai_client(stack, api_key)
    stack.cli("budget", "set", "--key", api_key, "--daily", "0.0001")  # 100,000 nano
    fake.reset()
    done = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=4000,
        messages=[{"role": "user", "content": "write a long story"}])
    assert done.choices[0].finish_reason == "length"
    sent = json.loads(fake.records[-1].body)
    assert 16 <= sent["max_tokens"] < 4000
    assert done.usage is not None and done.usage.completion_tokens == sent["max_tokens"]
    assert billed_for(fake, api_key) <= 100_000
    assert status(stack, api_key)["windows"]["day"]["spent_nano_usd"] \
        == billed_for(fake, api_key)
    # No cap at all: the model's maximum would not fit either; the cap is written in.
    other = api_key + "-nocap"
    stack.cli("budget", "set", "--key", other, "--daily", "0.0001")
    openai_client(stack, other).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}])
    sent = json.loads(fake.records[-1].body)
    assert 16 <= sent["max_completion_tokens"] < 16384
    assert billed_for(fake, other) <= 100_000
    assert status(stack, other)["windows"]["day"]["spent_nano_usd"] == billed_for(fake, other)


def _raw(stack: Stack, path: str, body: bytes | str, key: str | None = "sk-raw",
         headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"content-type": "application/json", **(headers or {})}
    if key:
        h["authorization"] = f"Bearer {key}"
    return httpx.post(stack.envoy.base_url + path, content=body, headers=h, timeout=30)


@pytest.mark.parametrize(("path", "body", "status_code", "code"), [
    ("/openai/v1/chat/completions", "{not json", 400, "invalid_json"),
    ("/openai/v1/chat/completions", "[1, 2]", 400, "invalid_json"),
    ("/openai/v1/chat/completions", '{"messages": []}', 400, "missing_model"),
    ("/openai/v1/chat/completions", '{"model": "gpt-4o-mini", "max_tokens": -5}', 400,
     "invalid_request"),
    ("/openai/v1/chat/completions", '{"model": "no-such-model", "messages": []}', 400,
     "unknown_model"),
    ("/openai/v1/audio/speech", '{"model": "tts-1", "input": "x"}', 404,
     "unsupported_endpoint"),
    ("/anthropic/v1/messages", b"\xff\xfe", 400, "invalid_json"),
])
def test_bad_requests_are_refused_and_not_forwarded(
        stack: Stack, fake: FakeProvider, api_key: str, path: str, body: str, status_code: int,
        code: str) -> None:
    response = _raw(stack, path, body, key=api_key)
    assert response.status_code == status_code
    doc = response.json()
    assert doc["error"]["code"] == code
    assert doc["error"]["message"]
    assert requests_for(fake, api_key) == 0


def test_missing_api_key_is_401(stack: Stack, fake: FakeProvider) -> None:
    before = len(fake.records)
    response = _raw(stack, "/openai/v1/chat/completions", '{"model": "gpt-4o-mini"}', key=None)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"
    assert len(fake.records) == before


def test_oversized_body_is_413_json(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    limit = int(stack.env["TOKENFUSE_MAX_REQUEST_BYTES"])
    body = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "x" * (limit + 1024)}]})
    response = _raw(stack, "/openai/v1/chat/completions", body, key=api_key)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert requests_for(fake, api_key) == 0


def test_large_prompt_within_limit_passes(stack: Stack, fake: FakeProvider,
                                          api_key: str) -> None:
    prompt = "lorem ipsum dolor sit amet " * 20_000  # ~540 kB
    reply = openai_client(stack, api_key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": prompt}])
    assert reply.usage is not None and reply.usage.prompt_tokens > 100_000
    assert spent(stack, api_key) == billed_for(fake, api_key)


def test_get_without_body_passes(stack: Stack, api_key: str) -> None:
    models = openai_client(stack, api_key).models.list()
    assert len(models.data) > 0
    assert spent(stack, api_key) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_provider_error_bills_nothing(stack: Stack, fake: FakeProvider, api_key: str,
                                      stream: bool) -> None:
    # The status reaches the processor as an attribute of the first body message.
    with pytest.raises(openai.RateLimitError):
        openai_client(stack, api_key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}],
            stream=stream, extra_headers={"x-fake-status": "429"})
    assert requests_for(fake, api_key) == 1
    doc = status(stack, api_key)
    assert doc["windows"]["day"]["spent_nano_usd"] == 0
    assert doc["windows"]["day"]["reserved_nano_usd"] == 0


def test_a_call_costs_four_processor_messages(stack: Stack, fake: FakeProvider,
                                              api_key: str) -> None:
    """Request headers, request body, response body, end of stream: the response headers
    are not sent (the status comes as an attribute), one round trip fewer per call."""
    sent = "http.tokenfuse.ext_proc.stream_msgs_sent"
    before = stack.envoy.stat(sent)
    openai_client(stack, api_key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "count"}])
    wait_until(lambda: stack.envoy.stat("http.tokenfuse.ext_proc.streams_closed")
               >= stack.envoy.stat("http.tokenfuse.ext_proc.streams_started"),
               what="the processor stream's end")
    assert stack.envoy.stat(sent) - before == 4
    assert spent(stack, api_key) == billed_for(fake, api_key) > 0


def test_streams_settle_from_usage(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    oa = openai_client(stack, api_key)
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in oa.chat.completions.create(
            model="gpt-4o-mini", max_tokens=25, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "stream please"}])
        if chunk.choices
    )
    assert len(text) > 0
    an = anthropic_client(stack, api_key)
    with an.messages.stream(model=HAIKU, max_tokens=30,
                            messages=[{"role": "user", "content": "stream"}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens == 30 and streamed
    # Settled before the last event ([DONE], message_stop) went out: no wait needed here.
    doc = status(stack, api_key)
    assert doc["windows"]["total"]["reserved_nano_usd"] == 0
    # The fake provider's own bookkeeping may trail the bytes it sent.
    wait_until(lambda: len([r for r in fake.records if r.completed and r.usage
                            and key_of(r.headers) == api_key]) == 2, what="the fake's records")
    assert doc["windows"]["total"]["spent_nano_usd"] == billed_for(fake, api_key)


def test_metrics_report_decisions_spend_and_latency(stack: Stack, api_key: str) -> None:
    openai_client(stack, api_key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=4, messages=[{"role": "user", "content": "m"}])
    text = stack.processor.metrics()
    assert re.search(r'tokenfuse_decisions_total\{outcome="allowed",provider="openai",'
                     r'reason="within_budget"\} [1-9]', text)
    assert re.search(r'tokenfuse_spend_nano_usd_total\{model="gpt-4o-mini",provider="openai"\}'
                     r" [1-9]", text)
    assert re.search(r'tokenfuse_tokens_total\{kind="output",model="gpt-4o-mini",'
                     r'provider="openai"\} [1-9]', text)
    assert re.search(r"tokenfuse_decision_seconds_count [1-9]", text)
    assert "tokenfuse_redis_errors_total" in text


def test_clients_cannot_make_envoy_retry(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    """x-envoy-retry-on / x-envoy-max-retries from a client are dropped: one request is
    one provider call (only a pool's failover retries, on tokenfuse's terms)."""
    response = httpx.post(
        stack.envoy.base_url + "/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {api_key}", "x-fake-status": "503",
                 "x-envoy-retry-on": "5xx,retriable-status-codes",
                 "x-envoy-retriable-status-codes": "503", "x-envoy-max-retries": "3"},
        json={"model": "gpt-4o-mini", "max_tokens": 2,
              "messages": [{"role": "user", "content": "retry me please"}]}, timeout=30)
    assert response.status_code == 503
    assert requests_for(fake, api_key) == 1
