"""Claude on Vertex AI (`/vertex/v1/projects/{p}/locations/{l}/publishers/anthropic/models/
{model}:rawPredict|streamRawPredict`) through Envoy with anthropic 2.15.0's AnthropicVertex
(`base_url=<gateway>/vertex/v1`, an `access_token`: no Google credentials needed): create
and stream settled exactly (hidden thinking, cache writes), a stream cut at its budget with
the SDK raising, a flood held to its budget, the token counter free. Plus the provider's
path rules, without the stack.

Models used (priced by the regenerated data/prices.json, LiteLLM 1.110.2
`vertex_ai-anthropic_models`): vertex/claude-sonnet-4-5@20250929 ($3 / $15 per 1M, cache
writes $3.75, 1-hour $6), vertex/claude-haiku-4-5@20251001 ($1 / $5)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.support.billing import day_window, set_daily, vertex_caller, vertex_project
from tests.support.fake_provider import FakeProvider, RequestRecord, Usage
from tests.support.flood import spell
from tests.support.harness import Stack, wait_until
from tokenfuse.pricing import PriceTable
from tokenfuse.providers import PROVIDERS
from tokenfuse.providers.base import RequestRejected
from tokenfuse.providers.vertex_claude import VertexClaude

VERTEX = PROVIDERS["vertex"].for_path("/v1/projects/p/locations/l/publishers/anthropic/m")
SONNET, HAIKU = "claude-sonnet-4-5@20250929", "claude-haiku-4-5@20251001"
BASE = "/v1/projects/proj-1/locations/us-east5/publishers/anthropic/models"
BODY = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}]}
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default


# ------------------------------------------------------------------ the provider alone


def test_paths() -> None:
    assert isinstance(VERTEX, VertexClaude) and VERTEX.for_path("/x") is VERTEX
    call = VERTEX.parse_request(f"{BASE}/{SONNET}:rawPredict", BODY)
    assert (call.endpoint, call.model, call.stream, call.max_output_tokens) == (
        "messages", SONNET, False, 50)
    assert call.priced and call.new_body is None  # anthropic_version passes as it is
    stream = VERTEX.parse_request(f"{BASE}/{SONNET}:streamRawPredict", BODY)
    assert stream.stream  # the verb says it, with or without "stream": true
    assert VERTEX.parse_request(f"{BASE}/{SONNET}:rawPredict", {**BODY, "stream": True}).stream
    for path in (f"/v1beta1/projects/p/locations/global/publishers/anthropic/models/"
                 f"{SONNET}:rawPredict",
                 "/v1/projects/p/locations/eu/publishers/anthropic/models/"
                 "claude-x%3Bv@1:rawPredict"):
        assert VERTEX.parse_request(path, BODY).model in (SONNET, "claude-x;v@1")
    count = VERTEX.parse_request(f"{BASE}/count-tokens:rawPredict",
                                 {**BODY, "model": SONNET})
    assert not count.priced and count.model == SONNET
    for path, body in ((f"{BASE}/{SONNET}:predict", BODY),
                       (f"{BASE}/count-tokens:streamRawPredict", BODY),
                       ("/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:"
                        "generateContent", BODY),
                       (f"{BASE}/{SONNET}:rawPredict", {**BODY, "model": SONNET})):
        with pytest.raises(RequestRejected):
            VERTEX.parse_request(path, body)
    web = {**BODY, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    searched = VERTEX.parse_request(f"{BASE}/{SONNET}:rawPredict", web)
    assert searched.new_body is not None and "model" not in searched.new_body
    assert searched.new_body["tools"][0]["max_uses"] == 5
    assert VERTEX.price_ids(SONNET) == (("vertex", SONNET),)
    assert VERTEX.price_model_id(SONNET, "chat", True) == SONNET
    assert VERTEX.price_model_id("gemini-2.5-pro", "chat", True) is None
    assert VERTEX.caller_key({"authorization": "Bearer ya29.T"}) == "ya29.T"  # no project
    assert VERTEX.caller_key({"authorization": "Bearer ya29.T", ":path": f"/vertex{BASE}/"
                              f"{SONNET}:rawPredict"}) == "vertex-project:proj-1"
    assert VERTEX.credential_of({"authorization": "Bearer ya29.T", ":path": BASE}) == "ya29.T"
    assert VERTEX.caller_key({"x-api-key": "sk-ant"}) is None  # not Vertex's credential
    cut = VERTEX.stream_error_event("stream_cut", "budget", "stop", {})
    assert cut.startswith(b"event: error\ndata: ")  # Anthropic's; Google's is ignored


# ------------------------------------------------------------------ through Envoy


#: An operator's pool of Vertex access tokens (static tokens: see docs, they expire hourly).
POOL_TOKENS = [f"ya29.pool-{i}-{'v' * 24}" for i in range(2)]


@pytest.fixture(scope="module")
def vx_stack(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pools = tmp_path_factory.mktemp("vertex") / "pools"
    pools.mkdir()
    (pools / "vertex-main.csv").write_text(
        "key,label\n" + "".join(f"{k},vx-{i}\n" for i, k in enumerate(POOL_TOKENS)))
    s = Stack(fake.base_url, {"TOKENFUSE_POOLS_DIR": str(pools),
                              "TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300",
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000"}).start()
    imported = s.cli("keys", "import", "--pool", "vertex-main", "--provider", "vertex",
                     str(pools / "vertex-main.csv"))
    assert imported.returncode == 0, imported.stderr
    yield s
    s.cleanup()


@pytest.fixture
def token() -> str:
    return "ya29.fake-" + uuid.uuid4().hex


def client(stack: Stack, token: str, **headers: str) -> anthropic.AnthropicVertex:
    return anthropic.AnthropicVertex(region="us-east5", project_id=project_of(token),
                                     access_token=token, max_retries=0,
                                     base_url=stack.envoy.base_url + "/vertex/v1",
                                     default_headers=headers)


project_of = vertex_project


def charged(key: str) -> str:
    """Whom tokenfuse charges for a key: an OAuth token's project, else the key."""
    return vertex_caller(key) if key.startswith("ya29.") else key


