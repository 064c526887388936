"""The loop guard's two tiers: fingerprints (unit), the Lua state (a real redis-server),
the fake's answers, and through Envoy with the official SDKs: templated batches never
blocked, agent loops (JSON and streamed, OpenAI and Anthropic) blocked by the
near-duplicate tier only when their answers repeat."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import RedisServer, Stack
from tokenfuse.config import WINDOWS, ConfigError, load_settings
from tokenfuse.identity import key_id
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.policy.loopguard import (
    answer_fingerprint,
    fingerprint,
    fingerprints,
    near_duplicate_fingerprint,
)
from tokenfuse.providers import PROVIDERS
from tokenfuse.state.budgets import BudgetStore, GuardPolicy, LoopRefusal, Reservation
from tokenfuse.state.keys import caller_keys, settle_keys

CALLER = "k" * 32


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- fingerprints ------------------------------------------------------------------------


def test_exact_fingerprint_is_the_documented_one() -> None:
    base = fingerprint(CALLER, "gpt-4o-mini", user("Summarise the logs"))
    # case-insensitive, whitespace-normalised ...
    assert fingerprint(CALLER, "gpt-4o-mini", user("  SUMMARISE\tthe\n\nlogs ")) == base
    # ... and nothing else merged: any other variation is another request
    for other in ("Summarise the logs!", "Summarise the log", "Summarise the logs 2"):
        assert fingerprint(CALLER, "gpt-4o-mini", user(other)) != base
    assert fingerprint(CALLER, "gpt-4o", user("Summarise the logs")) != base
    assert fingerprint("j" * 32, "gpt-4o-mini", user("Summarise the logs")) != base
    # numbers, timestamps and ids are text like any other in the exact tier
    tickets = {fingerprint(CALLER, "m", user(f"summarise ticket {n}")) for n in range(1041, 1049)}
    assert len(tickets) == 8
    # only the last 3 messages count
    last3 = [*user("a"), *user("b"), *user("c")]
    assert fingerprint(CALLER, "m", [*user("old"), *last3]) == fingerprint(
        CALLER, "m", [*user("older"), *last3])


def test_near_duplicate_fingerprint_normalises_volatile_tokens() -> None:
    variants = [
        "Attempt 3 of 5: fetch order 1041 (req_8f3a9c2e1) at 2026-11-21T14:02:11Z, "
        "trace 3f2b7c1e-9a4d-4c1b-8e2f-0a1b2c3d4e5f, 14:02:11",
        "attempt 4 of 5: fetch order 1042 (req_91c0aa771) at 2026-11-21 14:02:19.5+01:00, "
        "trace 7d1e2f3a-0b4c-4d5e-9f60-718293a4b5c6, 14:02:19",
    ]
    nears = {near_duplicate_fingerprint(CALLER, "m", user(v)) for v in variants}
    exacts = {fingerprint(CALLER, "m", user(v)) for v in variants}
    assert len(nears) == 1 and len(exacts) == 2
    # words still matter
    assert near_duplicate_fingerprint(CALLER, "m", user("fetch order 1041")) != \
        near_duplicate_fingerprint(CALLER, "m", user("cancel order 1041"))
    # the tiers never share a fingerprint, even for text without volatile tokens
    exact, near = fingerprints(CALLER, "m", user("plain words"))
    assert near is not None and exact != near
    assert fingerprints(CALLER, "m", user("x"), near_duplicates=False)[1] is None


def test_answer_fingerprint_is_the_same_whole_or_streamed() -> None:
    whole = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there",
             "tool_calls": [{"id": "c", "type": "function", "function": {
                 "name": "get", "arguments": "{\"id\":1}"}}]}}]}
    pieces = [{"choices": [{"index": 0, "delta": {"content": "Hello"}}]},
              {"choices": [{"index": 0, "delta": {"content": " there"}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"name": "get", "arguments": "{\"id\""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": ":1}"}}]}}]}]
    meter = StreamMeter("openai", False)
    assert meter.answer_fingerprint == ""
    for payload in pieces:
        meter.feed(f"data: {json.dumps(payload)}\n\n".encode())
    expected = answer_fingerprint(PROVIDERS["openai"].response_output(whole))
    assert expected and meter.answer_fingerprint == expected
    other = {"choices": [{"index": 0, "message": {"content": "Hello there!"}}]}
    assert answer_fingerprint(PROVIDERS["openai"].response_output(other)) != expected
    assert answer_fingerprint([]) == answer_fingerprint([""]) == ""
    message = {"content": [{"type": "text", "text": "Hi"},
                           {"type": "tool_use", "name": "get", "input": {"id": 1}}]}
    assert PROVIDERS["anthropic"].response_output(message) == ["Hi", "get", '{"id":1}']
    responses = {"output": [{"type": "message", "content": [
        {"type": "output_text", "text": "Hi"}]}, {"type": "function_call", "name": "get",
                                                   "arguments": "{}"}]}
    assert PROVIDERS["openai"].response_output(responses) == ["Hi", "get", "{}"]


# -- configuration -----------------------------------------------------------------------


def test_near_duplicate_settings_and_the_removed_switch() -> None:
    loop = load_settings({}).loop
    assert (loop.max_hits, loop.window_seconds, loop.cooldown_seconds) == (5, 60, 30)
    assert (loop.near_duplicate, loop.near_max_hits, loop.near_window_seconds,
            loop.near_cooldown_seconds) == (True, 5, 120, 60)
    assert load_settings({"LOOP_GUARD_NEAR_DUPLICATE": "0"}).loop.near_duplicate is False
    for value in ("0", "1"):
        with pytest.raises(ConfigError, match="LOOP_GUARD_NORMALIZE was removed"):
            load_settings({"LOOP_GUARD_NORMALIZE": value})
    with pytest.raises(ConfigError, match="LOOP_GUARD_NEAR_DUPLICATE_MAX_HITS"):
        load_settings({"LOOP_GUARD_NEAR_DUPLICATE_MAX_HITS": "0"})


# -- the Lua state -----------------------------------------------------------------------

NEAR = "n" * 64
POLICY = GuardPolicy(loop_max_hits=5, near_max_hits=3, near_window_ms=60_000,
                     near_cooldown_ms=30_000)


def test_near_duplicate_streak_in_the_scripts(redis_server: RedisServer) -> None:
    async def call(store: BudgetStore, rid: str, answer: str) -> object:
        result = await store.reserve("c", rid, 100, 100, "e" + rid, NEAR)
        if isinstance(result, Reservation):
            assert await store.settle("c", rid, 10, NEAR, answer)
        return result

    async def scenario() -> list[object]:
        store = BudgetStore.from_url(redis_server.url, 1000, [-1] * len(WINDOWS), POLICY)
        out = [await call(store, f"r{i}", a) for i, a in enumerate("AABAAA")]
        streak = redis_server.client().zrange(caller_keys("c", "-", NEAR)["near_hits"], 0, -1)
        assert [m.split(b"|")[1] for m in streak] == [b"r3", b"r4", b"r5"]  # A after B
        assert 0 < redis_server.client().pttl(caller_keys("c", "-", NEAR)["near_hits"]) \
            <= 60_000
        out.append(await call(store, "r6", "C"))  # refused: the streak of A is full
        out.append(await call(store, "r7", "C"))  # in the cooldown
        # a late settle (already settled) records nothing
        assert not await store.settle("c", "r0", 10, NEAR, "Z")
        await store.close()
        return out

    out = run(scenario())
    assert all(isinstance(r, Reservation) for r in out[:6])
    assert out[6] == LoopRefusal("near_loop", 4, 30_000)
    assert isinstance(out[7], LoopRefusal) and out[7].hit_count == 5
    client = redis_server.client()
    keys = {k.decode() for k in client.scan_iter("*")}
    near_keys = {k for k in keys if k.endswith(NEAR)}
    # The block emptied the streak (only its cooldown is left); every key of the tiers
    # expires, and all share the caller's hash tag (one Redis Cluster slot).
    assert near_keys == {caller_keys("c", "-", NEAR)["near_cooldown"]}
    assert settle_keys("c", NEAR)["near_hits"] == caller_keys("c", "-", NEAR)["near_hits"]
    for key in near_keys | {k for k in keys if ":lp:" in k}:
        assert 0 < client.pttl(key) <= 60_000, key
    assert all(k.startswith("tf:{c}:") for k in keys)


def test_an_answer_is_recorded_only_with_a_fingerprint(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = BudgetStore.from_url(redis_server.url, 1000, [-1] * len(WINDOWS), POLICY)
        for i in range(6):  # no answer fingerprint (failed, cut, released): no streak
            assert isinstance(await store.reserve("c", f"r{i}", 1, 1, None, NEAR), Reservation)
            assert await store.settle("c", f"r{i}", 0, NEAR, "")
        off = BudgetStore.from_url(redis_server.url, 1000, [-1] * len(WINDOWS),
                                   GuardPolicy(loop_max_hits=5))
        for i in range(6):  # the tier off: nothing recorded, nothing refused
            assert isinstance(await off.reserve("d", f"r{i}", 1, 1, None, NEAR), Reservation)
            assert await off.settle("d", f"r{i}", 0, NEAR, "A")
        await store.close()
        await off.close()

    run(scenario())
    assert not [k for k in redis_server.client().scan_iter("*")
                if any(part in k for part in (b":nd:", b":nc:"))]


def run(coro):
    return asyncio.run(coro)


# -- the fake answers like a model -------------------------------------------------------


def test_the_fake_answers_by_input(fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key="sk-fake", max_retries=0)

    def answer(text: str, **headers: str) -> str:
        reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=8,
                                               messages=user(text), extra_headers=headers)
        assert reply.usage is not None and reply.usage.completion_tokens == 8
        return reply.choices[0].message.content or ""

    tickets = [answer(f"Summarise ticket {n}") for n in range(1041, 1051)]
    assert len(set(tickets)) == 10  # a model answers each ticket differently
    assert answer("Summarise ticket 1041") == tickets[0]  # and the same input the same way
    seeded = {answer(f"attempt {n}", **{"x-fake-answer-seed": "s"}) for n in range(4)}
    assert len(seeded) == 1


# -- through Envoy -----------------------------------------------------------------------


def spent(stack: Stack, key: str) -> int:
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return int(doc["windows"]["total"]["spent_nano_usd"])


def test_a_thousand_templated_prompts_are_never_blocked(stack: Stack, fake: FakeProvider,
                                                        api_key: str) -> None:
    client = openai_client(stack, api_key)
    template = ("Summarise support ticket #{n} opened 2026-11-{d:02d}T09:{m:02d}:00Z by "
                "user {n}7 in two sentences.")

    def one(n: int) -> int:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=4,
            messages=user(template.format(n=1000 + n, d=1 + n % 28, m=n % 60)))
        return reply.usage.completion_tokens if reply.usage else -1

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(one, range(1000)))
    elapsed = time.monotonic() - started
    assert outputs == [4] * 1000  # every one answered: no 429 raised
    assert requests_for(fake, api_key) == 1000
    assert elapsed < 30, f"1,000 calls took {elapsed:.1f} s"
    print(f"1,000 templated prompts through Envoy in {elapsed:.1f} s")


def test_streamed_agent_loops_are_blocked_openai(stack: Stack, fake: FakeProvider,
                                                 api_key: str) -> None:
    client = openai_client(stack, api_key)

    def turn(n: int, seed: str) -> str:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=6, stream=True,
            extra_headers={"x-fake-answer-seed": seed},
            messages=user(f"Check build #{n} status, retry {n} at 12:0{n}:00"))
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    # Different streamed answers: never a loop.
    assert len({turn(n, f"build-{n}") for n in range(1, 8)}) == 7
    # The same streamed answer every time: the 6th is refused.
    assert len({turn(n, "stuck") for n in range(1, 6)}) == 1
    # The fake records a stream after its last write, which the client may read first.
    assert fake.wait_idle(api_key)
    before = (requests_for(fake, api_key), spent(stack, api_key))
    with pytest.raises(openai.RateLimitError) as raised:
        turn(6, "stuck")
    assert raised.value.response.json()["detail"]["error"] == "near_duplicate_loop_detected"
    assert (requests_for(fake, api_key), spent(stack, api_key)) == before


def test_agent_loops_are_blocked_anthropic(stack: Stack, fake: FakeProvider,
                                           api_key: str) -> None:
    client = anthropic_client(stack, api_key)

    def turn(n: int, stream: bool) -> str:
        kwargs = {"model": "claude-haiku-4-5", "max_tokens": 5,
                  "extra_headers": {"x-fake-answer-seed": "stuck"},
                  "messages": user(f"poll job 77{n} (attempt {n})")}
        if stream:
            with client.messages.stream(**kwargs) as s:
                return "".join(s.text_stream)
        return client.messages.create(**kwargs).content[0].text

    # JSON and streamed answers of the same text have the same fingerprint.
    assert len({turn(n, stream=n % 2 == 0) for n in range(1, 6)}) == 1
    # The fake records a stream after its last write, which the client may read first.
    assert fake.wait_idle(api_key)
    before = (requests_for(fake, api_key), spent(stack, api_key))
    with pytest.raises(anthropic.RateLimitError) as raised:
        turn(6, stream=False)
    body = raised.value.response.json()
    assert body["type"] == "error" and body["detail"]["hit_count"] == 6
    assert body["detail"]["error"] == "near_duplicate_loop_detected"
    assert raised.value.response.headers["retry-after"] == "60"
    assert (requests_for(fake, api_key), spent(stack, api_key)) == before
    caller = key_id(stack.secret.encode(), api_key)
    assert all(k.startswith(f"tf:{{{caller}}}".encode())
               for k in stack.redis.client().scan_iter(f"*{caller}*"))
