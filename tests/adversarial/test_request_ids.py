"""(a) A client-sent x-request-id is correlation only: it must not merge reservations,
hide a loop, or leave a reservation open."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import openai

from tests.adversarial.helpers import (
    async_openai,
    day,
    error_code,
    new_key,
    openai_client,
    openai_headers,
    set_daily,
    word,
)
from tests.adversarial.invariant import assert_bound_held
from tests.support.billing import billed_for, requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until

GPT = "gpt-4o-mini"


def test_pairs_sharing_a_request_id_are_reserved_and_settled_apart(
        stack: Stack, fake: FakeProvider) -> None:
    key, limit = new_key(), 50_000_000
    set_daily(stack, key, limit)

    async def one(client: openai.AsyncOpenAI, rid: str, i: int, stream: bool) -> int:
        # Both of a pair are held by the provider at once, so their reservations overlap.
        headers = {"x-request-id": rid, "x-fake-delay-ms": "300"}
        messages = [{"role": "user", "content": f"pair {word(i)} {'stream' * stream}"}]
        if stream:
            chunks = await client.chat.completions.create(
                model=GPT, max_tokens=30 + i, messages=messages, stream=True,  # type: ignore[arg-type]
                extra_headers=headers)
            return sum([1 async for c in chunks if c.choices and c.choices[0].delta.content])
        reply = await client.chat.completions.create(
            model=GPT, max_tokens=30 + i, messages=messages, extra_headers=headers)  # type: ignore[arg-type]
        assert reply.usage is not None
        return reply.usage.completion_tokens

    async def run() -> list[int]:
        client = async_openai(stack, key)
        try:
            rids = [f"shared-{uuid.uuid4()}" for _ in range(10)]
            return await asyncio.gather(*(one(client, rids[i], i, stream)
                                          for i in range(10) for stream in (False, True)))
        finally:
            await client.close()

    tokens = asyncio.run(run())
    assert tokens == [30 + i for i in range(10) for _ in (False, True)]
    assert requests_for(fake, key) == 20
    wait_until(lambda: day(stack, key)["reserved_nano_usd"] == 0, what="every settlement")
    # Each call settled to its own usage, exactly.
    assert day(stack, key)["spent_nano_usd"] == billed_for(fake, key)
    assert_bound_held(stack, fake, key, limit)


def test_a_constant_request_id_does_not_hide_a_loop(stack: Stack, fake: FakeProvider) -> None:
    key, limit = new_key(), 10_000_000
    set_daily(stack, key, limit)
    client = openai_client(stack, key)
    outcomes: list[int | str] = []
    for _ in range(12):  # well within LOOP_GUARD_WINDOW_SECONDS (60 s)
        try:
            client.chat.completions.create(
                model=GPT, max_tokens=5, extra_headers={"x-request-id": "the-same-id"},
                messages=[{"role": "user", "content": "retry the same thing forever"}])
            outcomes.append(200)
        except openai.APIStatusError as exc:
            outcomes.append(f"{exc.status_code} {error_code(exc.response)}")
    # LOOP_GUARD_MAX_HITS (5) identical requests pass; the 6th and later are a loop.
    assert outcomes == [200] * 5 + ["429 recursive_loop_detected"] * 7, outcomes
    assert requests_for(fake, key) == 5
    assert_bound_held(stack, fake, key, limit)


def test_200_concurrent_requests_sharing_one_id_leave_nothing_reserved(
        stack: Stack, fake: FakeProvider) -> None:
    key, limit = new_key(), 2_000_000  # $0.002: a few dozen of these calls
    set_daily(stack, key, limit)
    rid = f"flood-{uuid.uuid4()}"

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"model": GPT, "max_tokens": 60, "stream": i % 3 == 0,
                "messages": [{"role": "user", "content": f"flood {word(i)}"}]}
        response = await client.post("/openai/v1/chat/completions", json=body,
                                     headers={**openai_headers(key), "x-request-id": rid})
        return response.status_code

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=stack.envoy.base_url, timeout=60,
                                     limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    statuses = asyncio.run(run())
    assert set(statuses) <= {200, 402}, sorted(set(statuses))
    assert 0 < statuses.count(200) < 200
    assert fake.wait_idle(key)
    wait_until(lambda: day(stack, key)["reserved_nano_usd"] == 0, timeout=15,
               what="nothing left reserved")
    assert_bound_held(stack, fake, key, limit)
