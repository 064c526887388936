"""Recorded real responses of api.openai.com and api.anthropic.com, replayed byte for byte
behind tokenfuse (tests/fixtures/recorded/README.md says where each was recorded).

Each call goes through Envoy with the official SDK, sending the request of the recording;
the upstream answers with the recorded bytes (gzip where the provider sent gzip). The
expected spend is the recording's own usage priced at the list prices, computed here from
the recorded bytes with a parser of this file's own, so a mis-read of the real wire format
by tokenfuse shows as a wrong bill.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import brotli
import httpx
import openai
import pytest
import zstandard

from tests.conftest import anthropic_client, openai_client
from tests.support.harness import Stack, wait_until
from tests.support.replay_upstream import Recording, ReplayUpstream, load
from tests.support.replay_upstream import names as all_names
from tokenfuse.pricing import ModelPrice, PriceTable, TokenUsage, cost_nano

PRICES = PriceTable.load()
RESPONSES_ENDS = ("response.completed", "response.incomplete")
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default
#: Anthropic web search: $10 per 1,000 searches (docs.anthropic.com, web search tool pricing).
WEB_SEARCH_NANO = 10_000_000
#: Used when a recording's model has no price in the table (a retired model): same list
#: prices as the recorded one where possible.
FALLBACK_MODEL = {"claude-sonnet-4-20250514": "claude-sonnet-4-5"}


def names() -> list[str]:
    """This module's recordings (the cloud providers' are tests/test_recorded_cloud.py's)."""
    return [n for n in all_names() if load(n).meta["provider"] in ("anthropic", "openai")]


