"""Recursive loop guard through Envoy with the official SDKs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tokenfuse.identity import key_id
from tokenfuse.policy.loopguard import fingerprint, near_duplicate_fingerprint

SEED_MESSAGE = ("Blocked: identical request sent 6 times in 60 seconds. This usually indicates "
                "an agent retry loop, infinite recursion, or misconfigured automation.")


NEAR_MESSAGE = ("Blocked: near-identical request sent 6 times in 120 seconds, answered "
                "identically each time (the prompts differ only in numbers, ids or "
                "timestamps). This usually indicates an agent loop that is not making "
                "progress.")


def ask(stack: Stack, key: str, content: str, model: str = "gpt-4o-mini",
        history: list | None = None,
        answer_seed: str | None = None) -> openai.types.chat.ChatCompletion:
    """One chat call; `answer_seed` makes the fake answer the same for every prompt sent
    with it (a stuck agent gets its answer back whatever timestamp it adds)."""
    headers = {} if answer_seed is None else {"x-fake-answer-seed": answer_seed}
    return openai_client(stack, key).chat.completions.create(
        model=model, max_tokens=3, extra_headers=headers,
        messages=[*(history or []), {"role": "user", "content": content}])


def attempt(n: int) -> str:
    """An agent's retry: the same request but for its attempt number, id and timestamp."""
    return (f"Attempt {n} of 5: fetch order status (request id req_{n}a9f3c2e1) at "
            f"2026-11-21T14:0{n % 10}:{n // 10:02d}Z")


def spent(stack: Stack, key: str) -> dict:
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return doc["windows"]["total"]


def test_seed_scenario(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    for _ in range(5):
        assert ask(stack, api_key, "Summarise the logs").usage is not None
    before_spent = spent(stack, api_key)
    with pytest.raises(openai.RateLimitError) as raised:
        ask(stack, api_key, "Summarise the logs")
    error = raised.value
    assert error.status_code == 429
    assert SEED_MESSAGE in error.message  # the SDK surfaces the message
    assert error.response.headers["retry-after"] == "30"
    body = error.response.json()
    caller = key_id(stack.secret.encode(), api_key)
    fp = fingerprint(caller, "gpt-4o-mini", [{"role": "user", "content": "Summarise the logs"}])
    assert body["detail"] == {
        "error": "recursive_loop_detected", "message": SEED_MESSAGE,
        "fingerprint": fp[:12] + "...", "hit_count": 6, "cooldown_seconds": 30}
    assert body["error"]["code"] == "recursive_loop_detected"
    with pytest.raises(openai.RateLimitError) as seventh:  # still cooling down
        ask(stack, api_key, "Summarise the logs")
    assert seventh.value.response.json()["detail"]["hit_count"] == 7
    assert requests_for(fake, api_key) == 5  # refused ones never reached the provider
    assert spent(stack, api_key) == before_spent  # and reserved nothing
    assert ask(stack, api_key, "Something else entirely").usage is not None  # variation resets


def test_anthropic_sdk_surfaces_the_loop(stack: Stack, api_key: str) -> None:
    client = anthropic_client(stack, api_key)
    for _ in range(5):
        client.messages.create(model="claude-haiku-4-5", max_tokens=3,
                               messages=[{"role": "user", "content": "again"}])
    with pytest.raises(anthropic.RateLimitError) as raised:
        client.messages.create(model="claude-haiku-4-5", max_tokens=3,
                               messages=[{"role": "user", "content": "again"}])
    assert "identical request sent 6 times" in str(raised.value)
    assert raised.value.response.json()["detail"]["error"] == "recursive_loop_detected"


def test_sdk_default_retries_do_not_retry_the_loop(stack: Stack, api_key: str) -> None:
    """The SDKs retry a 429 twice by default (after retry-after); tokenfuse says not to."""
    client = openai.OpenAI(base_url=stack.envoy.base_url + "/openai/v1", api_key=api_key,
                           timeout=30)  # max_retries: the SDK's default (2)
    for _ in range(5):
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                       messages=[{"role": "user", "content": "retry me"}])
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                       messages=[{"role": "user", "content": "retry me"}])
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert raised.value.response.json()["detail"]["hit_count"] == 6  # asked once, not 3x


def test_keys_and_models_count_separately(stack: Stack, api_key: str) -> None:
    other_key = api_key + "-other"
    for _ in range(5):
        ask(stack, api_key, "same words")
        ask(stack, other_key, "same words")
        ask(stack, api_key, "same words", model="gpt-4o")
    with pytest.raises(openai.RateLimitError):
        ask(stack, api_key, "same words")


