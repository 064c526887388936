"""AWS Bedrock (`/bedrock/model/{modelId}/…`) through Envoy's TLS listener with boto3
1.44.8 `bedrock-runtime` (a Bedrock API key: boto3 sends bearer keys only over HTTPS) and
anthropic 2.15.0 `AnthropicBedrock`: Converse, ConverseStream, InvokeModel and
InvokeModelWithResponseStream settled exactly; a stream cut at its budget raised by both
SDKs; refusals boto3 does not retry; SigV4 client requests refused. Plus the eventstream
decoder and encoder (AWS's test vectors, every byte boundary) and the provider's rules,
without the stack."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import ssl
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import boto3
import botocore.exceptions
import httpx2
import pytest
from botocore.config import Config
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.billing import day_window
from tests.support.fake_provider import FakeProvider, RequestRecord
from tests.support.flood import spell
from tests.support.harness import Stack, wait_until
from tests.support.pki import ServerCertificate, server_certificate
from tokenfuse.extproc.request import _ambiguous_path
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.pools.secrets import PoolError, parse_pool_csv
from tokenfuse.providers import PROVIDERS
from tokenfuse.providers.base import RequestRejected
from tokenfuse.providers.eventstream import (
    CORRUPT_EVENT,
    EventStreamDecoder,
    encode_frame,
    event_frame,
    exception_frame,
)

BEDROCK = PROVIDERS["bedrock"]
INVOKE = BEDROCK.for_path("/model/m/invoke")
CLAUDE = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
NOVA = "amazon.nova-lite-v1:0"
#: nano-USD per token: LiteLLM 1.110.2's prices for these ids, in a prices file of the
#: test's own (input, output, cache read, cache write).
NANO = {CLAUDE: (1100, 5500, 110, 1375), NOVA: (60, 240, 15, 60)}
PRICES = {"unit": "USD per 1M tokens", "models": {
    f"bedrock/{CLAUDE}": {"provider": "bedrock", "mode": "chat", "input": "1.10",
                          "output": "5.50", "cache_read": "0.11", "cache_write": "1.375",
                          "max_output_tokens": 64000, "context_window": 200000},
    f"bedrock/{NOVA}": {"provider": "bedrock", "mode": "chat", "input": "0.06",
                        "output": "0.24", "cache_read": "0.015", "cache_write": "0.06",
                        "max_output_tokens": 10000, "context_window": 300000}}}
GRACE = 32
#: A pool of AWS credentials (the second with a session token, as STS issues them).
AWS_CREDENTIALS = [("AKIDPOOLONE00000001", "secret/one+abc", None),
                   ("AKIDPOOLTWO00000002", "secret-two", "FwoGZXIvYXdzEXAMPLETOKEN")]


# ------------------------------------------------------------------ eventstream framing

#: AWS's published vectors (botocore tests/unit/test_eventstream.py, also in
#: awslabs/amazon-transcribe-streaming-sdk): the encoder writes them byte for byte.
VECTORS = [
    ({}, b"", b"\x00\x00\x00\x10\x00\x00\x00\x00\x05\xc2H\xeb}\x98\xc8\xff"),
    ({}, b"test payload", b"\x00\x00\x00\x1c\x00\x00\x00\x00\xc02\xa5\xeatest payload\x076E\xf9"),
    ({"string": "foobar"}, b"",
     b"\x00\x00\x00 \x00\x00\x00\x10\xb9T\xe0\t\x06string\x07\x00\x06foobarL\xc53("),
    ({":message-type": "error", ":error-code": "code", ":error-message": "message"}, b"",
     b"\x00\x00\x00\x52\x00\x00\x00\x42\xbf\x23\x63\x7e\x0d:message-type\x07\x00\x05error"
     b"\x0b:error-code\x07\x00\x04code\x0e:error-message\x07\x00\x07message\x6b\x6c\xea\x3d"),
]


@pytest.mark.parametrize(("headers", "payload", "wire"), VECTORS)
def test_encoder_writes_aws_test_vectors(headers: dict, payload: bytes, wire: bytes) -> None:
    assert encode_frame(headers, payload) == wire
    buffer = EventStreamBuffer()
    buffer.add_data(wire)
    (message,) = list(buffer)
    assert message.headers == headers and message.payload == payload


def _stream_bytes() -> bytes:
    return b"".join([
        event_frame("messageStart", {"role": "assistant", "p": "abc"}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hé"}}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "llo"}}),
        event_frame("messageStop", {"stopReason": "end_turn"}),
        event_frame("metadata", {"usage": {"inputTokens": 5, "outputTokens": 2,
                                           "totalTokens": 7}, "metrics": {"latencyMs": 1}}),
        exception_frame("throttlingException", "stop"),
    ])


def _decode(data: bytes, cuts: list[int]) -> list[tuple[str, str, int]]:
    decoder = EventStreamDecoder()
    bounds = [0, *sorted(set(cuts)), len(data)]
    out = []
    for a, b in itertools.pairwise(bounds):
        out += decoder.feed(data[a:b])
    out += decoder.finish()
    return [(e.event, e.data, e.end) for e in out]


def test_decoder_same_events_at_every_byte_boundary() -> None:
    data = _stream_bytes()
    whole = _decode(data, [])
    assert [e[0] for e in whole] == ["messageStart", "contentBlockDelta", "contentBlockDelta",
                                     "messageStop", "metadata", "throttlingException"]
    assert whole[-1][2] == len(data) and json.loads(whole[-1][1]) == {"message": "stop"}
    for cut in range(1, len(data)):
        assert _decode(data, [cut]) == whole, cut
    assert _decode(data, list(range(1, len(data)))) == whole  # one byte at a time


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=600), max_size=12))
def test_decoder_any_chunking(cuts: list[int]) -> None:
    data = _stream_bytes()
    assert _decode(data, [c for c in cuts if c < len(data)]) == _decode(data, [])


def test_corrupt_frame_is_counted_a_token_per_byte_logged_and_forwarded(
        caplog: pytest.LogCaptureFixture) -> None:
    good = event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "a"}})
    bad = bytearray(good)
    bad[-6] ^= 1  # a payload byte: the message CRC fails
    data = good + bytes(bad) + good
    events = EventStreamDecoder().feed(data)
    assert [e.event for e in events] == ["contentBlockDelta", CORRUPT_EVENT]
    assert events[1].end == len(data)  # nothing after it is framed any more
    assert "undecodable eventstream frame" in caplog.text
    for provider in (BEDROCK, INVOKE):
        meter = StreamMeter(provider, False, provider.tokenizer(CLAUDE))
        metered = meter.feed(data[:len(good) + 5]) + meter.feed(data[len(good) + 5:], True)
        assert sum(e.output_tokens for e in metered[1:]) >= 2 * len(good)
        assert meter.take(metered[-1].end) == data  # forwarded as received: boto3 rejects it
    bad_prelude = bytearray(good)
    bad_prelude[2] ^= 1
    assert [e.event for e in EventStreamDecoder().feed(bytes(bad_prelude))] == [CORRUPT_EVENT]


def test_invoke_stream_chunks_are_unwrapped() -> None:
    inner = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "hi"}}
    frame = encode_frame({":event-type": "chunk", ":content-type": "application/json",
                          ":message-type": "event"}, json.dumps(
        {"bytes": base64.b64encode(json.dumps(inner).encode()).decode()}).encode())
    (event,) = INVOKE.stream_decoder().feed(frame)
    assert event.event == "content_block_delta" and json.loads(event.data) == inner
    assert INVOKE.stream_output(event.event, inner) == ["hi"]
    stop = {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 7, "outputTokenCount": 3}}
    usage = INVOKE.usage(stop)
    assert usage is not None and (usage.input, usage.output) == (7, 3)
    assert INVOKE.is_final_event("message_stop", "") and INVOKE.is_final_event(
        "throttlingException", "")


# ------------------------------------------------------------------ the provider alone


def test_model_ids_in_paths() -> None:
    body = {"messages": [{"role": "user", "content": [{"text": "hi"}]}],
            "inferenceConfig": {"maxTokens": 50}}
    for raw in ("us.anthropic.claude-haiku-4-5-20251001-v1%3A0", CLAUDE):
        call = BEDROCK.parse_request(f"/model/{raw}/converse-stream", body)
        assert (call.model, call.stream, call.max_output_tokens) == (CLAUDE, True, 50)
    arn = f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{CLAUDE}"
    encoded = arn.replace(":", "%3A").replace("/", "%2F")
    assert BEDROCK.parse_request(f"/model/{encoded}/converse", body).model == arn
    assert BEDROCK.price_ids(arn)[0] == ("bedrock", CLAUDE)
    # a geo profile without a price of its own: the dearest geo variant, never the base
    ids = [m for _, m in BEDROCK.price_ids("ca.anthropic.claude-x-v1:0")]
    assert ids[0] == "ca.anthropic.claude-x-v1:0" and "anthropic.claude-x-v1:0" not in ids
    assert BEDROCK.parse_request(f"/model/{NOVA}/converse", {"messages": []}
                                 ).max_output_tokens is None  # the clamp writes the max
    with pytest.raises(RequestRejected) as other:
        INVOKE.parse_request(f"/model/{NOVA}/invoke", {"messages": []})
    assert other.value.status == 404 and "Converse" in other.value.message
    for unmetered in ({"serviceTier": {"type": "priority"}},
                      {"performanceConfig": {"latency": "optimized"}}):
        with pytest.raises(RequestRejected) as premium:
            BEDROCK.parse_request(f"/model/{CLAUDE}/converse", {**body, **unmetered})
        assert premium.value.code == "unmetered_option"
    assert BEDROCK.parse_request(f"/model/{CLAUDE}/converse", {
        **body, "serviceTier": {"type": "flex"},
        "guardrailConfig": {"guardrailIdentifier": "g", "guardrailVersion": "1"}}).priced
    refused = BEDROCK.header_refusal({"x-amzn-bedrock-service-tier": "Priority"})
    assert refused is not None and refused.code == "unmetered_option"
    assert BEDROCK.header_refusal({"x-amzn-bedrock-service-tier": "default"}) is None
    for bad in ("/model/x/count-tokens", "/model/a%FFb/converse", "/foo"):
        with pytest.raises(RequestRejected):
            BEDROCK.parse_request(bad, body)


def test_escaped_slash_only_inside_a_model_id() -> None:
    arn = "arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2F" + CLAUDE
    path = f"/model/{arn}/converse"
    assert BEDROCK.escaped_slash_allowed(path)
    assert not _ambiguous_path("/bedrock" + path, True)
    with pytest.raises(RequestRejected):  # decoded once, a '%' is no model id
        BEDROCK.parse_request("/model/a%252Fb/converse", {"messages": []})
    for attack in ("/model/x%2F..%2F..%2Fadmin/converse", "/model/x/converse%2Fstream",
                   f"/model/{arn}/..%2Fconverse",
                   "/model/arn%3Aaws%3Abedrock%3A%3A%3Afoundation-model%2F..%2Fx/invoke"):
        allowed = BEDROCK.escaped_slash_allowed(attack)
        assert _ambiguous_path("/bedrock" + attack, allowed), attack
    assert _ambiguous_path("/openai/v1/chat%2Fcompletions", False)


def test_converse_usage_and_output() -> None:
    usage = BEDROCK.usage({"usage": {"inputTokens": 10, "outputTokens": 4, "totalTokens": 30,
                                     "cacheReadInputTokens": 12, "cacheWriteInputTokens": 4}})
    assert usage is not None
    assert (usage.input, usage.output, usage.cache_read, usage.cache_write) == (10, 4, 12, 4)
    by_ttl = BEDROCK.usage({"usage": {"inputTokens": 1, "outputTokens": 1,
                                      "cacheWriteInputTokens": 9, "cacheDetails": [
                                          {"ttl": "1h", "inputTokens": 7},
                                          {"ttl": "5m", "inputTokens": 2}]}})
    assert by_ttl is not None and (by_ttl.cache_write, by_ttl.cache_write_1h) == (2, 7)
    asks = {"messages": [{"role": "user", "content": [
        {"text": "x"}, {"cachePoint": {"type": "default", "ttl": "1h"}}]}]}
    assert BEDROCK.parse_request(f"/model/{CLAUDE}/converse", asks).long_cache_writes
    assert BEDROCK.stream_output("contentBlockDelta", {"delta": {"toolUse": {"input": "{\"a"}}}
                                 ) == ['{"a']
    thinking = {"messages": [], "additionalModelRequestFields": {
        "thinking": {"type": "enabled", "budget_tokens": 2000}}}
    call = BEDROCK.parse_request(f"/model/{CLAUDE}/converse", thinking)
    assert call.hidden_output
    capped = BEDROCK.with_output_cap(thinking, call, 1500)
    assert capped["inferenceConfig"] == {"maxTokens": 1500}
    assert capped["additionalModelRequestFields"]["thinking"]["budget_tokens"] == 1499


# ------------------------------------------------------------------ through Envoy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    return server_certificate(tmp_path_factory.mktemp("bedrock-pki"))


@pytest.fixture(scope="module")
def bedrock_stack(fake: FakeProvider, pki: ServerCertificate,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("bedrock")
    prices = workdir / "prices.json"
    prices.write_text(json.dumps(PRICES))
    pools = workdir / "pools"
    pools.mkdir()
    (pools / "bedrock-aws.csv").write_text(
        "aws_access_key_id,aws_secret_access_key,region,session_token,label\n"
        + "".join(f"{ak},{sk},us-east-1,{token or ''},aws-{i}\n"
                  for i, (ak, sk, token) in enumerate(AWS_CREDENTIALS)))
    s = Stack(fake.base_url, {"TOKENFUSE_PRICES_FILE": str(prices),
                              "TOKENFUSE_TLS_CERT_FILE": str(pki.cert),
                              "TOKENFUSE_TLS_KEY_FILE": str(pki.key),
                              "TOKENFUSE_POOLS_DIR": str(pools),
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000",
                              "TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300"}).start()
    imported = s.cli("keys", "import", "--pool", "bedrock-aws", "--provider", "bedrock",
                     str(pools / "bedrock-aws.csv"))
    assert imported.returncode == 0, imported.stderr
    fake.aws_credentials.update({ak: (sk, token) for ak, sk, token in AWS_CREDENTIALS})
    yield s
    s.cleanup()


@pytest.fixture
def key() -> str:
    return "ABSK" + uuid.uuid4().hex


def runtime(stack: Stack, pki: ServerCertificate, key: str, monkeypatch: pytest.MonkeyPatch,
            **headers: str) -> Any:
    """boto3's bedrock-runtime with a Bedrock API key (AWS_BEARER_TOKEN_BEDROCK)."""
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", key)
    client = boto3.client("bedrock-runtime", endpoint_url=stack.envoy.base_url + "/bedrock",
                          region_name="us-east-1", verify=str(pki.ca),
                          aws_access_key_id="unused", aws_secret_access_key="unused")

    def add_headers(request: Any, **_: Any) -> None:
        for name, value in headers.items():
            request.headers[name] = value

    client.meta.events.register("before-send.bedrock-runtime.*", add_headers)
    return client