@dataclass(frozen=True)
class Bill:
    """What the provider bills a recording for, in its own terms."""

    input: int = 0  # uncached input
    output: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    web_searches: int = 0

    def nano(self, price: ModelPrice) -> int:
        """List price, rounded up once; 1-hour cache writes cost 2x the input price
        (docs.anthropic.com, prompt caching pricing)."""
        micro = (self.input * price.input + self.output * price.output
                 + self.cache_read * price.cache_read + self.cache_write_5m * price.cache_write
                 + self.cache_write_1h * 2 * price.input)
        return -(-micro // 1_000_000) + self.web_searches * WEB_SEARCH_NANO


# ------------------------------------------------------- reading the recordings, our way
def sse_events(raw: bytes) -> Iterator[tuple[str, str]]:
    """(event name, data) of each event of a recorded stream."""
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = "", []
        for line in block.decode().split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            yield name, "\n".join(data)


def anthropic_bill(usage: dict[str, Any]) -> Bill:
    split = usage.get("cache_creation") or {}
    one_hour = split.get("ephemeral_1h_input_tokens") or 0
    searches = (usage.get("server_tool_use") or {}).get("web_search_requests") or 0
    return Bill(input=usage["input_tokens"], output=usage["output_tokens"],
                cache_read=usage.get("cache_read_input_tokens") or 0,
                cache_write_5m=(usage.get("cache_creation_input_tokens") or 0) - one_hour,
                cache_write_1h=one_hour, web_searches=searches)


def recorded_bill(rec: Recording) -> Bill:
    raw = rec.decoded
    if rec.meta["provider"] == "anthropic":
        if not rec.is_stream:
            return anthropic_bill(json.loads(raw)["usage"])
        usage: dict[str, Any] = {}
        for _name, data in sse_events(raw):
            event = json.loads(data)
            if event["type"] == "message_start":
                usage.update(event["message"]["usage"])
            elif event["type"] == "message_delta":  # cumulative: the later counts win
                usage.update({k: v for k, v in event["usage"].items() if v is not None})
        return anthropic_bill(usage)
    if rec.meta["request"]["uri"].endswith("/responses"):
        done = [json.loads(d) for n, d in sse_events(raw) if n in RESPONSES_ENDS]
        usage = done[-1]["response"]["usage"]
        cached = usage["input_tokens_details"]["cached_tokens"]
        return Bill(input=usage["input_tokens"] - cached, output=usage["output_tokens"],
                    cache_read=cached)
    if rec.is_stream:
        chunks = [json.loads(d) for _n, d in sse_events(raw) if d != "[DONE]"]
        usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    else:
        usage = json.loads(raw)["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Bill(input=usage["prompt_tokens"] - cached, output=usage["completion_tokens"],
                cache_read=cached)


def test_fixtures_are_the_recorded_bytes() -> None:
    """Each body is what its sidecar says was recorded (nothing re-encoded on the way)."""
    for name in names():
        rec = load(name)
        assert hashlib.sha256(rec.body).hexdigest() == rec.meta["response"]["body_sha256"]
        assert rec.meta["source"]["commit"] in rec.meta["source"]["url"]
        assert rec.decoded  # a recorded gzip body is one complete gzip stream


def test_bill_agrees_with_tokenfuse_pricing() -> None:
    """The test's price arithmetic is tokenfuse's `cost_nano` (so a difference in the
    tests below is a mis-read of the wire, not arithmetic)."""
    for name in names():
        rec = load(name)
        bill = recorded_bill(rec)
        price = PRICES.lookup(model_for(rec))
        assert price is not None
        usage = TokenUsage(input=bill.input, output=bill.output, cache_read=bill.cache_read,
                           cache_write=bill.cache_write_5m, cache_write_1h=bill.cache_write_1h)
        assert bill.nano(price) == cost_nano(price, usage), name


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def upstream() -> Iterator[ReplayUpstream]:
    server = ReplayUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replay_stack(upstream: ReplayUpstream) -> Iterator[Stack]:
    stack = Stack(upstream.base_url).start()
    yield stack
    stack.cleanup()


def model_for(rec: Recording) -> str:
    """The recording's model, or a priced stand-in when the table has no price for it."""
    model = str(rec.meta["model"])
    if PRICES.lookup(model) is None:
        return FALLBACK_MODEL[model]
    return model


def day(stack: Stack, key: str) -> dict[str, int]:
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return doc["windows"]["day"]


def request_of(rec: Recording) -> dict[str, Any]:
    return {**rec.meta["request"]["body"], "model": model_for(rec)}


def sdk_call(method: Any, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """`method(**body)`; fields the installed SDK no longer takes as arguments (its newest
    `messages.create` has no `temperature`) go as they were recorded, in `extra_body`."""
    known = inspect.signature(method).parameters
    extra = {k: v for k, v in body.items() if k not in known}
    args = {k: v for k, v in body.items() if k in known}
    return method(**args, extra_headers=headers, **({"extra_body": extra} if extra else {}))


def call_sdk(stack: Stack, key: str, rec: Recording, headers: dict[str, str]) -> Any:
    """Send the recorded request with the official SDK; return what the SDK parsed."""
    body = request_of(rec)
    if rec.meta["provider"] == "anthropic":
        client = anthropic_client(stack, key)
        if not rec.is_stream:
            return sdk_call(client.messages.create, body, headers)
        body.pop("stream")
        messages = client.beta.messages if "beta=true" in rec.meta["request"]["uri"] \
            else client.messages
        with sdk_call(messages.stream, body, headers) as stream:
            return stream.get_final_message()
    client_o = openai_client(stack, key)
    if rec.meta["request"]["uri"].endswith("/responses"):
        events = list(sdk_call(client_o.responses.create, body, headers))
        assert events[-1].type in RESPONSES_ENDS
        return events[-1].response
    if rec.is_stream:
        return list(sdk_call(client_o.chat.completions.create, body, headers))
    return sdk_call(client_o.chat.completions.create, body, headers)


def parsed_usage(rec: Recording, answer: Any) -> tuple[int, int]:
    """(input, output) tokens as the SDK read them from the answer."""
    if rec.meta["provider"] == "anthropic":
        return answer.usage.input_tokens, answer.usage.output_tokens
    if rec.meta["request"]["uri"].endswith("/responses"):
        return answer.usage.input_tokens, answer.usage.output_tokens
    usage = answer[-1].usage if isinstance(answer, list) else answer.usage
    return usage.prompt_tokens, usage.completion_tokens


#: Recordings whose reported usage is not a bill (see the test of each).
NOT_A_BILL = {"openai_responses_stream_incomplete"}
BILLED = [name for name in names() if name not in NOT_A_BILL]
CASES = [pytest.param(name, "recorded", id=f"{name}-recorded") for name in BILLED] + [
    pytest.param(name, "gzip", id=f"{name}-gzip") for name in BILLED if not load(name).coding]


@pytest.mark.parametrize(("name", "upstream_coding"), CASES)
def test_recorded_response_is_billed_exactly(replay_stack: Stack, upstream: ReplayUpstream,
                                             api_key: str, name: str,
                                             upstream_coding: str) -> None:
    rec = load(name)
    bill = recorded_bill(rec)
    headers = {"x-replay": name}
    if upstream_coding == "gzip":
        headers["x-replay-gzip"] = "1"  # an upstream compressing although asked not to
    answer = call_sdk(replay_stack, api_key, rec, headers)

    # The SDK parsed the answer, with the recording's usage.
    sdk_in, sdk_out = parsed_usage(rec, answer)
    assert sdk_out == bill.output
    if rec.meta["provider"] == "openai":
        assert sdk_in == bill.input + bill.cache_read  # prompt_tokens include cached ones
    else:
        assert sdk_in == bill.input  # input_tokens exclude cache reads and writes
    # The upstream got the priced request, asked for identity.
    seen = upstream.for_fixture(name)[-1]
    assert seen.headers.get("Accept-Encoding") == "identity"
    assert seen.json()["model"] == model_for(rec)
    wait_until(lambda: seen.completed, what="the replay's end")  # it trails the client's last byte
    # Recorded spend is the provider's bill, to the nano-dollar; nothing stays reserved.
    price = PRICES.lookup(model_for(rec))
    assert price is not None
    window = day(replay_stack, api_key)
    assert window["reserved_nano_usd"] == 0
    assert window["spent_nano_usd"] == bill.nano(price), (bill, window)


def settlements(stack: Stack) -> dict[str, float]:
    """tokenfuse_settlements_total by basis, from the processor's metrics."""
    out: dict[str, float] = {}
    for line in stack.processor.metrics().splitlines():
        if line.startswith("tokenfuse_settlements_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('basis="', 1)[1].split('"', 1)[0]] = float(value)
    return out


#: The recorded gpt-4o stream is the case of issue 12 "Provider usage is the bill" in
#: English: its 100 deltas are 102 cl100k tokens (100 in o200k, the bill).
STREAMS = [n for n in BILLED if load(n).is_stream]


@pytest.mark.parametrize("name", STREAMS)
def test_completed_recorded_stream_settles_to_its_usage(replay_stack: Stack,
                                                        api_key: str, name: str) -> None:
    """A recorded stream that reached its end is settled to its usage, not to a count."""
    before = settlements(replay_stack)
    call_sdk(replay_stack, api_key, load(name), {"x-replay": name})
    after = settlements(replay_stack)
    grew = {basis: after[basis] - before.get(basis, 0) for basis in after
            if after[basis] != before.get(basis, 0)}
    assert grew == {"usage": 1}


def test_usage_chunk_tokenfuse_asked_for_is_hidden(replay_stack: Stack,
                                                   upstream: ReplayUpstream,
                                                   api_key: str) -> None:
    """A client that did not ask for stream usage: tokenfuse asks, and removes the real
    usage-only chunk (`choices: []` after chunks that all carry `"usage": null`) from
    what the client sees, billing it all the same."""
    rec = load("openai_chat_stream_usage")
    body = {k: v for k, v in request_of(rec).items() if k != "stream_options"}
    chunks = list(openai_client(replay_stack, api_key).chat.completions.create(
        **body, extra_headers={"x-replay": rec.name}))
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert upstream.for_fixture(rec.name)[-1].json()["stream_options"] == {
        "include_usage": True}
    price = PRICES.lookup(model_for(rec))
    assert price is not None
    assert day(replay_stack, api_key)["spent_nano_usd"] == recorded_bill(rec).nano(price)


def test_zero_usage_of_an_incomplete_response_is_not_its_bill(
        replay_stack: Stack, upstream: ReplayUpstream, api_key: str) -> None:
    """Recorded (gpt-4o, July 2025): a Responses stream stopped by `max_output_tokens` 16
    streams 16 deltas, then `response.incomplete` with usage input 0, output 0. A response
    cut by its output cap generated that output: the zeros are no bill, so the stream is
    charged what was counted (at least those 16 tokens), not nothing."""
    rec = load("openai_responses_stream_incomplete")
    assert recorded_bill(rec) == Bill()  # what the provider reported
    answer = call_sdk(replay_stack, api_key, rec, {"x-replay": rec.name})
    assert answer.status == "incomplete"
    assert upstream.for_fixture(rec.name)[-1].completed
    price = PRICES.lookup(model_for(rec))
    assert price is not None
    window = day(replay_stack, api_key)
    assert window["reserved_nano_usd"] == 0
    assert window["spent_nano_usd"] >= cost_nano(price, TokenUsage(output=16))
    print(f"\ncharged {window['spent_nano_usd']} nano-USD (the recorded usage: 0)", end=" ")


# ---------------------------------------------------------------------------------- cuts
def estimate_of(stack: Stack, key: str, rec: Recording) -> int:
    """tokenfuse's estimate for the recorded request (input + the output it reserves
    first), read from the 402 it answers under a 1-nano-dollar budget."""
    assert stack.cli("budget", "set", "--key", key, "--daily", "0.000000001").returncode == 0
    with pytest.raises((anthropic.APIStatusError, openai.APIStatusError)) as refused:
        call_sdk(stack, key, rec, {"x-replay": rec.name})
    assert refused.value.status_code == 402
    return _find(refused.value.response.json(), "request_estimate_nano_usd")


def input_nano_of(stack: Stack, key: str, rec: Recording) -> int:
    """The input part of tokenfuse's estimate of a recorded stream (a stream reserves
    its input plus `TOKENFUSE_STREAM_INITIAL_TOKENS` of output, 256, capped by max_tokens)."""
    price = PRICES.lookup(model_for(rec))
    assert price is not None and rec.is_stream
    initial = min(256, int(rec.meta["request"]["body"]["max_tokens"]))
    return estimate_of(stack, key, rec) - cost_nano(price, TokenUsage(output=initial))


def output_reserved(rec: Recording, price: ModelPrice) -> int:
    """Output tokens inside tokenfuse's first estimate: a stream's initial allowance
    (256, capped by its limit), a whole call its limit (the model's maximum when unset)."""
    body = rec.meta["request"]["body"]
    cap = next((int(body[k]) for k in ("max_tokens", "max_completion_tokens",
                                       "max_output_tokens") if body.get(k)),
               price.max_output_tokens)
    return min(256, cap) if rec.is_stream else cap


#: The 1-hour recording (claude-sonnet-4): a system prompt of 1,029 words that cl100k
#: counts as 1,031 tokens was billed 2,056 as "farewell farewell ..." (1,031 as "goodbye
#: goodbye ..."): Claude takes two tokens where cl100k takes one. It set Claude's factor
#: (cl100k x 2.05, docs/design.md "Tokenizers"); at the first choice, 1.65, the estimate
#: was 11,748,000 nano-USD for an input billed 12,387,000.
ESTIMATE_CASES = list(names())


@pytest.mark.parametrize("name", ESTIMATE_CASES)
def test_estimate_bounds_the_recorded_input(replay_stack: Stack, api_key: str,
                                            name: str) -> None:
    """The pre-call estimate is an upper bound of the input the provider billed for the
    very request that was recorded (what a budget relies on to stop before the call)."""
    rec = load(name)
    price = PRICES.lookup(model_for(rec))
    assert price is not None
    bill = recorded_bill(rec)
    billed_input = Bill(input=bill.input, cache_read=bill.cache_read,
                        cache_write_5m=bill.cache_write_5m,
                        cache_write_1h=bill.cache_write_1h).nano(price)
    estimated_input = estimate_of(replay_stack, api_key, rec) - cost_nano(
        price, TokenUsage(output=output_reserved(rec, price)))
    print(f"\n{name}: input estimated {estimated_input}, billed {billed_input} nano-USD",
          end=" ")
    assert estimated_input >= billed_input


def _find(doc: Any, key: str) -> int:
    if isinstance(doc, dict):
        if key in doc:
            return int(doc[key])
        for value in doc.values():
            try:
                return _find(value, key)
            except KeyError:
                continue
    raise KeyError(key)


def usd(nano: int) -> str:
    return f"{nano // 10**9}.{nano % 10**9:09d}"


CUT_CASES = [("anthropic_stream_gzip_tool_search", "recorded"),
             ("openai_chat_stream_cached", "recorded"),
             ("openai_chat_stream_cached", "gzip")]


@pytest.mark.parametrize(("name", "upstream_coding"), CUT_CASES)
def test_recorded_stream_is_cut_at_the_budget(replay_stack: Stack, upstream: ReplayUpstream,
                                              api_key: str, name: str,
                                              upstream_coding: str) -> None:
    """A budget worth the input and a few output tokens beyond the grace: the SDK raises
    mid-stream, the upstream is disconnected, and the spend stays within the budget."""
    rec = load(name)
    price = PRICES.lookup(model_for(rec))
    assert price is not None
    budget = input_nano_of(replay_stack, api_key, rec) + cost_nano(
        price, TokenUsage(output=GRACE + 6))
    assert replay_stack.cli("budget", "set", "--key", api_key, "--daily",
                            usd(budget)).returncode == 0
    headers = {"x-replay": name, "x-replay-delay-ms": "20"}
    if upstream_coding == "gzip":
        headers["x-replay-gzip"] = "1"
    with pytest.raises((anthropic.APIStatusError, openai.APIError)) as raised:
        call_sdk(replay_stack, api_key, rec, headers)
    assert "budget exhausted" in str(raised.value)
    seen = upstream.for_fixture(name)[-1]
    wait_until(lambda: seen.disconnected or seen.completed, what="the upstream's end")
    assert seen.disconnected and seen.pieces_sent < seen.pieces_total, seen
    wait_until(lambda: day(replay_stack, api_key)["reserved_nano_usd"] == 0,
               what="the cut stream's settlement")
    window = day(replay_stack, api_key)
    assert 0 < window["spent_nano_usd"] <= budget
    print(f"\n{name}-{upstream_coding}: {seen.pieces_sent} of {seen.pieces_total} pieces "
          f"sent, spent {window['spent_nano_usd']} of {budget}", end=" ")


@pytest.mark.parametrize("upstream_coding", ["recorded", "gzip"])
def test_recorded_claude_stream_that_fits_is_not_cut(replay_stack: Stack,
                                                     upstream: ReplayUpstream, api_key: str,
                                                     upstream_coding: str) -> None:
    """The same budget as above (the input *bound* and a few output tokens) on a Claude
    stream whose real cost fits in it: once `message_start` reports the real input, the
    allowance is what that leaves, so the stream completes, billed exactly, within the
    budget (before, Claude's input bound cut it after 5 of 14 pieces)."""
    name = "anthropic_stream_cache_write"
    rec = load(name)
    price = PRICES.lookup(model_for(rec))
    assert price is not None
    budget = input_nano_of(replay_stack, api_key, rec) + cost_nano(
        price, TokenUsage(output=GRACE + 6))
    bill = recorded_bill(rec).nano(price)
    assert bill <= budget  # the premise: its real cost fits
    assert replay_stack.cli("budget", "set", "--key", api_key, "--daily",
                            usd(budget)).returncode == 0
    headers = {"x-replay": name, "x-replay-delay-ms": "20"}
    if upstream_coding == "gzip":
        headers["x-replay-gzip"] = "1"
    call_sdk(replay_stack, api_key, rec, headers)  # no exception: not cut
    seen = upstream.for_fixture(name)[-1]
    wait_until(lambda: seen.completed, what="the upstream's end")
    window = day(replay_stack, api_key)
    assert window["reserved_nano_usd"] == 0
    assert window["spent_nano_usd"] == bill <= budget


def test_unknown_fixture_is_an_upstream_404(replay_stack: Stack, api_key: str) -> None:
    """The replay server refuses what it has no recording for (and tokenfuse bills a
    failed call nothing)."""
    with pytest.raises(openai.NotFoundError):
        openai_client(replay_stack, api_key).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-replay": "no-such-recording"})
    assert day(replay_stack, api_key)["spent_nano_usd"] == 0


# ------------------------------------------------------------------ bytes to the client
def decode(raw: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
    if coding == "br":
        return brotli.decompress(raw)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    assert coding in ("", "identity"), coding
    return raw


def raw_post(stack: Stack, key: str, rec: Recording, accept: str) -> tuple[str, bytes]:
    """POST the recorded request as it was sent; (content-encoding, raw body bytes)."""
    uri = rec.meta["request"]["uri"]
    if rec.meta["provider"] == "anthropic":
        path = "/anthropic" + uri.split("api.anthropic.com", 1)[1]
        auth = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        path = "/openai" + uri.split("api.openai.com", 1)[1]
        auth = {"authorization": f"Bearer {key}"}
    with httpx.stream("POST", stack.envoy.base_url + path, json=request_of(rec), timeout=30,
                      headers={**auth, "accept-encoding": accept,
                               "x-replay": rec.name}) as response:
        assert response.status_code == 200
        return response.headers.get("content-encoding", ""), b"".join(response.iter_raw())


@pytest.mark.parametrize("accept", ["gzip", "br", "identity"])
@pytest.mark.parametrize("name", names())
def test_recorded_bytes_reach_the_client_unchanged(replay_stack: Stack, api_key: str,
                                                   name: str, accept: str) -> None:
    """Whatever the provider's coding and the client's, the client's `content-encoding`
    is true of its bytes and they decode to the recorded body, unaltered by metering."""
    rec = load(name)
    coding, raw = raw_post(replay_stack, api_key, rec, accept)
    if rec.coding:
        # Compressed although tokenfuse asked for identity: re-encoded in the provider's
        # coding (README, "Compression"), whatever the client accepts.
        assert coding == rec.coding
    else:
        assert coding == ("" if accept == "identity" else accept)
    assert decode(raw, coding) == rec.decoded
    assert day(replay_stack, api_key)["reserved_nano_usd"] == 0
