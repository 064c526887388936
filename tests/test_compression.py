"""Compression is normal traffic: the processor reads identity bytes both ways, the client
keeps the compression it asked for, and every bill is exact in every coding.

The fake provider compresses exactly when the real ones do (when the request accepts it;
`x-fake-compress-always` stands for an upstream that compresses regardless), and decodes
compressed request bodies like api.openai.com does for the Codex CLI.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib

import anthropic
import brotli
import httpx
import openai
import pytest
import zstandard

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import billed_for, billed_total_for, key_of
from tests.support.fake_provider import FakeProvider, StreamEncoder
from tests.support.harness import Stack, wait_until
from tokenfuse.providers import PROVIDERS

HAIKU = "claude-haiku-4-5"
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default
CODINGS = ("gzip", "br", "zstd")
ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


def status(stack: Stack, key: str) -> dict:
    return json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)


def spent(stack: Stack, key: str) -> int:
    return status(stack, key)["windows"]["total"]["spent_nano_usd"]


def records_for(fake: FakeProvider, key: str) -> list:
    return [r for r in list(fake.records) if key_of(r) == key]


def settled_exactly(stack: Stack, fake: FakeProvider, key: str, calls: int) -> None:
    """Every call reached the provider, finished, and was charged its bill to the nano."""
    wait_until(lambda: len(records_for(fake, key)) == calls
               and all(r.completed for r in records_for(fake, key)),
               what="the provider's records")
    day = status(stack, key)["windows"]["day"]
    assert day["reserved_nano_usd"] == 0
    assert billed_for(fake, key) > 0
    assert day["spent_nano_usd"] == billed_for(fake, key)


def chat_body(text: str = "hello there", **extra: object) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def post(stack: Stack, key: str, path: str, body: bytes, headers: dict[str, str]
         ) -> httpx.Response:
    return httpx.post(stack.envoy.base_url + path, content=body, timeout=30,
                      headers={"authorization": f"Bearer {key}",
                               "content-type": "application/json", **headers})


# ------------------------------------------------------------------- the fake is not polite
def test_fake_provider_compresses_when_accepted(fake: FakeProvider, api_key: str) -> None:
    """Without tokenfuse, the SDK's default accept-encoding gets compressed answers, JSON
    and streams alike (so a proxy that meters raw bytes would meter nothing)."""
    client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key=api_key, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=8,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.usage is not None
    with anthropic.Anthropic(base_url=fake.base_url, api_key=api_key,
                             max_retries=0).messages.stream(
            model=HAIKU, max_tokens=30,
            messages=[{"role": "user", "content": "hi"}]) as stream:
        assert stream.get_final_text()
    # The fake's bookkeeping may trail the last byte the client read: wait for both.
    wait_until(lambda: len(records_for(fake, api_key)) == 2, what="the fake's records")
    encodings = [r.response_encoding for r in records_for(fake, api_key)]
    assert encodings == ["gzip", "gzip"]


# ------------------------------------------------------------------ responses, both ways
@pytest.mark.parametrize("coding", CODINGS)
def test_json_response_is_compressed_for_the_client_and_billed_exactly(
        stack: Stack, fake: FakeProvider, api_key: str, coding: str) -> None:
    reply = post(stack, api_key, "/openai/v1/chat/completions",
                 json.dumps(chat_body(max_tokens=20)).encode(),
                 {"accept-encoding": coding})
    assert reply.status_code == 200
    assert reply.headers["content-encoding"] == coding  # the client keeps its compression
    assert reply.json()["usage"]["completion_tokens"] == 20  # httpx decoded it: consistent
    record = records_for(fake, api_key)[-1]
    assert record.headers["accept-encoding"] == "identity"  # the provider was asked so
    assert record.response_encoding == ""
    settled_exactly(stack, fake, api_key, 1)


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_upstream_compressing_regardless_is_decoded_before_metering(
        stack: Stack, fake: FakeProvider, api_key: str, coding: str) -> None:
    """An upstream that compresses although asked for identity (in a coding the client
    accepts): the processor decodes it to meter it and forwards it in that coding; the
    client decodes JSON and stream alike; both settle to the provider's bill."""
    headers = {"x-fake-compress-always": coding, "accept-encoding": coding}
    reply = post(stack, api_key, "/openai/v1/chat/completions",
                 json.dumps(chat_body(max_tokens=25)).encode(), headers)
    assert reply.status_code == 200
    assert reply.headers["content-encoding"] == coding
    assert reply.json()["usage"]["completion_tokens"] == 25
    body = {"model": HAIKU, "max_tokens": 60, "stream": True,
            "messages": [{"role": "user", "content": "stream"}]}
    with httpx.stream("POST", stack.envoy.base_url + "/anthropic/v1/messages", json=body,
                      timeout=30, headers={"x-api-key": api_key,
                                           "anthropic-version": "2023-06-01",
                                           **headers}) as response:
        assert response.headers["content-encoding"] == coding
        events = b"".join(response.iter_bytes())
    assert events.count(b"event: content_block_delta") > 5
    assert events.rstrip().endswith(b'data: {"type":"message_stop"}')
    wait_until(lambda: len(records_for(fake, api_key)) == 2, what="the fake's records")
    assert [r.response_encoding for r in records_for(fake, api_key)] == [coding, coding]
    settled_exactly(stack, fake, api_key, 2)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_compressed_stream_stays_a_stream(stack: Stack, fake: FakeProvider, api_key: str,
                                          provider: str) -> None:
    """gzip toward the client, gzip from the provider: the client decodes its first event
    while the provider is still generating (nothing buffers the whole stream)."""
    headers = {"x-fake-compress-always": "gzip", "x-fake-chunk-delay-ms": "10",
               "accept-encoding": "gzip"}
    if provider == "openai":
        path, body = "/openai/v1/chat/completions", chat_body(max_tokens=150, stream=True)
        auth = {"authorization": f"Bearer {api_key}"}
    else:
        path = "/anthropic/v1/messages"
        body = {"model": HAIKU, "max_tokens": 150, "stream": True,
                "messages": [{"role": "user", "content": "stream"}]}
        auth = {"x-api-key": api_key, "anthropic-version": "2023-06-01"}
    in_flight_at_first_event = None
    pieces = 0
    with httpx.stream("POST", stack.envoy.base_url + path, json=body, timeout=30,
                      headers={**auth, **headers}) as response:
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        events = b""
        for piece in response.iter_bytes():  # decoded by httpx, piece by piece
            pieces += 1
            events += piece
            if in_flight_at_first_event is None and b"data:" in events:
                in_flight_at_first_event = fake.in_flight(api_key)
    assert in_flight_at_first_event == 1
    assert pieces > 10
    assert (b"[DONE]" in events) if provider == "openai" else (b"message_stop" in events)
    settled_exactly(stack, fake, api_key, 1)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_budget_cut_inside_a_compressed_stream(stack: Stack, fake: FakeProvider,
                                               api_key: str, provider: str) -> None:
    output_nano = 600 if provider == "openai" else 5000
    budget_nano = 150 * output_nano
    assert stack.cli("budget", "set", "--key", api_key, "--daily",
                     f"0.{budget_nano:09d}").returncode == 0
    headers = {"x-fake-chunk-delay-ms": "2", "x-fake-output-tokens": "4000",
               "x-fake-compress-always": "gzip"}
    delivered = 0
    if provider == "anthropic":
        with pytest.raises(anthropic.APIStatusError) as raised, \
                anthropic_client(stack, api_key).messages.stream(
                    model=HAIKU, max_tokens=4000, extra_headers=headers,
                    messages=[{"role": "user", "content": "a novel"}]) as stream:
            for _text in stream.text_stream:
                delivered += 1
        assert "budget exhausted" in str(raised.value)
    else:
        with pytest.raises(openai.APIError) as raised_o:
            for chunk in openai_client(stack, api_key).chat.completions.create(
                    model="gpt-4o-mini", stream=True, extra_headers=headers,
                    messages=[{"role": "user", "content": "a novel"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    delivered += 1
        assert "budget exhausted" in raised_o.value.message
    # Claude's count is a bound above what the fake bills (cl100k x the provider's factor).
    percent = PROVIDERS[provider].tokenizer(HAIKU if provider == "anthropic"
                                            else "gpt-4o-mini").percent
    assert 80 * 100 // percent < delivered <= 150, delivered
    wait_until(lambda: bool(records_for(fake, api_key))
               and all(r.finished for r in records_for(fake, api_key)),
               what="the provider to see the disconnect")
    record = records_for(fake, api_key)[-1]
    assert not record.completed
    assert record.output_tokens_sent <= delivered + GRACE
    day = status(stack, api_key)["windows"]["day"]
    assert day["reserved_nano_usd"] == 0
    assert billed_total_for(fake, api_key) <= day["spent_nano_usd"] <= budget_nano


def test_kill_switch_inside_a_compressed_stream(stack: Stack, fake: FakeProvider,
                                                api_key: str) -> None:
    """The kill switch's error event is compressed with the stream: the client decodes it
    (no `incorrect header check`) and raises with the reason."""
    started = threading.Event()
    outcome: dict[str, object] = {}

    def consume() -> None:
        chunks = 0
        try:
            for chunk in openai_client(stack, api_key).chat.completions.create(
                    model="gpt-4o-mini", stream=True, max_tokens=3000,
                    extra_headers={"x-fake-chunk-delay-ms": "20",
                                   "x-fake-compress-always": "gzip"},
                    messages=[{"role": "user", "content": "slow"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    chunks += 1
                    if chunks == 5:
                        started.set()
        except Exception as exc:
            outcome["error"] = exc
        outcome["chunks"] = chunks
        started.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert started.wait(20)
    assert stack.cli("kill", "--key", api_key).returncode == 0
    thread.join(20)
    error = outcome.get("error")
    assert isinstance(error, openai.APIError), error
    assert "kill switch" in error.message
    assert stack.cli("kill", "--key", api_key, "--lift").returncode == 0
    wait_until(lambda: all(r.finished for r in records_for(fake, api_key)),
               what="the provider to see the disconnect")
    day = status(stack, api_key)["windows"]["day"]
    assert day["reserved_nano_usd"] == 0
    assert billed_total_for(fake, api_key) <= day["spent_nano_usd"]


# ------------------------------------------------------------------ compressed requests
@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_request_body_is_priced_and_forwarded_decoded(
        stack: Stack, fake: FakeProvider, api_key: str, coding: str) -> None:
    """Like the Codex CLI: a compressed /v1/responses body. The provider gets the JSON
    document tokenfuse priced, as identity bytes, and the bill is exact."""
    document = {"model": "gpt-4o-mini", "input": "summarise: " + "lorem ipsum " * 300,
                "max_output_tokens": 40}
    raw = json.dumps(document).encode()
    reply = post(stack, api_key, "/openai/v1/responses", ENCODERS[coding](raw),
                 {"content-encoding": coding})
    assert reply.status_code == 200, reply.text
    record = records_for(fake, api_key)[-1]
    assert record.request_encoding == ""  # forwarded decoded ...
    assert record.body == raw  # ... byte for byte what the client compressed
    assert int(record.headers["content-length"]) == len(raw)
    settled_exactly(stack, fake, api_key, 1)


def test_compressed_request_is_clamped_like_a_plain_one(stack: Stack, fake: FakeProvider,
                                                        api_key: str) -> None:
    """A zstd body with a cap above what the budget covers: the decoded document is
    rewritten to the covered cap, and the provider never bills more than the limit."""
    budget_nano = 60_000  # gpt-4o-mini: 600 nano per output token → < 100 tokens
    assert stack.cli("budget", "set", "--key", api_key, "--daily",
                     f"0.{budget_nano:09d}").returncode == 0
    raw = json.dumps(chat_body("clamp me", max_tokens=4000)).encode()
    reply = post(stack, api_key, "/openai/v1/chat/completions", ENCODERS["zstd"](raw),
                 {"content-encoding": "zstd", "x-fake-output-tokens": "max"})
    assert reply.status_code == 200, reply.text
    record = records_for(fake, api_key)[-1]
    assert record.request_encoding == ""
    assert record.cap is not None and record.cap < 100
    settled_exactly(stack, fake, api_key, 1)
    assert spent(stack, api_key) <= budget_nano


def test_decompression_bomb_is_refused_413(stack: Stack, fake: FakeProvider,
                                           api_key: str) -> None:
    """8 MiB of JSON in 8 kB of gzip, above the stack's 4 MiB request limit."""
    raw = json.dumps(chat_body("a" * (8 << 20))).encode()
    bomb = gzip.compress(raw, 9)
    assert len(bomb) < 64 << 10
    reply = post(stack, api_key, "/openai/v1/chat/completions", bomb,
                 {"content-encoding": "gzip"})
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert error["code"] == "request_too_large"
    assert "decoded, if it was compressed" in error["message"]
    assert records_for(fake, api_key) == []
    assert spent(stack, api_key) == 0


def test_unknown_content_encoding_is_refused_415(stack: Stack, fake: FakeProvider,
                                                 api_key: str) -> None:
    reply = post(stack, api_key, "/anthropic/v1/messages",
                 b"\x04\x22\x4d\x18 not decodable",
                 {"content-encoding": "lz4", "x-api-key": api_key,
                  "anthropic-version": "2023-06-01"})
    assert reply.status_code == 415
    error = reply.json()["error"]
    assert "lz4" in error["message"] and "not supported" in error["message"]
    assert records_for(fake, api_key) == []


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_corrupt_compressed_body_is_refused_400(stack: Stack, fake: FakeProvider,
                                                api_key: str, coding: str) -> None:
    raw = json.dumps(chat_body()).encode()
    truncated = ENCODERS[coding](raw)[:-6]
    reply = post(stack, api_key, "/openai/v1/chat/completions", truncated,
                 {"content-encoding": coding})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_content_encoding"
    assert records_for(fake, api_key) == []


def test_stream_encoder_flushes_every_event() -> None:
    """The fake's gzip stream is decodable event by event (as recorded Anthropic streams
    are), not only at its end."""
    encoder = StreamEncoder("gzip")
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    for event in (b"event: a\ndata: {}\n\n", b"event: b\ndata: {}\n\n"):
        assert decoder.decompress(encoder.encode(event)) == event


def test_official_sdks_get_compressed_answers_by_default(stack: Stack, fake: FakeProvider,
                                                         api_key: str) -> None:
    """The SDKs' own accept-encoding: every call of this suite through Envoy is answered
    compressed, and settles exactly."""
    raw = openai_client(stack, api_key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["content-encoding"] in CODINGS
    assert raw.parse().usage is not None
    with anthropic_client(stack, api_key).messages.with_streaming_response.create(
            model=HAIKU, max_tokens=40, stream=True,
            messages=[{"role": "user", "content": "hi"}]) as streamed:
        assert streamed.headers["content-encoding"] in CODINGS
        assert b"message_stop" in b"".join(streamed.iter_bytes())
    settled_exactly(stack, fake, api_key, 2)