def test_near_duplicate_agent_loop_is_blocked(stack: Stack, fake: FakeProvider,
                                              api_key: str) -> None:
    answers = {ask(stack, api_key, attempt(n), answer_seed="stuck").choices[0].message.content
               for n in range(1, 6)}
    assert len(answers) == 1  # the loop got the same answer back each time
    before_spent = spent(stack, api_key)
    with pytest.raises(openai.RateLimitError) as raised:
        ask(stack, api_key, attempt(6), answer_seed="stuck")
    error = raised.value
    assert error.response.headers["retry-after"] == "60"
    caller = key_id(stack.secret.encode(), api_key)
    near = near_duplicate_fingerprint(caller, "gpt-4o-mini",
                                      [{"role": "user", "content": attempt(6)}])
    body = error.response.json()
    assert body["error"]["code"] == "near_duplicate_loop_detected"
    assert body["detail"] == {
        "error": "near_duplicate_loop_detected", "message": NEAR_MESSAGE,
        "fingerprint": near[:12] + "...", "hit_count": 6, "cooldown_seconds": 60}
    with pytest.raises(openai.RateLimitError) as seventh:  # in the cooldown: any answer
        ask(stack, api_key, attempt(7))
    assert seventh.value.response.json()["detail"]["hit_count"] == 7
    assert requests_for(fake, api_key) == 5
    assert spent(stack, api_key) == before_spent  # refused ones are not billed
    assert 'tokenfuse_loops_detected_total{kind="near_duplicate_loop"}' in \
        stack.processor.metrics()


def test_near_duplicates_with_different_answers_pass(stack: Stack, api_key: str) -> None:
    # Same template, different inputs: the answers differ, so nothing repeats.
    answers = [ask(stack, api_key, f"Summarise ticket {1041 + i}").choices[0].message.content
               for i in range(12)]
    assert len(set(answers)) > 1
    # The loop's answer repeats 4 times, then one differs: the streak starts again, so 5
    # more identical answers pass and only the one after them is refused.
    for n in range(1, 5):
        ask(stack, api_key, attempt(n), answer_seed="stuck")
    ask(stack, api_key, attempt(5), answer_seed="unstuck")
    for n in range(6, 11):
        ask(stack, api_key, attempt(n), answer_seed="stuck")
    with pytest.raises(openai.RateLimitError) as raised:
        ask(stack, api_key, attempt(11), answer_seed="stuck")
    assert raised.value.response.json()["detail"]["hit_count"] == 6


def test_normal_conversations_and_batches_pass(stack: Stack, api_key: str) -> None:
    history: list = []
    for turn in ["Hi!", "What is a monad?", "Give an example.", "In Python?", "Thanks.",
                 "Another question.", "What about functors?", "And applicatives?"]:
        reply = ask(stack, api_key, turn, history=history)
        history += [{"role": "user", "content": turn},
                    {"role": "assistant", "content": reply.choices[0].message.content}]
    topics = ["apples", "rivers", "jazz", "volcanoes", "chess", "tea", "glaciers", "owls",
              "bridges", "comets", "tango", "maples"]
    for topic in topics:
        assert ask(stack, api_key + "-batch", f"Write a haiku about {topic}.").usage


def _tool_history(times: int, anthropic_format: bool) -> list:
    history: list = [{"role": "user", "content": "What's the weather in Paris?"}]
    for i in range(times):
        if anthropic_format:
            history += [
                {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{i}",
                 "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}",
                 "content": f"error {i}: upstream timeout"}]}]
        else:
            history += [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": f"c{i}", "content": f"error {i}: timeout"}]
    return history


def test_tool_call_loops(stack: Stack, fake: FakeProvider, api_key: str) -> None:
    client = openai_client(stack, api_key)
    ok = client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                        messages=_tool_history(5, False))
    assert ok.usage is not None
    before = requests_for(fake, api_key)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                       messages=_tool_history(6, False))
    detail = raised.value.response.json()["detail"]
    assert detail["error"] == "tool_loop_detected"
    assert detail["tool"] == "get_weather" and detail["repeat_count"] == 6
    with pytest.raises(anthropic.RateLimitError) as raised_a:
        anthropic_client(stack, api_key).messages.create(
            model="claude-haiku-4-5", max_tokens=3, messages=_tool_history(6, True))
    assert raised_a.value.response.json()["detail"]["error"] == "tool_loop_detected"
    assert requests_for(fake, api_key) == before
    metrics = stack.processor.metrics()
    assert 'tokenfuse_loops_detected_total{kind="tool_loop"}' in metrics


# -- short windows: timing behaviour ------------------------------------------------------

WINDOW_S, COOLDOWN_S = 4, 2


@pytest.fixture(scope="module")
def fast_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"LOOP_GUARD_WINDOW_SECONDS": str(WINDOW_S),
                              "LOOP_GUARD_COOLDOWN_SECONDS": str(COOLDOWN_S),
                              "LOOP_GUARD_NEAR_DUPLICATE_WINDOW_SECONDS": str(WINDOW_S),
                              "LOOP_GUARD_NEAR_DUPLICATE_COOLDOWN_SECONDS": str(COOLDOWN_S),
                              "TOKENFUSE_VELOCITY_MAX_PER_MINUTE": "30"}).start()
    yield s
    s.cleanup()


