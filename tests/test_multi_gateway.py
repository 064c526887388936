"""Several gateways, one budget: two complete stacks (two Envoys, two processors) on one
host share one Redis and one secret. A flood split across both is held to the budget to
the nano-dollar, the kill switch ends streams on both, and a budget set through one
stack's CLI is enforced by the other.

Every test runs twice: on one Redis node and on a real Redis Cluster of 3 masters + 3
replicas (`shared_redis`: its seed URL and the env that selects cluster mode).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.conftest import openai_client
from tests.support.billing import billed_for, day_window, requests_for, set_daily
from tests.support.fake_provider import FakeProvider
from tests.support.flood import flood_outcomes
from tests.support.harness import RedisServer, Stack
from tests.support.paced_stream import PacedStream
from tests.support.redis_cluster import RedisCluster

BUDGET_NANO = 10_000_000  # $0.01
REQUESTS = 1000  # half through each gateway, at the same time


@dataclass(frozen=True)
class SharedRedis:
    """The Redis both stacks use: its URL and what else a processor needs to reach it."""

    url: str
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module", params=["single", "cluster"])
def shared_redis(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRedis]:
    if request.param == "cluster":
        cluster = RedisCluster().start()
        try:
            yield SharedRedis(cluster.url, {"TOKENFUSE_REDIS_MODE": "cluster"})
        finally:
            cluster.cleanup()
        return
    server = RedisServer(Path(tmp_path_factory.mktemp("shared-redis")))
    server.start()
    try:
        yield SharedRedis(server.url)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateways(fake: FakeProvider, shared_redis: SharedRedis) -> Iterator[tuple[Stack, Stack]]:
    # One secret for both: a key's id (hence its budget) is the same through either.
    # Two processors, two Envoys, Redis and 1,000 clients on 2 shared cores: a decision
    # now and then waits past the default 250 ms Redis bound and is refused 503 (fail
    # closed); a wider bound keeps the count exact.
    env = {"TOKENFUSE_SECRET": "test-secret-" + os.urandom(8).hex(),
           "TOKENFUSE_LOG_LEVEL": "INFO", "TOKENFUSE_REDIS_TIMEOUT_MS": "2000",
           **shared_redis.env}
    stacks = [Stack(fake.base_url, env, redis_url=shared_redis.url) for _ in range(2)]
    try:
        for stack in stacks:
            stack.start()
        yield stacks[0], stacks[1]
    finally:
        for stack in stacks:
            stack.cleanup()


def _tally(outcomes: list[str]) -> tuple[int, int, list[str]]:
    allowed, refused = outcomes.count("allowed"), outcomes.count("status_402")
    return allowed, refused, [o for o in outcomes if o not in ("allowed", "status_402")]


def test_flood_across_two_gateways_never_exceeds_the_budget(
        gateways: tuple[Stack, Stack], fake: FakeProvider, api_key: str) -> None:
    one, two = gateways
    set_daily(one, api_key, BUDGET_NANO)  # through the first stack's CLI only
    half = REQUESTS // 2
    # Interleaved: request i through gateway i % 2, all 1,000 at once.
    outcomes = asyncio.run(flood_outcomes(
        [one.envoy.base_url + "/openai/v1", two.envoy.base_url + "/openai/v1"], api_key,
        REQUESTS))
    a1, r1, o1 = _tally(outcomes[0::2])
    a2, r2, o2 = _tally(outcomes[1::2])
    billed = billed_for(fake, api_key)
    day = day_window(two, api_key)  # read through the other stack's CLI
    print(f"\ntwo gateways: {a1} + {a2} allowed, {r1} + {r2} refused (402), "
          f"billed {billed} of {BUDGET_NANO} nano-USD ({100 * billed / BUDGET_NANO:.2f} %)")
    assert o1 == [] and o2 == []
    assert a1 + r1 == half and a2 + r2 == half
    assert a1 > 0 and a2 > 0  # both gateways spent from the one budget
    assert r1 > 0 and r2 > 0  # ... and both refused once it was gone
    assert requests_for(fake, api_key) == a1 + a2  # refused ones never reached the provider
    assert billed <= BUDGET_NANO  # not a nano-dollar over
    assert billed >= BUDGET_NANO * 9 // 10  # at least 90 % usable
    assert day["spent_nano_usd"] == billed
    assert day["reserved_nano_usd"] == 0


def _ask(stack: Stack, key: str) -> openai.types.chat.ChatCompletion:
    return openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def _refused(stack: Stack, key: str) -> str:
    with pytest.raises(openai.APIStatusError) as raised:
        _ask(stack, key)
    assert raised.value.status_code == 402
    return str(raised.value.response.json()["error"]["code"])


def test_a_budget_set_through_one_gateway_binds_the_other(
        gateways: tuple[Stack, Stack], fake: FakeProvider, api_key: str) -> None:
    one, two = gateways
    set_daily(two, api_key, 1)  # 1 nano-USD: less than any request
    before = requests_for(fake, api_key)
    _refused(one, api_key)
    assert requests_for(fake, api_key) == before
    set_daily(one, api_key, 10**9)  # raised through the other one
    assert _ask(two, api_key).usage is not None
    assert _ask(one, api_key).usage is not None
    window = day_window(two, api_key)
    assert window["limit_nano_usd"] == 10**9
    assert window["spent_nano_usd"] == billed_for(fake, api_key) > 0




def test_kill_switch_through_one_gateway_ends_streams_on_both(
        gateways: tuple[Stack, Stack], fake: FakeProvider, api_key: str) -> None:
    one, two = gateways
    streams = [PacedStream(one, api_key), PacedStream(two, api_key)]
    for stream in streams:
        assert stream.started.wait(20)
        assert stream.error is None
    assert one.cli("kill", "--key", api_key).returncode == 0  # the control channel
    at_kill = [stream.chunks for stream in streams]
    for stream in streams:
        stream.thread.join(20)
        assert not stream.thread.is_alive()
    for stream, chunks in zip(streams, at_kill, strict=True):
        assert stream.error is not None and "kill switch" in stream.error.message
        assert stream.chunks - chunks <= 2  # the chunk in flight, at most one more
    assert fake.wait_idle(api_key)
    before = requests_for(fake, api_key)
    assert _refused(one, api_key) == "killed"
    assert _refused(two, api_key) == "killed"
    assert requests_for(fake, api_key) == before
    assert two.cli("kill", "--key", api_key, "--lift").returncode == 0
    assert _ask(one, api_key).usage is not None
    assert day_window(one, api_key)["reserved_nano_usd"] == 0
