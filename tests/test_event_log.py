"""The events feed (tf:events) through the real stack: a loop block, budget refusals, a
cut stream and a pool key's state change each show up once, with the right fields and no
secret; the admin side's writer and reader; the stream stays capped."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.fake_provider import FakeProvider
from tests.support.harness import RedisServer, Stack, wait_until
from tokenfuse.identity import key_id
from tokenfuse.state.event_log import read_events, record_sync
from tokenfuse.state.keys import EVENTS_KEY

POOL_KEYS = [f"sk-ant-events-pool-{i}-{'e' * 20}" for i in range(2)]


@pytest.fixture(scope="module")
def estack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_POOL_COOLDOWN_MS": "60000",
                              "TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300"})
    s.add_pool("ev-pool", "anthropic", "key,label\n" + "".join(
        f"{k},ev-{i}\n" for i, k in enumerate(POOL_KEYS)))
    s.start()
    yield s
    s.cleanup()


def events_of(stack: Stack, prefix: str, kind: str = "") -> list[dict[str, Any]]:
    assert stack.redis is not None
    return [e for e in read_events(stack.redis.client(), 1000, kind)
            if e["key_id_prefix"] == prefix]


def no_secret(stack: Stack, *secrets: str) -> None:
    assert stack.redis is not None
    raw = json.dumps([[k.decode(), {a.decode(): b.decode() for a, b in v.items()}]
                      for k, v in stack.redis.client().xrange(EVENTS_KEY)])
    for secret in secrets:
        assert secret not in raw


def test_loop_block_and_budget_refusals_show_up_once(estack: Stack) -> None:
    api_key = "sk-events-" + uuid.uuid4().hex
    caller = key_id(estack.secret.encode(), api_key)
    client = openai_client(estack, api_key)
    refused = 0
    for _ in range(7):  # LOOP_GUARD_MAX_HITS=5: the sixth and seventh are refused
        try:
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                           messages=[{"role": "user", "content": "again"}])
        except openai.RateLimitError:
            refused += 1
    assert refused == 2
    assert estack.cli("budget", "set", "--key", api_key, "--daily",
                      "0.000000001").returncode == 0
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                           messages=[{"role": "user", "content": "more"}])
    # One writer, in order: once the budget event is there, every earlier one is too.
    wait_until(lambda: events_of(estack, caller[:8], "budget.exceeded"),
               what="the budget event")
    loops = events_of(estack, caller[:8], "loop.detected")
    assert len(loops) == 1
    loop = loops[0]
    assert (loop["provider"], loop["model"], loop["pool"]) == ("openai", "gpt-4o-mini", "")
    assert loop["detail"]["kind"] == "recursive_loop" and loop["detail"]["hit_count"] == 6
    assert loop["detail"]["fingerprint"].endswith("...")
    (budget,) = events_of(estack, caller[:8], "budget.exceeded")
    assert budget["detail"]["window"] == "day" and budget["detail"]["limit_nano_usd"] == 1
    assert budget["at_ms"] >= loop["at_ms"] > 0
    assert [e["kind"] for e in events_of(estack, caller[:8])] == ["budget.exceeded",
                                                                 "loop.detected"]
    no_secret(estack, api_key, caller)


def test_a_cut_stream_shows_up_once(estack: Stack) -> None:
    api_key = "sk-events-" + uuid.uuid4().hex
    caller = key_id(estack.secret.encode(), api_key)
    assert estack.cli("budget", "set", "--key", api_key, "--daily",  # 150 output tokens
                      "0.000750000").returncode == 0
    with pytest.raises(anthropic.APIStatusError), anthropic_client(
            estack, api_key).messages.stream(
                model="claude-haiku-4-5", max_tokens=4000,
                messages=[{"role": "user", "content": "write a novel"}],
                extra_headers={"x-fake-chunk-delay-ms": "2",
                               "x-fake-output-tokens": "4000"}) as stream:
        for _ in stream.text_stream:
            pass
    wait_until(lambda: events_of(estack, caller[:8], "stream.cut"), what="the cut event")
    (cut,) = events_of(estack, caller[:8], "stream.cut")
    # The 80 % threshold was crossed on the way (TOKENFUSE_BUDGET_THRESHOLD_PERCENT).
    assert sorted(e["kind"] for e in events_of(estack, caller[:8])) == [
        "budget.threshold", "stream.cut"]
    assert (cut["provider"], cut["model"]) == ("anthropic", "claude-haiku-4-5")
    assert cut["detail"]["reason"] == "budget_exceeded"
    assert 0 < cut["detail"]["output_tokens_delivered"] <= 150
    no_secret(estack, api_key, caller)


def test_a_pool_key_state_change_shows_up(estack: Stack, fake: FakeProvider) -> None:
    vkey = estack.cli("vkey", "create", "--name", "ev", "--pool", "ev-pool").stdout.strip()
    fake.key_failures[POOL_KEYS[0]] = (429, 1)
    try:
        for i in range(2):  # round robin: one of them tries the failing key
            anthropic_client(estack, vkey).messages.create(
                model="claude-haiku-4-5", max_tokens=3,
                messages=[{"role": "user", "content": f"pooled {i}"}])
    finally:
        fake.key_failures.pop(POOL_KEYS[0], None)
    failing = key_id(estack.secret.encode(), POOL_KEYS[0])[:8]
    wait_until(lambda: [e for e in events_of(estack, "", "pool_key.state")
                        if e["detail"].get("pool_key") == failing], what="the state event")
    (change,) = [e for e in events_of(estack, "", "pool_key.state")
                 if e["detail"].get("pool_key") == failing]
    assert (change["pool"], change["provider"]) == ("ev-pool", "anthropic")
    assert change["detail"] == {"pool_key": failing, "state": "open", "before": "closed",
                                "status": 429}
    no_secret(estack, vkey, *POOL_KEYS)


def test_a_revoked_key_and_its_probe_show_up(estack: Stack, fake: FakeProvider) -> None:
    """401: the key is disabled (the attempt's report); the probe brings it back."""
    vkey = estack.cli("vkey", "create", "--name", "ev2", "--pool", "ev-pool").stdout.strip()
    revoked = key_id(estack.secret.encode(), POOL_KEYS[1])[:8]

    def changes() -> list[dict[str, Any]]:
        return [e["detail"] for e in events_of(estack, "", "pool_key.state")
                if e["detail"].get("pool_key") == revoked]

    # The other key may still cool down from the test before: back in rotation first.
    assert estack.cli("keys", "enable", "--pool", "ev-pool", "ev-0").returncode == 0
    fake.revoked_keys.add(POOL_KEYS[1])
    try:
        for i in range(4):
            with contextlib.suppress(anthropic.AuthenticationError):
                anthropic_client(estack, vkey).messages.create(
                    model="claude-haiku-4-5", max_tokens=3,
                    messages=[{"role": "user", "content": f"revoked {i}"}])
        wait_until(lambda: len(changes()) == 1, what="the key disabled")
    finally:
        fake.revoked_keys.discard(POOL_KEYS[1])  # the provider accepts it again
    wait_until(lambda: len(changes()) == 2, what="the probe to bring it back")
    probed, disabled = changes()  # newest first
    assert (disabled["before"], disabled["state"], disabled["status"]) == (
        "closed", "disabled", 401)
    assert (probed["before"], probed["state"], probed["probe"]) == ("disabled", "closed", True)


def test_admin_writer_reader_and_cap(redis_server: RedisServer) -> None:
    client = redis_server.client()
    first = record_sync(client, "key.killed", "0123456789abcdef", {"by": "ops"})
    record_sync(client, "pool_key.state", "", {"state": "disabled"}, provider="openai",
                pool="p")
    events = read_events(client, 10)
    assert [e["kind"] for e in events] == ["pool_key.state", "key.killed"]  # newest first
    assert events[1]["id"] == first and events[1]["key_id_prefix"] == "01234567"
    assert events[1]["detail"] == {"by": "ops"}
    assert read_events(client, 10, "key.killed") == [events[1]]
    assert len(read_events(client, 1)) == 1
    for i in range(250):
        record_sync(client, "key.killed", "k", {"i": i}, max_events=100)
    assert 100 <= client.xlen(EVENTS_KEY) < 250  # capped (MAXLEN ~: whole nodes)
    assert read_events(client, 3)[0]["detail"] == {"i": 249}
    assert read_events(client, 5, "pool_key.state") == []  # trimmed away
    big = record_sync(client, "x", "", {"text": "y" * 5000})
    assert read_events(client, 1)[0] == {**read_events(client, 1)[0], "id": big,
                                         "detail": {"truncated": True}}