def _cooling(stack: Stack, key: str, tier: str) -> bool:
    """Whether the caller has a cooldown of the tier (`lc` exact, `nc` near-duplicate)."""
    caller = key_id(stack.secret.encode(), key)
    return any(True for _ in stack.redis.client().scan_iter(f"tf:{{{caller}}}:{tier}:*"))


def test_after_the_cooldown_counting_starts_again(fast_stack: Stack, api_key: str) -> None:
    for _ in range(5):
        ask(fast_stack, api_key, "poll")
    with pytest.raises(openai.RateLimitError) as raised:
        ask(fast_stack, api_key, "poll")
    assert raised.value.response.headers["retry-after"] == str(COOLDOWN_S)
    assert raised.value.response.json()["detail"]["message"].startswith(
        f"Blocked: identical request sent 6 times in {WINDOW_S} seconds.")
    with pytest.raises(openai.RateLimitError):  # the 7th, in the cooldown
        ask(fast_stack, api_key, "poll")
    wait_until(lambda: not _cooling(fast_stack, api_key, "lc"), timeout=COOLDOWN_S + 5,
               what="the cooldown to pass")
    # retry-after told the truth: the block started the count from zero, so 5 pass again
    # (the first 5 may still be inside the window), and the 6th is a loop again.
    for _ in range(5):
        assert ask(fast_stack, api_key, "poll").usage is not None
    with pytest.raises(openai.RateLimitError) as again:
        ask(fast_stack, api_key, "poll")
    assert again.value.response.json()["detail"]["hit_count"] == 6


def test_near_duplicate_cooldown_then_the_loop_may_go_on(fast_stack: Stack,
                                                         api_key: str) -> None:
    for n in range(1, 6):
        ask(fast_stack, api_key, attempt(n), answer_seed="stuck")
    with pytest.raises(openai.RateLimitError) as raised:
        ask(fast_stack, api_key, attempt(6), answer_seed="stuck")
    assert raised.value.response.headers["retry-after"] == str(COOLDOWN_S)
    assert raised.value.response.json()["error"]["code"] == "near_duplicate_loop_detected"
    wait_until(lambda: not _cooling(fast_stack, api_key, "nc"), timeout=COOLDOWN_S + 5,
               what="the near-duplicate cooldown to pass")
    assert ask(fast_stack, api_key, attempt(7), answer_seed="stuck").usage is not None


def test_sliding_window_has_no_bucket_boundary(fast_stack: Stack, api_key: str) -> None:
    # 3 requests just before a WINDOW_S-aligned boundary, 2 just after: a fixed-bucket
    # counter would have reset at the boundary; the sliding window still sees 5.
    wait_until(lambda: WINDOW_S - 1.6 <= time.time() % WINDOW_S < WINDOW_S - 1.0,
               timeout=WINDOW_S + 1, what="a moment before a bucket boundary")
    for _ in range(3):
        ask(fast_stack, api_key, "edge")
    wait_until(lambda: time.time() % WINDOW_S < 1.0, timeout=WINDOW_S, what="the boundary")
    for _ in range(2):
        ask(fast_stack, api_key, "edge")
    with pytest.raises(openai.RateLimitError) as raised:
        ask(fast_stack, api_key, "edge")
    assert raised.value.response.json()["detail"]["hit_count"] == 6


def test_velocity_breaker(fast_stack: Stack, fake: FakeProvider, api_key: str) -> None:
    for i in range(30):
        ask(fast_stack, api_key, "distinct " + "abcdefghijklmnopqrstuvwxyz"[i % 26] * (i + 1))
    before = requests_for(fake, api_key)
    with pytest.raises(openai.RateLimitError) as raised:
        ask(fast_stack, api_key, "one more, different")
    detail = raised.value.response.json()["detail"]
    assert detail["error"] == "velocity_limit_exceeded" and detail["limit_per_minute"] == 30
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60
    assert requests_for(fake, api_key) == before


def test_each_tier_has_its_own_switch(fake: FakeProvider, api_key: str) -> None:
    s = Stack(fake.base_url, {"LOOP_GUARD_MAX_HITS": "0"}).start()
    try:
        # Exact tier off: identical requests pass until the near-duplicate tier sees the
        # same answer 5 times in a row (an identical request is a near-duplicate too).
        for _ in range(5):
            assert ask(s, api_key, "same every time").usage is not None
        with pytest.raises(openai.RateLimitError) as raised:
            ask(s, api_key, "same every time")
        assert raised.value.response.json()["detail"]["error"] == \
            "near_duplicate_loop_detected"
    finally:
        s.cleanup()
    s = Stack(fake.base_url, {"LOOP_GUARD_MAX_HITS": "0",
                              "LOOP_GUARD_NEAR_DUPLICATE": "0"}).start()
    try:
        for _ in range(8):
            assert ask(s, api_key, "same every time").usage is not None
    finally:
        s.cleanup()