def spent(stack: Stack, key: str) -> dict:
    return day_window(stack, charged(key))


def set_budget(stack: Stack, key: str, nano: int) -> None:
    set_daily(stack, charged(key), nano)


def records(fake: FakeProvider, key: str) -> list[RequestRecord]:
    return [r for r in list(fake.records) if r.api_key == key]


_PRICES = PriceTable.load()


def cost(record: RequestRecord) -> int:
    """Anthropic's bill for one call at the Vertex price of the path's model: input_tokens
    exclude cache reads and writes; 1-hour writes at their own rate."""
    usage: Usage | None = record.usage
    assert usage is not None and record.model is not None
    price = _PRICES.lookup(record.model, "vertex")
    assert price is not None, record.model
    one_hour = price.cache_write if price.cache_write_1h is None else price.cache_write_1h
    micro = (usage.input_tokens * price.input + usage.cached_input_tokens * price.cache_read
             + usage.cache_creation_input_tokens * price.cache_write
             + usage.cache_creation_1h_input_tokens * one_hour
             + usage.output_tokens * price.output)
    return -(-micro // 1_000_000)


def bill(fake: FakeProvider, key: str, completed_only: bool = True) -> int:
    return sum(cost(r) for r in records(fake, key)
               if r.usage is not None and (r.completed or not completed_only))


def finished(fake: FakeProvider, key: str, n: int = 1) -> None:
    wait_until(lambda: len([r for r in records(fake, key) if r.finished]) >= n,
               what="the fake's records")


MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_messages_settled_exactly(vx_stack: Stack, fake: FakeProvider, token: str,
                                  stream: bool) -> None:
    """Hidden thinking (billed, a summary shown) and a cache write, streamed or not."""
    c = client(vx_stack, token, **{"x-fake-output-tokens": "9",
                                   "x-fake-reasoning-tokens": "40",
                                   "x-fake-cache-creation": "30"})
    thinking = {"type": "enabled", "budget_tokens": 1024}
    if stream:
        with c.messages.stream(model=SONNET, max_tokens=2000, messages=MESSAGES,
                               thinking=thinking) as s:
            text = "".join(s.text_stream)
            message = s.get_final_message()
    else:
        message = c.messages.create(model=SONNET, max_tokens=2000, messages=MESSAGES,
                                    thinking=thinking)
        text = message.content[-1].text
    assert text and message.usage.output_tokens == 49
    assert message.usage.cache_creation_input_tokens > 0  # (at most the prompt)
    finished(fake, token)
    (record,) = records(fake, token)
    assert record.model == SONNET and record.stream == stream
    assert record.path.endswith(f"{SONNET}:{'streamRawPredict' if stream else 'rawPredict'}")
    body = json.loads(record.body)
    assert "model" not in body and body["anthropic_version"]  # the SDK's own value
    day = spent(vx_stack, token)
    assert day["spent_nano_usd"] == bill(fake, token) > 0
    assert day["reserved_nano_usd"] == 0


@pytest.mark.parametrize("compress", ["", "gzip"])
def test_global_endpoint_and_a_compressing_upstream(vx_stack: Stack, fake: FakeProvider,
                                                    token: str, compress: str) -> None:
    """`region="global"` (locations/global: Sonnet 4.5+ global endpoints), and an upstream
    that gzips the stream whatever was accepted: metered and settled the same."""
    headers = {"x-fake-output-tokens": "7"}
    if compress:
        headers["x-fake-compress-always"] = compress
    c = anthropic.AnthropicVertex(region="global", project_id=project_of(token), access_token=token,
                                  max_retries=0, default_headers=headers,
                                  base_url=vx_stack.envoy.base_url + "/vertex/v1")
    with c.messages.stream(model=SONNET, max_tokens=100, messages=MESSAGES) as s:
        assert "".join(s.text_stream)
    finished(fake, token)
    (record,) = records(fake, token)
    assert "/locations/global/" in record.path and record.response_encoding == compress
    assert record.cap == 100
    assert spent(vx_stack, token)["spent_nano_usd"] == bill(fake, token) > 0


def test_count_tokens_is_free(vx_stack: Stack, fake: FakeProvider, token: str) -> None:
    counted = client(vx_stack, token).messages.count_tokens(model=HAIKU, messages=MESSAGES)
    assert counted.input_tokens > 0
    finished(fake, token)
    (record,) = records(fake, token)
    assert record.path.endswith("/count-tokens:rawPredict")
    assert spent(vx_stack, token)["spent_nano_usd"] == 0


def test_stream_cut_at_its_budget_raises(vx_stack: Stack, fake: FakeProvider,
                                         token: str) -> None:
    budget = 150 * 5000  # 150 output tokens of Haiku 4.5 ($5 per 1M)
    set_budget(vx_stack, token, budget)
    c = client(vx_stack, token, **{"x-fake-output-tokens": "4000",
                                   "x-fake-chunk-delay-ms": "2"})
    delivered = 0
    with pytest.raises(anthropic.APIStatusError) as raised, \
            c.messages.stream(model=HAIKU, max_tokens=8000, messages=MESSAGES) as s:
        for _ in s.text_stream:
            delivered += 1
    assert "budget exhausted" in str(raised.value)
    assert 20 < delivered <= 150  # counted with Claude's bound (cl100k x 2.05)
    print(f"\nvertex claude: delivered {delivered} of a 150-token budget", end=" ")
    wait_until(lambda: any(r.finished for r in records(fake, token)),
               what="the provider to see the disconnect")
    (record,) = records(fake, token)
    assert not record.completed and record.output_tokens_sent <= delivered + GRACE * 2
    day = spent(vx_stack, token)
    assert bill(fake, token, completed_only=False) <= day["spent_nano_usd"] <= budget
    assert day["reserved_nano_usd"] == 0


def test_refusals_are_anthropic_errors(vx_stack: Stack, fake: FakeProvider,
                                       token: str) -> None:
    c = client(vx_stack, token)
    with pytest.raises(anthropic.BadRequestError) as unknown:
        c.messages.create(model="claude-nonesuch@20990101", max_tokens=10, messages=MESSAGES)
    assert "has no price in tokenfuse" in str(unknown.value)
    set_budget(vx_stack, token, 1000)
    with pytest.raises(anthropic.APIStatusError) as broke:
        c.messages.create(model=HAIKU, max_tokens=10, messages=MESSAGES)
    assert broke.value.status_code == 402 and "budget exhausted" in str(broke.value)
    assert records(fake, token) == []  # nothing reached Vertex
    anonymous = httpx.post(f"{vx_stack.envoy.base_url}/vertex{BASE}/{HAIKU}:rawPredict",
                           json=BODY, timeout=30)  # no OAuth token at all
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"


FLOOD_REQUESTS = 200
FLOOD_BUDGET = 5_000_000  # $0.005: ~23 Haiku calls of 40 output tokens


def test_a_flood_on_one_token_is_held_to_its_budget(vx_stack: Stack, fake: FakeProvider,
                                                    token: str) -> None:
    set_budget(vx_stack, token, FLOOD_BUDGET)

    async def flood() -> list[str]:
        c = anthropic.AsyncAnthropicVertex(region="us-east5", project_id=project_of(token),
                                           access_token=token, max_retries=0, timeout=120,
                                           base_url=vx_stack.envoy.base_url + "/vertex/v1")

        async def one(i: int) -> str:
            try:
                await c.messages.create(model=HAIKU, max_tokens=40, messages=[
                    {"role": "user", "content": f"flood {spell(i)}"}])
                return "allowed"
            except anthropic.APIStatusError as exc:
                return f"status_{exc.status_code}"

        try:
            return list(await asyncio.gather(*(one(i) for i in range(FLOOD_REQUESTS))))
        finally:
            await c.close()

    outcomes = asyncio.run(flood())
    allowed, refused = outcomes.count("allowed"), outcomes.count("status_402")
    print(f"\nvertex claude flood: {allowed} allowed, {refused} refused, billed "
          f"{bill(fake, token)} of {FLOOD_BUDGET}", end=" ")
    assert allowed + refused == FLOOD_REQUESTS, sorted(set(outcomes))
    finished(fake, token, allowed)
    assert len(records(fake, token)) == allowed
    day = spent(vx_stack, token)
    assert day["spent_nano_usd"] == bill(fake, token) <= FLOOD_BUDGET
    assert day["spent_nano_usd"] >= FLOOD_BUDGET // 2 and day["reserved_nano_usd"] == 0


def test_pooled_token_fails_over(vx_stack: Stack, fake: FakeProvider) -> None:
    """One pooled token answers Google's 429 quota error: the call goes to the other."""
    vkey = vx_stack.cli("vkey", "create", "--name", "vx-app", "--pool",
                        "vertex-main").stdout.strip()
    assert vkey.startswith("tfk-")
    set_budget(vx_stack, vkey, 5 * 10**9)
    failing, healthy = POOL_TOKENS
    fake.key_failures[failing] = (429, 30)
    since = len(fake.records)
    try:
        c = client(vx_stack, vkey, **{"x-fake-output-tokens": "4"})
        texts = [c.messages.create(model=HAIKU, max_tokens=20, messages=[
            {"role": "user", "content": f"pooled question {word}"}]).content[0].text
            for word in ("one", "two", "three")]
        with c.messages.stream(model=HAIKU, max_tokens=20, messages=[
                {"role": "user", "content": "pooled stream"}]) as s:
            texts.append("".join(s.text_stream))
    finally:
        del fake.key_failures[failing]
    assert all(texts)  # the client saw no error
    posts = [r for r in list(fake.records)[since:] if r.method == "POST"]
    assert [r.status for r in posts if r.api_key == failing] == [429]  # then cooled down
    assert sum(1 for r in posts if r.api_key == healthy and r.status == 200) == 4
    assert not any(r.api_key == vkey for r in posts)  # the gateway key never went upstream
    billed = sum(cost(r) for r in posts if r.usage is not None and r.completed)
    day = spent(vx_stack, vkey)
    assert day["spent_nano_usd"] == billed > 0 and day["reserved_nano_usd"] == 0