def claude(stack: Stack, pki: ServerCertificate, key: str, **headers: str
           ) -> anthropic.AnthropicBedrock:
    return anthropic.AnthropicBedrock(
        base_url=stack.envoy.base_url + "/bedrock", aws_region="us-east-1", api_key=key,
        max_retries=0, default_headers=headers,
        http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(pki.ca))))


spent = day_window


def records(fake: FakeProvider, key: str) -> list[RequestRecord]:
    return [r for r in list(fake.records) if r.api_key == key]


def bill(fake: FakeProvider, key: str, completed_only: bool = True) -> int:
    total = 0
    for r in records(fake, key):
        if r.usage is None or not (r.completed or not completed_only):
            continue
        i, o, cr, cw = NANO[r.usage.model]
        u = r.usage
        total += (u.input_tokens * i + u.output_tokens * o + u.cached_input_tokens * cr
                  + u.cache_creation_input_tokens * cw)
    return total


def settled(stack: Stack, fake: FakeProvider, key: str, n: int = 1) -> dict:
    wait_until(lambda: len([r for r in records(fake, key) if r.finished]) >= n,
               what="the fake's records")
    wait_until(lambda: spent(stack, key)["reserved_nano_usd"] == 0, what="the settlement")
    return spent(stack, key)


MESSAGES = [{"role": "user", "content": [{"text": "why is the sky blue?"}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_boto3_converse_settled_exactly(bedrock_stack: Stack, pki: ServerCertificate,
                                        fake: FakeProvider, key: str, stream: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    client = runtime(bedrock_stack, pki, key, monkeypatch, **{
        "x-fake-output-tokens": "12", "x-fake-cache-read": "3"})
    if stream:
        events = list(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"])
        text = "".join(e["contentBlockDelta"]["delta"].get("text", "") for e in events
                       if "contentBlockDelta" in e)
        usage = events[-1]["metadata"]["usage"]
        assert "messageStop" in events[-2]
    else:
        reply = client.converse(modelId=CLAUDE, messages=MESSAGES, system=[{"text": "brief"}])
        text = reply["output"]["message"]["content"][0]["text"]
        usage = reply["usage"]
    assert usage["outputTokens"] == 12 and usage["cacheReadInputTokens"] == 3 and text
    day = settled(bedrock_stack, fake, key)
    (record,) = records(fake, key)
    assert "%3A" in record.path  # boto3's encoding, forwarded as sent
    assert day["spent_nano_usd"] == bill(fake, key) == (
        usage["inputTokens"] * 1100 + 12 * 5500 + 3 * 110)
    # No maxTokens: a call gets the model's maximum written in (Converse's default is that
    # too); a stream is metered as it goes.
    assert record.cap == (None if stream else 64000)


def test_boto3_arn_model_id(bedrock_stack: Stack, pki: ServerCertificate,
                            fake: FakeProvider, key: str,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An inference-profile ARN (`%2F` in the model segment) is priced as its model; the
    fake serves the profile id only, so its 404 is the provider's own."""
    client = runtime(bedrock_stack, pki, key, monkeypatch)
    arn = f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{CLAUDE}"
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.converse(modelId=arn, messages=MESSAGES, inferenceConfig={"maxTokens": 5})
    wait_until(lambda: records(fake, key), what="the fake's record")
    assert "inference-profile%2F" in records(fake, key)[0].path
    assert spent(bedrock_stack, key)["spent_nano_usd"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_boto3_invoke_settled_exactly(bedrock_stack: Stack, pki: ServerCertificate,
                                      fake: FakeProvider, key: str, stream: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = runtime(bedrock_stack, pki, key, monkeypatch, **{"x-fake-output-tokens": "7"})
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100,
                       "messages": [{"role": "user", "content": "hello"}]})
    if stream:
        reply = client.invoke_model_with_response_stream(modelId=CLAUDE, body=body)
        events = [json.loads(e["chunk"]["bytes"]) for e in reply["body"]]
        assert events[-1]["type"] == "message_stop"
        output = events[-1]["amazon-bedrock-invocationMetrics"]["outputTokenCount"]
    else:
        reply = client.invoke_model(modelId=CLAUDE, body=body,
                                    contentType="application/json")
        output = json.loads(reply["body"].read())["usage"]["output_tokens"]
    assert output == 7
    day = settled(bedrock_stack, fake, key)
    assert day["spent_nano_usd"] == bill(fake, key) > 7 * 5500
    assert records(fake, key)[0].cap == 100


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_bedrock_settled_exactly(bedrock_stack: Stack, pki: ServerCertificate,
                                           fake: FakeProvider, key: str,
                                           stream: bool) -> None:
    client = claude(bedrock_stack, pki, key, **{"x-fake-output-tokens": "9",
                                               "x-fake-reasoning-tokens": "1500"})
    kwargs: dict[str, Any] = {"model": CLAUDE, "max_tokens": 3000, "messages": [
        {"role": "user", "content": "think first"}],
        "thinking": {"type": "enabled", "budget_tokens": 2000}}
    if stream:
        with client.messages.stream(**kwargs) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert message.usage.output_tokens == 1509  # thinking billed, shown summarized
    day = settled(bedrock_stack, fake, key)
    (record,) = records(fake, key)
    assert ":0/invoke" in record.path  # AnthropicBedrock's literal ':'
    assert day["spent_nano_usd"] == bill(fake, key)


def test_stream_cut_raises_in_boto3(bedrock_stack: Stack, pki: ServerCertificate,
                                    fake: FakeProvider, key: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 300 * 5500
    assert bedrock_stack.cli("budget", "set", "--key", key, "--daily",
                             f"0.{budget:09d}").returncode == 0
    client = runtime(bedrock_stack, pki, key, monkeypatch, **{
        "x-fake-output-tokens": "5000", "x-fake-chunk-delay-ms": "2"})
    delivered = 0
    with pytest.raises(botocore.exceptions.EventStreamError) as raised:
        for event in client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"]:
            delivered += "contentBlockDelta" in event
    assert raised.value.response["Error"]["Code"] == "throttlingException"
    assert "budget exhausted" in str(raised.value)
    assert 20 < delivered <= 300
    print(f"\nbedrock converse-stream: delivered {delivered} of a 300-token budget", end=" ")
    wait_until(lambda: any(r.finished for r in records(fake, key)),
               what="the provider to see the disconnect")
    (record,) = records(fake, key)
    assert not record.completed and record.output_tokens_sent <= delivered + GRACE * 2
    day = spent(bedrock_stack, key)
    assert bill(fake, key, completed_only=False) <= day["spent_nano_usd"] <= budget
    assert day["reserved_nano_usd"] == 0


def test_invoke_stream_cut_raises_in_boto3(bedrock_stack: Stack, pki: ServerCertificate,
                                           fake: FakeProvider, key: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same exception frame ends InvokeModelWithResponseStream (a member of its
    ResponseStream union too): EventStreamError with tokenfuse's message."""
    budget = 300 * 5500
    assert bedrock_stack.cli("budget", "set", "--key", key, "--daily",
                             f"0.{budget:09d}").returncode == 0
    client = runtime(bedrock_stack, pki, key, monkeypatch, **{"x-fake-chunk-delay-ms": "2"})
    body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5000,
                       "messages": [{"role": "user", "content": "long story"}]})
    chunks = 0
    with pytest.raises(botocore.exceptions.EventStreamError) as raised:
        for _ in client.invoke_model_with_response_stream(modelId=CLAUDE, body=body)["body"]:
            chunks += 1
    assert raised.value.response["Error"]["Code"] == "throttlingException"
    assert "budget exhausted" in str(raised.value) and chunks > 20
    wait_until(lambda: any(r.finished for r in records(fake, key)),
               what="the provider to see the disconnect")
    assert not records(fake, key)[0].completed
    day = spent(bedrock_stack, key)
    assert bill(fake, key, completed_only=False) <= day["spent_nano_usd"] <= budget


def test_stream_cut_raises_in_anthropic_bedrock(bedrock_stack: Stack, pki: ServerCertificate,
                                                fake: FakeProvider, key: str) -> None:
    budget = 300 * 5500
    assert bedrock_stack.cli("budget", "set", "--key", key, "--daily",
                             f"0.{budget:09d}").returncode == 0
    client = claude(bedrock_stack, pki, key, **{"x-fake-chunk-delay-ms": "2"})
    with pytest.raises(anthropic.APIStatusError) as raised, client.messages.stream(
            model=CLAUDE, max_tokens=5000,
            messages=[{"role": "user", "content": "long story"}]) as s:
        for _ in s.text_stream:
            pass
    assert "budget exhausted" in str(raised.value)
    wait_until(lambda: any(r.finished for r in records(fake, key)),
               what="the provider to see the disconnect")
    assert not records(fake, key)[0].completed
    day = spent(bedrock_stack, key)
    assert bill(fake, key, completed_only=False) <= day["spent_nano_usd"] <= budget


def test_refusals_are_raised_once(bedrock_stack: Stack, pki: ServerCertificate,
                                  fake: FakeProvider, key: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Budget and loop refusals in a shape boto3 raises as a modeled error, with a status
    it does not retry: each refused call is one request."""
    sent: list[str] = []
    client = runtime(bedrock_stack, pki, key, monkeypatch)
    client.meta.events.register("before-send.bedrock-runtime.*",
                                lambda request, **_: sent.append(request.url))
    with pytest.raises(client.exceptions.ValidationException) as unknown:
        client.converse(modelId="meta.llama9-v1:0", messages=MESSAGES)
    assert "has no price in tokenfuse" in str(unknown.value) and len(sent) == 1
    with pytest.raises(client.exceptions.ValidationException) as invoked:
        client.invoke_model(modelId=NOVA, body=b'{"inputText": "hi"}')
    assert "Converse" in str(invoked.value)
    with pytest.raises(client.exceptions.ValidationException) as premium:
        client.invoke_model(modelId=CLAUDE, serviceTier="priority", body=json.dumps(
            {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5,
             "messages": [{"role": "user", "content": "hi"}]}))
    assert "does not meter" in str(premium.value)
    for _ in range(5):
        client.converse(modelId=NOVA, messages=MESSAGES, inferenceConfig={"maxTokens": 3})
    sent.clear()
    with pytest.raises(client.exceptions.ServiceQuotaExceededException) as looped:
        client.converse(modelId=NOVA, messages=MESSAGES, inferenceConfig={"maxTokens": 3})
    assert "identical request" in str(looped.value) and len(sent) == 1
    meta = looped.value.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == 400  # not a 429: boto3 would retry it twice
    assert meta["HTTPHeaders"]["x-amzn-errortype"] == (
        "ServiceQuotaExceededException:http://internal.amazon.com/coral/com.amazon.bedrock/")
    assert bedrock_stack.cli("budget", "set", "--key", key, "--daily",
                             "0.000001").returncode == 0
    sent.clear()
    with pytest.raises(client.exceptions.ServiceQuotaExceededException) as broke:
        client.converse_stream(modelId=CLAUDE, messages=[
            {"role": "user", "content": [{"text": "another"}]}])
    assert "budget exhausted" in str(broke.value) and len(sent) == 1
    assert len([r for r in records(fake, key) if r.method == "POST"]) == 5


def test_sigv4_client_request_is_refused(bedrock_stack: Stack, pki: ServerCertificate,
                                         fake: FakeProvider,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK", raising=False)
    client = boto3.client("bedrock-runtime", endpoint_url=bedrock_stack.envoy.base_url
                          + "/bedrock", region_name="us-east-1", verify=str(pki.ca),
                          aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                          config=Config(signature_version="v4", retries={"max_attempts": 1}))
    before = len(fake.records)
    with pytest.raises(client.exceptions.ValidationException) as refused:
        client.converse(modelId=CLAUDE, messages=MESSAGES)
    assert "SigV4" in str(refused.value) and "Bedrock API key" in str(refused.value)
    assert len(fake.records) == before


def test_corrupt_frame_reaches_the_client_as_an_error(
        bedrock_stack: Stack, pki: ServerCertificate, fake: FakeProvider, key: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame whose CRC fails is not forwarded as valid: boto3 raises on it, and the call
    is charged what was counted (plus the grace), not nothing."""
    client = runtime(bedrock_stack, pki, key, monkeypatch, **{
        "x-fake-output-tokens": "10", "x-fake-corrupt-frame": "3"})
    with pytest.raises(ChecksumMismatch):
        list(client.converse_stream(modelId=CLAUDE, messages=MESSAGES)["stream"])
    day = settled(bedrock_stack, fake, key)
    # The fake may have finished writing, or seen the client hang up: either way no less.
    assert day["spent_nano_usd"] >= bill(fake, key, completed_only=False) > 0


FLOOD_REQUESTS = 300
FLOOD_BUDGET = 10_000_000  # $0.01: about 40 of these calls


def test_a_flood_on_one_key_is_held_to_its_budget(bedrock_stack: Stack,
                                                  pki: ServerCertificate,
                                                  fake: FakeProvider, key: str) -> None:
    """300 concurrent AsyncAnthropicBedrock calls on one key: not a nano-dollar over."""
    assert bedrock_stack.cli("budget", "set", "--key", key, "--daily",
                             f"0.{FLOOD_BUDGET:09d}").returncode == 0

    async def flood() -> list[str]:
        client = anthropic.AsyncAnthropicBedrock(
            base_url=bedrock_stack.envoy.base_url + "/bedrock", aws_region="us-east-1",
            api_key=key, max_retries=0, timeout=120, http_client=httpx2.AsyncClient(
                verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=120))

        async def one(i: int) -> str:
            try:
                await client.messages.create(model=CLAUDE, max_tokens=40, messages=[
                    {"role": "user", "content": f"flood request {spell(i)}"}])
                return "allowed"
            except anthropic.APIStatusError as exc:
                return f"status_{exc.status_code}"

        try:
            return list(await asyncio.gather(*(one(i) for i in range(FLOOD_REQUESTS))))
        finally:
            await client.close()

    outcomes = asyncio.run(flood())
    allowed, refused = outcomes.count("allowed"), outcomes.count("status_402")
    print(f"\nbedrock flood: {allowed} allowed, {refused} refused, billed "
          f"{bill(fake, key)} of {FLOOD_BUDGET}", end=" ")
    assert allowed + refused == FLOOD_REQUESTS, sorted(set(outcomes))
    day = settled(bedrock_stack, fake, key, allowed)
    assert len(records(fake, key)) == allowed  # the refused never reached the provider
    assert day["spent_nano_usd"] == bill(fake, key) <= FLOOD_BUDGET
    assert day["spent_nano_usd"] >= FLOOD_BUDGET // 2


def test_pool_csv_with_aws_credentials() -> None:
    keys = parse_pool_csv("aws_access_key_id,aws_secret_access_key,region,session_token\n"
                          "AKID1,sec/ret,eu-west-1,\nAKID2,s2,us-east-1,TOKEN\n")
    assert [k.secret for k in keys] == ["aws4:AKID1:sec/ret:eu-west-1",
                                        "aws4:AKID2:s2:us-east-1:TOKEN"]
    assert BEDROCK.secret_alias(keys[0].secret) == "aws4:AKID1"
    assert BEDROCK.is_signing_secret(keys[0].secret) and not BEDROCK.is_signing_secret("k")
    headers = {":method": "POST", ":authority": "bedrock-runtime.eu-west-1.amazonaws.com",
               ":path": f"/model/{CLAUDE.replace(':', '%3A')}/converse",
               "content-type": "application/json"}
    signed, _ = BEDROCK.pooled_signature(keys[1].secret, headers, b"{}")
    auth = dict(signed)["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKID2/")
    assert "/us-east-1/bedrock/" in auth
    assert "x-amz-security-token" in auth and dict(signed)["x-amz-security-token"] == "TOKEN"
    assert BEDROCK.credential_alias({"authorization": auth}) == "aws4:AKID2"
    with pytest.raises(PoolError):
        parse_pool_csv("aws_access_key_id,aws_secret_access_key,region\nAKID,,us-east-1\n")


def test_pooled_aws_credentials_sign_each_attempt_and_fail_over(
        bedrock_stack: Stack, pki: ServerCertificate, fake: FakeProvider,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway key bound to a pool of AWS credentials: the upstream stage signs every
    attempt with SigV4 over the final body (the clamp's maxTokens included) and the
    provider's host; the fake verifies each signature. One credential failing 403 is
    failed over; the client sees no error and is charged once, exactly."""
    vkey = bedrock_stack.cli("vkey", "create", "--name", "bedrock-app", "--pool",
                             "bedrock-aws").stdout.strip()
    assert vkey.startswith("tfk-")
    assert bedrock_stack.cli("budget", "set", "--key", vkey, "--daily", "5").returncode == 0
    (failing, _, _), (healthy, _, _) = AWS_CREDENTIALS
    fake.key_failures[failing] = (403, 30)
    since = len(fake.records)
    try:
        client = runtime(bedrock_stack, pki, vkey, monkeypatch, **{"x-fake-output-tokens": "4"})
        answers = [client.converse(modelId=NOVA, messages=[
            {"role": "user", "content": [{"text": f"pooled question {word}"}]}]
        )["output"]["message"]["content"][0]["text"] for word in ("one", "two", "three")]
        events = list(client.converse_stream(modelId=CLAUDE, messages=[
            {"role": "user", "content": [{"text": "pooled stream"}]}])["stream"])
        assert "metadata" in events[-1]
        with claude(bedrock_stack, pki, vkey).messages.stream(
                model=CLAUDE, max_tokens=20,
                messages=[{"role": "user", "content": "pooled invoke"}]) as s:
            answers.append(s.get_final_text())
    finally:
        del fake.key_failures[failing]
    assert all(answers)
    wait_until(lambda: len(fake.records) - since >= 6 and all(
        r.finished for r in list(fake.records)[since:]), what="the fake's records")
    posts = [r for r in list(fake.records)[since:] if r.method == "POST"]
    assert all(r.headers["authorization"].startswith("AWS4-HMAC-SHA256") for r in posts)
    assert [r.status for r in posts if r.api_key == failing] == [403]  # then set aside
    assert sum(1 for r in posts if r.api_key == healthy and r.status == 200) == 5
    assert all(r.headers.get("x-amz-security-token") == AWS_CREDENTIALS[1][2]
               for r in posts if r.api_key == healthy)
    assert not any(vkey in str(r.headers) for r in posts)  # the gateway key stayed inside
    assert all(r.cap is not None for r in posts if r.status == 200 and not r.stream)
    day = settled(bedrock_stack, fake, vkey, 0)
    assert day["spent_nano_usd"] == bill(fake, healthy) > 0
    # The set-aside credential is probed back with a signed ListAsyncInvokes (free).
    wait_until(lambda: any(r.method == "GET" and r.api_key == failing and r.status == 200
                           for r in list(fake.records)[since:]),
               what="a signed probe of the recovered credential")


def test_converse_stream_hidden_thinking_settled_exactly(
        bedrock_stack: Stack, pki: ServerCertificate, fake: FakeProvider, key: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Claude's thinking through Converse: billed in full, shown summarized in
    reasoningContent deltas; the call asked for thinking, so its cap is written in and
    the spend is the bill."""
    client = runtime(bedrock_stack, pki, key, monkeypatch, **{
        "x-fake-output-tokens": "6", "x-fake-reasoning-tokens": "1200"})
    events = list(client.converse_stream(
        modelId=CLAUDE, messages=MESSAGES, inferenceConfig={"maxTokens": 4000},
        additionalModelRequestFields={"thinking": {"type": "enabled",
                                                   "budget_tokens": 2000}})["stream"])
    shown = [e for e in events if "reasoningContent" in e.get("contentBlockDelta", {}).get(
        "delta", {})]
    assert 0 < len(shown) < 1200
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 1206
    day = settled(bedrock_stack, fake, key)
    assert day["spent_nano_usd"] == bill(fake, key) > 1206 * 5500
    assert records(fake, key)[0].cap == 4000
