"""Cohere's v2 API (`/cohere/v2/chat`, `/cohere/v2/embed`) through Envoy with the official
Python SDK (cohere 7.3.1, `ClientV2(base_url=<gateway>/cohere)`): chat streamed and not,
and embed, settled exactly from `billed_units`; a stream cut at its budget ends with
Cohere's own `message-end` ERROR (the SDK raises nothing mid-stream: the client reads
`delta.error`); a flood held to its budget; refusals raised as the SDK's own errors;
pooled keys failing over. Plus the provider's parsing rules, without the stack (the
whole provider on one shared stack, hence its length).

Models used (priced by the regenerated data/prices.json, LiteLLM 1.110.2 `cohere_chat` /
`cohere`): cohere/command-a-03-2025 ($2.50 / $10 per 1M), cohere/embed-v4.0 ($0.12)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import cohere
import httpx
import pytest
from cohere.core.api_error import ApiError

from tests.support.billing import day_window, set_daily
from tests.support.fake_provider import FakeProvider, RequestRecord
from tests.support.flood import spell
from tests.support.harness import Stack, wait_until
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.price_refresh import Source, convert
from tokenfuse.pricing import PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import PROVIDERS
from tokenfuse.providers.base import RequestRejected

COHERE = PROVIDERS["cohere"]
CHAT_MODEL, EMBED_MODEL = "command-a-03-2025", "embed-v4.0"
MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default
#: An operator's price for a model the dataset lacks (Command A Reasoning, 32K output).
REASONING_MAX_OUTPUT = 32000
OPERATOR_PRICES = {"unit": "USD per 1M tokens", "models": {
    "cohere/command-a-reasoning-08-2025": {
        "provider": "cohere", "mode": "chat", "input": "2.50", "output": "10.00",
        "max_output_tokens": REASONING_MAX_OUTPUT, "context_window": 256000,
        "reasoning": True}}}
POOL_KEYS = {"cohere-a": [f"co-pool-a-{i}-{'x' * 24}" for i in range(2)],
             "cohere-b": [f"co-pool-b-{i}-{'y' * 24}" for i in range(2)]}


# ------------------------------------------------------------------ the provider alone


def test_requests() -> None:
    chat = {"model": CHAT_MODEL, "messages": MESSAGES, "stream": False,
            "documents": [{"data": {"text": "Rayleigh scattering"}}], "temperature": 0.3}
    call = COHERE.parse_request("/v2/chat", chat)
    assert (call.endpoint, call.stream, call.max_output_tokens) == ("chat", False, None)
    assert call.messages == MESSAGES and not call.hidden_output  # thinking is streamed
    assert call.prompt_parts == [{"documents": chat["documents"]}]  # settings are not text
    streamed = COHERE.parse_request("/v2/chat", {**chat, "stream": True, "max_tokens": 50})
    assert streamed.stream and streamed.max_output_tokens == 50
    assert COHERE.with_output_cap(chat, call, 77)["max_tokens"] == 77
    embed = COHERE.parse_request("/v2/embed", {"model": EMBED_MODEL, "texts": ["a"],
                                               "input_type": "search_document"})
    assert (embed.endpoint, embed.max_output_tokens, embed.prompt_parts) == (
        "embed", 0, [{"texts": ["a"]}])
    for body in ({"model": EMBED_MODEL, "images": ["data:image/png;base64,AAAA"]},
                 {"model": EMBED_MODEL, "inputs": [{"content": [
                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,A"}}]}]}):
        with pytest.raises(RequestRejected) as images:
            COHERE.parse_request("/v2/embed", body)
        assert images.value.status == 400
    for path in ("/v1/chat", "/v1/generate", "/v2/rerank", "/v1/classify", "/v2/chat/x"):
        with pytest.raises(RequestRejected) as refused:
            COHERE.parse_request(path, {"model": CHAT_MODEL})
        assert refused.value.status == 404 and "fail-closed" in refused.value.message
    with pytest.raises(RequestRejected):
        COHERE.parse_request("/v2/chat", {**chat, "max_tokens": "50"})
    document = {"type": "document", "document": {"data": {"text": "a long report"}}}
    assert COHERE.media_bound(document, CHAT_MODEL) == [document["document"], None]
    assert COHERE.media_bound({"type": "image_url", "image_url": {"url": "x"}}, "m") is None


def test_usage_is_billed_units() -> None:
    usage = {"billed_units": {"input_tokens": 5, "output_tokens": 2},
             "tokens": {"input_tokens": 70, "output_tokens": 3}, "cached_tokens": 0}
    # A recorded stream's last event (docs/providers.md: billed 5, template included 70).
    end = {"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": usage}}
    assert COHERE.usage(end) == TokenUsage(input=5, output=2)
    assert COHERE.usage({"id": "x", "message": {}, "usage": usage}) == TokenUsage(5, 2)
    assert COHERE.usage({"meta": {"billed_units": {"input_tokens": 9}}}) == TokenUsage(9, 0)
    assert COHERE.usage({"usage": {"tokens": {"input_tokens": 70, "output_tokens": 3}}}) == \
        TokenUsage(70, 3)  # no bill stated: the larger raw count
    assert COHERE.usage({"type": "content-delta", "delta": {"message": {}}}) is None
    assert COHERE.is_final_event("message-end", "{}") and COHERE.is_final_event("m", "[DONE]")
    assert COHERE.is_final_event("message", json.dumps(end))  # no `event:` line
    assert not COHERE.is_final_event("message", '{"type":"content-delta","delta":{"message":'
                                                '{"content":{"text":"\\"message-end\\""}}}}')
    assert COHERE.stream_output("content-delta", {"type": "content-delta", "delta": {
        "message": {"content": {"thinking": "hmm"}}}}) == ["hmm"]
    assert COHERE.stream_output("tool-call-start", {"type": "tool-call-start", "delta": {
        "message": {"tool_calls": {"id": "t", "type": "function",
                                   "function": {"name": "search", "arguments": ""}}}}}) == \
        ["search", ""]
    assert COHERE.response_output({"message": {"content": [{"type": "text", "text": "a"}],
                                               "tool_plan": "p", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}], "role": "assistant"}}) == \
        ["a", "p", "f", "{}"]
    meter = StreamMeter(COHERE, False, COHERE.tokenizer(CHAT_MODEL))
    raw = ('event: content-delta\ndata: {"type":"content-delta","index":0,"delta":'
           '{"message":{"content":{"text":" hello"}}}}\n\n'
           f'event: message-end\ndata: {json.dumps(end)}\n\n').encode()
    events = meter.feed(raw[:40], False) + meter.feed(raw[40:], True)
    assert [e.final for e in events] == [False, True] and events[0].output_tokens >= 1
    assert events[1].usage == TokenUsage(5, 2)


def test_errors_and_the_cut_in_the_sdks_shapes() -> None:
    assert json.loads(COHERE.error_body("budget", "budget_exceeded", "m", {"x": 1})) == {
        "message": "m", "code": "budget_exceeded", "tokenfuse": {"x": 1}}
    cut = COHERE.stream_error_event("stream_cut", "budget", "stop now", {"window": "day"})
    assert cut.startswith(b"event: message-end\ndata: ") and cut.endswith(b"\n\n")
    event = cohere.v2.V2ChatStreamResponse  # the SDK's own union parses it
    from cohere.core.unchecked_base_model import construct_type
    parsed: Any = construct_type(type_=event, object_=json.loads(cut.split(b"data: ")[1]))
    assert parsed.type == "message-end" and parsed.delta.finish_reason == "ERROR"
    assert parsed.delta.error == "stop now"


@pytest.mark.parametrize("reset", [False, True])
def test_the_sdk_raises_nothing_on_a_failed_generation(fake: FakeProvider, reset: bool) -> None:
    """Why the cut is a clean message-end ERROR (the SDK, straight at the fake): cohere
    7.3.1 yields it as a normal event and raises nothing; only a connection reset after it
    raises, an httpx transport error that does not carry the message."""
    headers = {"x-fake-output-tokens": "20", "x-fake-cohere-error-after": "5"}
    if reset:
        headers["x-fake-truncate-after"] = "6"  # half of the event after message-end, reset
    co = cohere.ClientV2(api_key="co-direct-" + uuid.uuid4().hex,
                         base_url=fake.base_url + "/cohere",
                         httpx_client=httpx.Client(headers=headers, timeout=30))
    seen: list[Any] = []
    try:
        for event in co.chat_stream(model=CHAT_MODEL, messages=MESSAGES):
            seen.append(event)
    except httpx.RemoteProtocolError:
        assert reset
    else:
        assert not reset
    (end,) = [e for e in seen if e.type == "message-end"]
    assert end.delta.finish_reason == "ERROR" and seen[-1] is end
    assert end.delta.error == "internal generation error"


def test_a_zero_priced_chat_model_is_unpriced_not_free() -> None:
    source = Source("d", "u", "v", "2026-12-01")
    dataset = {"command-a-plus-05-2026": {
        "litellm_provider": "cohere_chat", "mode": "chat", "input_cost_per_token": Decimal(0),
        "output_cost_per_token": Decimal(0), "max_output_tokens": 64000}}
    document = convert(dataset, source, providers={"cohere_chat": "cohere"})
    assert "cohere/command-a-plus-05-2026" not in document["models"]
    assert "cohere/command-a-plus-05-2026" in document["unpriced"]


# ------------------------------------------------------------------ through Envoy


@pytest.fixture(scope="module")
def co_stack(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("cohere")
    prices = workdir / "prices.json"
    prices.write_text(json.dumps(OPERATOR_PRICES))
    pools = workdir / "pools"
    pools.mkdir()
    for pool, keys in POOL_KEYS.items():
        (pools / f"{pool}.csv").write_text(
            "key,label\n" + "".join(f"{k},{pool}-{i}\n" for i, k in enumerate(keys)))
    s = Stack(fake.base_url, {"TOKENFUSE_PRICES_FILE": str(prices),
                              "TOKENFUSE_POOLS_DIR": str(pools),
                              "TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300",
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000"}).start()
    for pool in POOL_KEYS:
        imported = s.cli("keys", "import", "--pool", pool, "--provider", "cohere",
                         str(pools / f"{pool}.csv"))
        assert imported.returncode == 0, imported.stderr
    yield s
    s.cleanup()


@pytest.fixture
def key() -> str:
    return "co-key-" + uuid.uuid4().hex


def client(stack: Stack, key: str, **headers: str) -> cohere.ClientV2:
    # client_name is sent as X-Client-Name: a label, not a credential.
    return cohere.ClientV2(api_key=key, base_url=stack.envoy.base_url + "/cohere",
                           client_name="tokenfuse-tests", timeout=30,
                           httpx_client=httpx.Client(headers=headers, timeout=30))


spent, set_budget = day_window, set_daily


def records(fake: FakeProvider, key: str) -> list[RequestRecord]:
    return [r for r in list(fake.records) if r.api_key == key]


_PRICES = PriceTable.load()


def cost(record: RequestRecord) -> int:
    """The fake's bill for one call, at the price table's rate."""
    assert record.usage is not None
    price = _PRICES.lookup(record.usage.model, "cohere")
    assert price is not None, record.usage.model
    return cost_nano(price, TokenUsage(input=record.usage.input_tokens,
                                       output=record.usage.output_tokens))


def bill(fake: FakeProvider, key: str, completed_only: bool = True) -> int:
    return sum(cost(r) for r in records(fake, key)
               if r.usage is not None and (r.completed or not completed_only))


def finished(fake: FakeProvider, key: str, n: int = 1) -> None:
    wait_until(lambda: len([r for r in records(fake, key) if r.finished]) >= n,
               what="the fake's records")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_settled_exactly(co_stack: Stack, fake: FakeProvider, key: str,
                              stream: bool) -> None:
    co = client(co_stack, key, **{"x-fake-output-tokens": "12"})
    if stream:
        events = list(co.chat_stream(model=CHAT_MODEL, messages=MESSAGES))
        assert [e.type for e in events][:2] == ["message-start", "content-start"]
        text = "".join(e.delta.message.content.text for e in events
                       if e.type == "content-delta")
        end = events[-1]
        assert end.type == "message-end" and end.delta.finish_reason == "COMPLETE"
        usage = end.delta.usage
    else:
        response = co.chat(model=CHAT_MODEL, messages=MESSAGES)
        text = response.message.content[0].text
        usage = response.usage
    assert text and usage.billed_units.output_tokens == 12
    assert usage.tokens.input_tokens > usage.billed_units.input_tokens  # the template
    finished(fake, key)
    (record,) = records(fake, key)
    assert record.usage.input_tokens == usage.billed_units.input_tokens
    assert record.headers["x-client-name"] == "tokenfuse-tests"
    day = spent(co_stack, key)
    expected = int(usage.billed_units.input_tokens) * 2500 + 12 * 10_000
    assert day["spent_nano_usd"] == bill(fake, key) == expected
    assert day["reserved_nano_usd"] == 0
    # Without max_tokens, a whole call gets the model's maximum written in (8,000 for
    # Command A); a stream is metered and cut instead.
    assert record.cap == (None if stream else 8000)


REASONING = "command-a-reasoning-08-2025"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_is_metered_and_settled(co_stack: Stack, fake: FakeProvider, key: str,
                                         stream: bool) -> None:
    """Command A Reasoning thinks by default; its thinking is content of type `thinking`
    (streamed as such), billed as output. Priced by the operator here (LiteLLM has it
    only as oci/...)."""
    co = client(co_stack, key, **{"x-fake-reasoning-tokens": "30",
                                  "x-fake-output-tokens": "5"})
    if stream:
        events = list(co.chat_stream(model=REASONING, messages=MESSAGES))
        kinds = [e.delta.message.content.type for e in events if e.type == "content-start"]
        assert kinds == ["thinking", "text"]
        thinking = "".join(e.delta.message.content.thinking or "" for e in events
                           if e.type == "content-delta")
        usage = events[-1].delta.usage
    else:
        response = co.chat(model=REASONING, messages=MESSAGES)
        assert [c.type for c in response.message.content] == ["thinking", "text"]
        thinking = response.message.content[0].thinking
        usage = response.usage
    assert thinking and usage.billed_units.output_tokens == 35
    finished(fake, key)
    (record,) = records(fake, key)
    assert record.cap == (None if stream else REASONING_MAX_OUTPUT)  # the operator's max
    expected = int(usage.billed_units.input_tokens) * 2500 + 35 * 10_000
    assert spent(co_stack, key)["spent_nano_usd"] == expected


TOOLS = [{"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_metered_and_settled(co_stack: Stack, fake: FakeProvider, key: str,
                                            stream: bool) -> None:
    co = client(co_stack, key, **{"x-fake-output-tokens": "6"})
    if stream:
        events = list(co.chat_stream(model=CHAT_MODEL, messages=MESSAGES, tools=TOOLS))
        kinds = {e.type for e in events}
        assert {"tool-plan-delta", "tool-call-start", "tool-call-delta",
                "tool-call-end"} <= kinds
        arguments = "".join(e.delta.message.tool_calls.function.arguments for e in events
                            if e.type == "tool-call-delta")
        name = next(e.delta.message.tool_calls.function.name for e in events
                    if e.type == "tool-call-start")
        end = events[-1]
        assert end.delta.finish_reason == "TOOL_CALL"
        usage = end.delta.usage
    else:
        response = co.chat(model=CHAT_MODEL, messages=MESSAGES, tools=TOOLS)
        assert response.finish_reason == "TOOL_CALL" and response.message.tool_plan
        (call,) = response.message.tool_calls
        name, arguments = call.function.name, call.function.arguments
        usage = response.usage
    assert name == "search" and "query" in json.loads(arguments)
    finished(fake, key)
    assert spent(co_stack, key)["spent_nano_usd"] == bill(fake, key) == (
        int(usage.billed_units.input_tokens) * 2500
        + int(usage.billed_units.output_tokens) * 10_000)


def test_citations_are_not_billed_twice(co_stack: Stack, fake: FakeProvider,
                                        key: str) -> None:
    events = list(client(co_stack, key, **{"x-fake-output-tokens": "8"}).chat_stream(
        model=CHAT_MODEL, messages=MESSAGES,
        documents=[{"id": "doc-0", "data": {"text": "Rayleigh scattering"}}]))
    (cited,) = [e for e in events if e.type == "citation-start"]
    assert cited.delta.message.citations.sources[0].id == "doc-0"
    finished(fake, key)
    (record,) = records(fake, key)
    assert record.usage.output_tokens == 8
    assert spent(co_stack, key)["spent_nano_usd"] == bill(fake, key)


def test_embed_settled_exactly(co_stack: Stack, fake: FakeProvider, key: str) -> None:
    co = client(co_stack, key)
    response = co.embed(model=EMBED_MODEL, texts=["a sentence", "another one"],
                        input_type="search_document", embedding_types=["float"])
    assert len(response.embeddings.float_) == 2
    billed = int(response.meta.billed_units.input_tokens)
    finished(fake, key)
    day = spent(co_stack, key)
    assert day["spent_nano_usd"] == bill(fake, key) == billed * 120  # $0.12 per 1M tokens
    assert day["reserved_nano_usd"] == 0


def test_a_many_text_embedding_is_held_to_its_budget(co_stack: Stack, fake: FakeProvider,
                                                     key: str) -> None:
    budget = 100_000  # nano-USD: 1,000 tokens of embed-english-v3.0 ($0.10 per 1M)
    set_budget(co_stack, key, budget)
    texts = [f"{spell(i)} " + "word " * 300 for i in range(20)]  # ~6,000 tokens in all
    try:
        client(co_stack, key).embed(model="embed-english-v3.0", texts=texts,
                                    input_type="search_document")
    except ApiError as exc:
        assert exc.status_code == 402  # refused: the bound saw the whole request
        return
    finished(fake, key)
    assert spent(co_stack, key)["spent_nano_usd"] <= budget


@pytest.mark.parametrize("compress", ["", "gzip"])
def test_stream_with_done_and_a_compressing_upstream(co_stack: Stack, fake: FakeProvider,
                                                     key: str, compress: str) -> None:
    """`data: [DONE]` after message-end (the SDK stops there) and an upstream that gzips
    whatever the request accepted: both metered and settled the same."""
    headers = {"x-fake-output-tokens": "7", "x-fake-cohere-done": "1"}
    if compress:
        headers["x-fake-compress-always"] = compress
    events = list(client(co_stack, key, **headers).chat_stream(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=100))
    assert events[-1].type == "message-end"
    finished(fake, key)
    (record,) = records(fake, key)
    assert record.response_encoding == compress and record.cap == 100
    assert spent(co_stack, key)["spent_nano_usd"] == bill(fake, key) > 0


def test_stream_cut_at_its_budget(co_stack: Stack, fake: FakeProvider, key: str) -> None:
    budget = 150 * 10_000  # 150 output tokens of Command A
    set_budget(co_stack, key, budget)
    co = client(co_stack, key, **{"x-fake-output-tokens": "4000",
                                  "x-fake-chunk-delay-ms": "2"})
    events = list(co.chat_stream(model=CHAT_MODEL, messages=MESSAGES))  # nothing raises
    delivered = sum(1 for e in events if e.type == "content-delta")
    end = events[-1]
    assert end.type == "message-end" and end.delta.finish_reason == "ERROR"
    assert end.delta.error.startswith("stream ended: tokenfuse day budget exhausted")
    assert 40 < delivered <= 150  # counted with the bound (cl100k x 1.5)
    print(f"\ncohere: delivered {delivered} of a 150-token budget", end=" ")
    wait_until(lambda: any(r.finished for r in records(fake, key)),
               what="the provider to see the disconnect")
    (record,) = records(fake, key)
    assert not record.completed and record.output_tokens_sent <= delivered + GRACE * 2
    day = spent(co_stack, key)
    assert bill(fake, key, completed_only=False) <= day["spent_nano_usd"] <= budget
    assert day["reserved_nano_usd"] == 0


def test_refusals_are_the_sdks_own_errors(co_stack: Stack, fake: FakeProvider,
                                          key: str) -> None:
    co = client(co_stack, key)
    for model in ("command-x-99", "command-a-vision-07-2025"):  # the dataset lacks it
        with pytest.raises(cohere.BadRequestError) as unknown:
            co.chat(model=model, messages=MESSAGES)
        assert f"model '{model}' has no price in tokenfuse" in unknown.value.body["message"]
    with pytest.raises(cohere.NotFoundError) as rerank:
        co.rerank(model="rerank-v3.5", query="q", documents=["a", "b"])
    assert "fail-closed" in rerank.value.body["message"]
    with pytest.raises(cohere.NotFoundError):  # the v1 API is not metered either
        cohere.Client(api_key=key, base_url=co_stack.envoy.base_url + "/cohere").chat(
            model=CHAT_MODEL, message="hi")

    class Garble(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            headers = {k: v for k, v in request.headers.items() if k != "content-length"}
            return super().handle_request(httpx.Request(
                request.method, request.url, headers=headers, content=b'{"model": '))

    garbled = cohere.ClientV2(api_key=key, base_url=co_stack.envoy.base_url + "/cohere",
                              httpx_client=httpx.Client(transport=Garble()))
    with pytest.raises(cohere.BadRequestError) as bad_json:
        garbled.chat(model=CHAT_MODEL, messages=MESSAGES)
    assert bad_json.value.status_code == 400
    set_budget(co_stack, key, 1000)
    with pytest.raises(ApiError) as broke:  # 402 has no class of its own in the SDK
        co.chat(model=CHAT_MODEL, messages=MESSAGES)
    assert broke.value.status_code == 402 and "budget exhausted" in broke.value.body["message"]
    with pytest.raises(ApiError) as broke_stream:
        list(co.chat_stream(model=CHAT_MODEL, messages=MESSAGES))
    assert broke_stream.value.status_code == 402
    assert records(fake, key) == []  # nothing reached the provider


def test_a_zero_priced_model_is_refused_not_free(co_stack: Stack, fake: FakeProvider,
                                                 key: str) -> None:
    with pytest.raises(cohere.BadRequestError) as unpriced:
        client(co_stack, key).chat(model="command-a-plus-05-2026", messages=MESSAGES,
                                   max_tokens=5)
    assert "no price" in unpriced.value.body["message"]
    assert records(fake, key) == []


def test_loop_guard_refuses_the_sixth_identical_request(co_stack: Stack,
                                                       key: str) -> None:
    """Refused 429 (TooManyRequestsError; the SDK would retry a chat twice by default)."""
    co = client(co_stack, key, **{"x-fake-output-tokens": "3"})
    for _ in range(5):
        co.chat(model=CHAT_MODEL, messages=MESSAGES)
    with pytest.raises(cohere.TooManyRequestsError) as looped:
        co.chat(model=CHAT_MODEL, messages=MESSAGES, request_options={"max_retries": 0})
    assert "loop" in looped.value.body["message"]


FLOOD_REQUESTS = 200
FLOOD_BUDGET = 10_000_000  # $0.01: ~24 calls of 40 output tokens


def test_a_flood_on_one_key_is_held_to_its_budget(co_stack: Stack, fake: FakeProvider,
                                                  key: str) -> None:
    set_budget(co_stack, key, FLOOD_BUDGET)

    async def flood() -> list[str]:
        co = cohere.AsyncClientV2(api_key=key, base_url=co_stack.envoy.base_url + "/cohere",
                                  timeout=120)

        async def one(i: int) -> str:
            try:
                await co.chat(model=CHAT_MODEL, max_tokens=40,
                              messages=[{"role": "user", "content": f"flood {spell(i)}"}],
                              request_options={"max_retries": 0})
                return "allowed"
            except ApiError as exc:
                return f"status_{exc.status_code}"

        return list(await asyncio.gather(*(one(i) for i in range(FLOOD_REQUESTS))))

    outcomes = asyncio.run(flood())
    allowed, refused = outcomes.count("allowed"), outcomes.count("status_402")
    print(f"\ncohere flood: {allowed} allowed, {refused} refused, billed "
          f"{bill(fake, key)} of {FLOOD_BUDGET}", end=" ")
    assert allowed + refused == FLOOD_REQUESTS, sorted(set(outcomes))
    finished(fake, key, allowed)
    assert len(records(fake, key)) == allowed  # the refused ones never reached Cohere
    day = spent(co_stack, key)
    assert day["spent_nano_usd"] == bill(fake, key) <= FLOOD_BUDGET
    assert day["spent_nano_usd"] >= FLOOD_BUDGET // 2 and day["reserved_nano_usd"] == 0


@pytest.mark.parametrize(("pool", "status"), [("cohere-a", 429), ("cohere-b", 401)])
def test_pooled_key_fails_over(co_stack: Stack, fake: FakeProvider, pool: str,
                               status: int) -> None:
    vkey = co_stack.cli("vkey", "create", "--name", f"co-app-{pool}", "--pool",
                        pool).stdout.strip()
    assert vkey.startswith("tfk-")
    set_budget(co_stack, vkey, 5 * 10**9)
    failing, healthy = POOL_KEYS[pool]
    if status == 401:
        fake.revoked_keys.add(failing)
    else:
        fake.key_failures[failing] = (status, 30)
    since = len(fake.records)
    try:
        co = client(co_stack, vkey, **{"x-fake-output-tokens": "4"})
        answers = [co.chat(model=CHAT_MODEL, messages=[
            {"role": "user", "content": f"pooled question {word}"}]).message.content[0].text
            for word in ("one", "two", "three")]
        answers.append("".join(e.delta.message.content.text for e in co.chat_stream(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "pooled stream"}])
            if e.type == "content-delta"))
    finally:
        fake.revoked_keys.discard(failing)
        fake.key_failures.pop(failing, None)
    assert all(answers)  # the client saw no error
    posts = [r for r in list(fake.records)[since:] if r.method == "POST"]
    assert [r.status for r in posts if r.api_key == failing] == [status]  # then set aside
    assert sum(1 for r in posts if r.api_key == healthy and r.status == 200) == 4
    assert not any(r.api_key == vkey for r in posts)  # the gateway key never went upstream
    billed = sum(cost(r) for r in posts if r.usage is not None and r.completed)
    day = spent(co_stack, vkey)
    assert day["spent_nano_usd"] == billed > 0 and day["reserved_nano_usd"] == 0
