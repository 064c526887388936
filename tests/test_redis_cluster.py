"""tokenfuse on a real local Redis Cluster (3 masters + 3 replicas, tests/support/redis_cluster.py).

One cluster and one stack for the module (TOKENFUSE_REDIS_MODE=cluster, REDIS_URL = the
seed node). Callers are picked so that their keys live on a chosen master. The router
(state/cluster_pipe.py) is tested on its own against the same cluster: MOVED, ASK
(with NOSCRIPT on the importing node) and a script reaching into another slot. The
failover test kills the seed's master mid-flood and restarts it at the end. (Longer than
most test modules: one cluster started once serves every scenario, hence its length.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import billed_for, key_of, requests_for, usage_cost
from tests.support.fake_provider import FakeProvider
from tests.support.flood import flood_outcomes, spell
from tests.support.harness import Stack, wait_until
from tests.support.paced_stream import PacedStream
from tests.support.redis_cluster import ClusterNode, RedisCluster
from tokenfuse.config import WINDOWS, ConfigError, load_settings
from tokenfuse.identity import key_id
from tokenfuse.pools.secrets import PoolKey
from tokenfuse.state import eviction
from tokenfuse.state.admin import BudgetAdmin
from tokenfuse.state.analytics import (
    AnalyticsPolicy,
    AnalyticsReader,
    CallFacts,
    RefusalRecorder,
    calendar_window,
    group_of,
)
from tokenfuse.state.budgets import BudgetStore, GuardPolicy, LoopRefusal, Refusal, Reservation
from tokenfuse.state.cluster_pipe import ClusterPipelinedRedis
from tokenfuse.state.connection import async_client, sync_client
from tokenfuse.state.control import ControlWatcher
from tokenfuse.state.keys import limits_key, pool_key, reservations_key
from tokenfuse.state.pools import PoolAdmin, PoolStore
from tokenfuse.state.redis_pipe import Script
from tokenfuse.state.scripts import LuaScript

CLAUDE_KEYS = [f"sk-ant-cluster-pool-{i}-{'z' * 20}" for i in range(2)]
NO_LIMITS = [-1] * len(WINDOWS)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster().start()
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def cstack(cluster: RedisCluster, fake: FakeProvider) -> Iterator[Stack]:
    # Generous bounds: a flood on a busy 2-core machine must not time out (a dead node
    # still fails at once: connection refused).
    s = Stack(fake.base_url, {"TOKENFUSE_REDIS_MODE": "cluster",
                              "TOKENFUSE_REDIS_TIMEOUT_MS": "2000",
                              "TOKENFUSE_PROCESSOR_TIMEOUT_MS": "10000",
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000"}, redis_url=cluster.url)
    s.add_pool("claude-main", "anthropic", "key,label\n" + "".join(
        f"{k},claude-{i}\n" for i, k in enumerate(CLAUDE_KEYS)))
    s.start()
    yield s
    s.cleanup()


_serial = itertools.count()


def key_on(stack: Stack, cluster: RedisCluster, node: ClusterNode) -> str:
    """A fresh API key whose caller's keys live on master `node`."""
    while True:
        key = f"sk-cluster-{os.getpid()}-{next(_serial)}-{os.urandom(4).hex()}"
        if cluster.master_of(limits_key(key_id(stack.secret.encode(), key))) is node:
            return key


def status(stack: Stack, key: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = stack.cli("budget", "status", "--key", key, "--json") if env is None else \
        _cli(stack, env, "budget", "status", "--key", key, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _cli(stack: Stack, env: dict[str, str], *args: str):
    saved = stack.env
    stack.env = env
    try:
        return stack.cli(*args)
    finally:
        stack.env = saved


def non_seed_masters(cluster: RedisCluster) -> list[ClusterNode]:
    return [m for m in cluster.masters() if m is not cluster.seed]


def test_cluster_mode_settings() -> None:
    base = {"TOKENFUSE_SECRET": "x"}
    assert load_settings(base).redis.mode == "single"
    on = load_settings({**base, "TOKENFUSE_REDIS_MODE": "cluster",
                        "REDIS_URL": "redis://10.0.0.7:7000"})
    assert on.redis.cluster and not on.redis.allow_eviction
    assert load_settings({**base, "TOKENFUSE_ALLOW_EVICTION": "1"}).redis.allow_eviction
    for env in ({"TOKENFUSE_REDIS_MODE": "cluster"},  # make run's own Redis: one node
                {"TOKENFUSE_REDIS_MODE": "cluster", "REDIS_URL": "unix:///tmp/r.sock"},
                {"TOKENFUSE_REDIS_MODE": "sentinel"}):
        with pytest.raises(ConfigError, match="TOKENFUSE_REDIS_MODE"):
            load_settings({**base, **env})


# -- through Envoy, on the cluster ------------------------------------------------------


def test_flood_is_held_to_the_budget_on_every_master(cstack: Stack, cluster: RedisCluster,
                                                     fake: FakeProvider) -> None:
    """600 requests at once, a third for each of three callers whose keys are on three
    masters: each held to its $0.003 to the nano-dollar."""
    budget = 3_000_000
    keys = [key_on(cstack, cluster, m) for m in cluster.masters()]
    assert len(keys) == 3
    for key in keys:
        assert cstack.cli("budget", "set", "--key", key, "--daily", "0.003").returncode == 0

    async def floods() -> list[list[str]]:
        return await asyncio.gather(*(flood_outcomes(cstack.envoy.base_url + "/openai/v1",
                                                     key, 200) for key in keys))

    for key, outcomes in zip(keys, asyncio.run(floods()), strict=True):
        allowed = outcomes.count("allowed")
        assert set(outcomes) == {"allowed", "status_402"}, set(outcomes)
        assert requests_for(fake, key) == allowed
        billed = billed_for(fake, key)
        day = status(cstack, key)["windows"]["day"]
        print(f"\ncluster flood: {allowed} allowed of 200, billed {billed} of {budget}", end="")
        assert budget * 9 // 10 <= billed <= budget
        assert day["spent_nano_usd"] == billed
        assert day["reserved_nano_usd"] == 0
    # Each master holds its caller's keys (and only its callers').
    for key, master in zip(keys, cluster.masters(), strict=True):
        prefix = limits_key(key_id(cstack.secret.encode(), key)).removesuffix(":b")
        assert list(master.client().scan_iter(prefix + "*")), master.port
        for other in cluster.masters():
            if other is not master:
                assert not list(other.client().scan_iter(prefix + "*"))


def test_stream_is_cut_at_its_budget(cstack: Stack, cluster: RedisCluster,
                                     fake: FakeProvider) -> None:
    key = key_on(cstack, cluster, non_seed_masters(cluster)[0])
    budget = 150 * 600  # 150 gpt-4o-mini output tokens
    assert cstack.cli("budget", "set", "--key", key, "--daily",
                      f"0.{budget:09d}").returncode == 0
    delivered = 0
    with pytest.raises(openai.APIError) as raised:
        for chunk in openai_client(cstack, key).chat.completions.create(
                model="gpt-4o-mini", stream=True,
                extra_headers={"x-fake-chunk-delay-ms": "2", "x-fake-output-tokens": "4000"},
                messages=[{"role": "user", "content": "write a novel"}]):
            if chunk.choices and chunk.choices[0].delta.content:
                delivered += 1
    assert "budget exhausted" in raised.value.message
    assert 80 < delivered <= 150
    wait_until(lambda: any(r.usage is not None for r in list(fake.records)
                           if key_of(r.headers) == key), what="the stream to be billed")
    day = status(cstack, key)["windows"]["day"]
    billed = sum(usage_cost(r.usage) for r in list(fake.records)
                 if r.usage is not None and key_of(r.headers) == key)
    assert day["reserved_nano_usd"] == 0
    assert billed <= day["spent_nano_usd"] <= budget


def test_analytics_are_read_across_every_master(cstack: Stack, cluster: RedisCluster,
                                               fake: FakeProvider) -> None:
    """Callers on each master; the reader (one SCAN over every master) sees each one's
    spend as `budget status` does."""
    keys = [key_on(cstack, cluster, master) for master in cluster.masters()]
    for key in keys:
        openai_client(cstack, key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    start, end = calendar_window("day", int(time.time() * 1000))
    reader = AnalyticsReader(sync_client(cluster.url, True))
    _, by_key = reader.usage(start - 86_400_000, end, "key")
    for key in keys:
        mine = by_key[key_id(cstack.secret.encode(), key)]
        assert mine.spend_nano == status(cstack, key)["windows"]["total"]["spent_nano_usd"]
        assert mine.spend_nano == billed_for(fake, key) > 0 and mine.requests == 1
    assert reader.live_streams() == 0


def test_loop_guard_refuses_the_sixth_identical_request(cstack: Stack, cluster: RedisCluster,
                                                        fake: FakeProvider) -> None:
    key = key_on(cstack, cluster, non_seed_masters(cluster)[1])
    client = openai_client(cstack, key)
    for _ in range(5):
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                       messages=[{"role": "user", "content": "loop me"}])
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
                                       messages=[{"role": "user", "content": "loop me"}])
    assert raised.value.response.json()["detail"]["hit_count"] == 6
    assert requests_for(fake, key) == 5


def test_pool_failover_on_the_cluster(cstack: Stack, fake: FakeProvider) -> None:
    created = cstack.cli("vkey", "create", "--name", "cluster-app", "--pool", "claude-main")
    assert created.returncode == 0, created.stderr
    vkey = created.stdout.strip()
    listed = cstack.cli("keys", "list", "--pool", "claude-main", "--json")
    assert {r["label"] for r in json.loads(listed.stdout)} == {"claude-0", "claude-1"}
    fake.key_failures[CLAUDE_KEYS[0]] = (429, 30)
    since = len(fake.records)
    try:
        texts = [anthropic_client(cstack, vkey).messages.create(
            model="claude-haiku-4-5", max_tokens=3,
            messages=[{"role": "user", "content": f"pool {i}"}]).content[0].text
            for i in range(4)]
    finally:
        del fake.key_failures[CLAUDE_KEYS[0]]
    assert all(texts)
    attempts = [key_of(r.headers) for r in list(fake.records)[since:] if r.method == "POST"]
    assert attempts.count(CLAUDE_KEYS[0]) == 1  # failed once, then cooled down
    assert attempts.count(CLAUDE_KEYS[1]) == 4
    billed = sum(usage_cost(r.usage) for r in list(fake.records)[since:]
                 if r.method == "POST" and r.usage is not None and r.completed)
    day = status(cstack, vkey)["windows"]["day"]
    assert day["spent_nano_usd"] == billed > 0


def test_pools_are_listed_from_every_master(cstack: Stack, cluster: RedisCluster) -> None:
    """`keys list` without --pool SCANs for pools: one pool on each master, all found."""
    names = {}
    for i in itertools.count():
        name = f"spread-{os.getpid()}-{i}"
        names.setdefault(cluster.master_of(pool_key(name, "keys")).port, name)
        if len(names) == 3:
            break
    for name in names.values():
        done = cstack.cli("keys", "import", "--pool", name, "--provider", "anthropic",
                          str(cstack.workdir / "pools" / "claude-main.csv"))
        assert done.returncode == 0, done.stderr
    listed = cstack.cli("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["pool"] for r in json.loads(listed.stdout)} >= {*names.values(), "claude-main"}


def test_reaper_scans_every_master(cstack: Stack, cluster: RedisCluster) -> None:
    """Orphaned reservations of callers on the seed and on the other masters are all
    found by the reaper's SCAN and charged."""
    secret = cstack.secret.encode()
    keys = [key_on(cstack, cluster, m) for m in cluster.masters()]

    async def orphan_then_reap() -> tuple[int, int, list[int]]:
        store = BudgetStore.from_url(cluster.url, 1000, NO_LIMITS, cluster=True)
        try:
            grants = []
            for i, key in enumerate(keys):
                granted = await store.reserve(key_id(secret, key), f"orphan-{i}", 1000 + i)
                grants.append(granted.granted_nano)
            count, nano = await store.reap(-1000)
        finally:
            await store.close()
        return count, nano, grants

    count, nano, grants = asyncio.run(orphan_then_reap())
    assert grants == [1000, 1001, 1002]
    assert count >= 3 and nano >= sum(grants)  # others' orphans may be reaped as well
    for key, grant in zip(keys, grants, strict=True):
        total = status(cstack, key)["windows"]["total"]
        assert total == {**total, "spent_nano_usd": grant, "reserved_nano_usd": 0}
        assert not cluster.master_of(reservations_key(key_id(secret, key))).client().exists(
            reservations_key(key_id(secret, key)))


def test_kill_switch_and_cli_on_the_cluster(cstack: Stack, cluster: RedisCluster) -> None:
    key = key_on(cstack, cluster, non_seed_masters(cluster)[0])
    consumer = PacedStream(cstack, key)
    assert consumer.started.wait(20)
    assert cstack.cli("kill", "--key", key).returncode == 0
    at_kill = consumer.chunks
    consumer.thread.join(20)
    assert consumer.error is not None and "kill switch" in consumer.error.message
    assert consumer.chunks - at_kill <= 2  # over the control channel, not a later extension
    assert status(cstack, key)["killed"] is True
    assert cstack.cli("kill", "--key", key, "--lift").returncode == 0
    assert cstack.cli("budget", "set", "--key", key, "--hourly", "2.5").returncode == 0
    doc = status(cstack, key)
    assert doc["killed"] is False
    assert doc["windows"]["hour"]["limit_nano_usd"] == 2_500_000_000




# -- the router on its own --------------------------------------------------------------

ECHO_KEY = Script("redis.call('SET', KEYS[1], ARGV[1]) return redis.call('GET', KEYS[1])")


def _free_key(cluster: RedisCluster, owner: ClusterNode, stem: str) -> str:
    """A key with a hash tag of its own whose slot `owner` serves and holds no key."""
    for i in itertools.count():
        key = f"test:{{{stem}-{os.urandom(3).hex()}-{i}}}:x"
        if cluster.master_of(key) is owner and not owner.client().execute_command(
                "CLUSTER", "COUNTKEYSINSLOT", owner.client().cluster("keyslot", key)):
            return key
    raise AssertionError("unreachable")


def _start_migration(cluster: RedisCluster, slot: int, source: ClusterNode,
                     target: ClusterNode) -> None:
    target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING",
                                    cluster.node_id(source))
    source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING",
                                    cluster.node_id(target))


def _end_migration(cluster: RedisCluster, slot: int, target: ClusterNode) -> None:
    """The slot is the target's (its config epoch bumped: the others follow) on every
    node."""
    owner = cluster.node_id(target)
    target.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)
    for node in cluster.masters():
        if node is not target:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)
    wait_until(lambda: all(cluster.owner_of_slot(slot, n) == target.port
                           for n in cluster.running()),
               what="every node to agree on the slot's owner")


def test_router_follows_moved(cluster: RedisCluster) -> None:
    source, target = non_seed_masters(cluster)[:2]
    key = _free_key(cluster, source, "moved")
    slot = source.client().cluster("keyslot", key)

    async def scenario() -> None:
        pipe = ClusterPipelinedRedis(cluster.url, 1.0)
        try:
            assert await pipe.evalsha(ECHO_KEY, [key], ["before"]) == b"before"
            source.client().delete(key)
            _start_migration(cluster, slot, source, target)
            _end_migration(cluster, slot, target)  # the router's map is now stale
            assert await pipe.evalsha(ECHO_KEY, [key], ["after"]) == b"after"
            assert pipe._slots[slot] is pipe._nodes[("127.0.0.1", target.port)]
        finally:
            await pipe.close()

    asyncio.run(scenario())
    assert target.client().get(key) == b"after"
    assert source.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0


def test_router_follows_ask_during_a_migration(cluster: RedisCluster) -> None:
    """Slot migrating from A to B, the key already moved: A answers ASK, the router sends
    ASKING + the script to B (which lacks the script: NOSCRIPT, then EVAL), and keeps its
    map. Keys still on A are served by A."""
    a, b = non_seed_masters(cluster)[:2]
    moved = _free_key(cluster, a, "ask")
    slot = a.client().cluster("keyslot", moved)
    stay = f"{moved}:stay"  # same tag, same slot
    a.client().set(moved, "v0")
    a.client().set(stay, "s0")
    b.client().script_flush()
    _start_migration(cluster, slot, a, b)
    a.client().execute_command("MIGRATE", "127.0.0.1", b.port, "", 0, 5000, "KEYS", moved)

    async def scenario() -> None:
        pipe = ClusterPipelinedRedis(cluster.url, 1.0)
        try:
            assert await pipe.evalsha(ECHO_KEY, [moved], ["v1"]) == b"v1"
            assert await pipe.evalsha(ECHO_KEY, [stay], ["s1"]) == b"s1"
            assert await pipe.execute("GET", moved) == b"v1"
            assert pipe._slots[slot] is pipe._nodes[("127.0.0.1", a.port)]  # no map change
        finally:
            await pipe.close()

    try:
        asyncio.run(scenario())
        assert a.client().get(stay) == b"s1"
    finally:
        a.client().execute_command("MIGRATE", "127.0.0.1", b.port, "", 0, 5000, "KEYS", stay)
        _end_migration(cluster, slot, b)
    assert b.client().get(moved) == b"v1"


def _strict(script: LuaScript) -> LuaScript:
    """The script with a `#!lua` shebang: Redis 7 then refuses any key outside the slot
    of its declared keys (without one, a legacy script may reach other slots of its
    node)."""
    return LuaScript(script.name, script.keys, script.args, "#!lua\n" + script.source)


def test_scripts_reaching_another_slot_are_refused(cluster: RedisCluster) -> None:
    """The check the next test relies on: a strict script touching a key of another
    slot is refused."""
    cross = Script("#!lua\nreturn redis.call('GET', 'tf:{somebody-else}:b')")

    async def scenario() -> str:
        pipe = ClusterPipelinedRedis(cluster.url, 1.0)
        try:
            await pipe.evalsha(cross, ["tf:{me}:b"], [])
        except redis.ResponseError as exc:
            return str(exc)
        finally:
            await pipe.close()
        return "accepted"

    refusal = asyncio.run(scenario())
    assert "slot" in refusal or "non local key" in refusal, refusal


def test_every_script_stays_in_its_slot(cluster: RedisCluster) -> None:
    """Every Lua script, made strict, runs every branch that builds keys from its prefix
    (windows, threshold and exceeded marks, loop tiers, pool health) on the cluster."""
    policy = GuardPolicy(loop_max_hits=2, near_max_hits=2, velocity_max_per_minute=100,
                         threshold_percent=50)
    limits = [-1, -1, 20_000, -1, -1, -1]  # a daily limit: marks get written

    async def scenario() -> None:
        store = BudgetStore.from_url(cluster.url, 1000, limits, policy, cluster=True)
        pools = PoolStore(store.client, store.decisions, 1000, 10_000)
        recorder = RefusalRecorder(store.decisions, AnalyticsPolicy(), 10, 1.0)
        for obj, names in ((store, ("_reserve", "_settle", "_extend", "_reap")),
                           (pools, ("_pick", "_report")), (recorder, ("_script",))):
            for name in names:
                setattr(obj, name, _strict(getattr(obj, name)))
        store._reap_call = store.client.register_script(store._reap.source)
        try:
            caller = f"strict-{os.urandom(4).hex()}"
            for i in range(2):
                assert isinstance(await store.reserve(caller, f"r{i}", 4_000, 1, "fp", "nfp"),
                                  Reservation)
                assert await store.extend(caller, f"r{i}", 6_000, 1) == 6_000
                assert await store.settle(caller, f"r{i}", 5_000, "nfp", "answer", CallFacts(
                    group_of("openai", "", "m"), 200, 120, 40, (1, 2, 3, 4, 5)))
            assert isinstance(await store.reserve(caller, "r2", 10, 1, "fp", "nfp",
                                                  group_of("openai", "", "m")),
                              LoopRefusal)  # the third identical: the loop tier
            assert isinstance(await store.reserve(caller, "over", 50_000), Refusal)
            assert isinstance(await store.reserve(caller, "orphan", 1), Reservation)
            assert (await store.reap(-1000))[0] >= 1
            recorder.record(caller, group_of("openai", "", "m"), "unknown_model")
            await recorder.flush()
            # The analytics the scripts wrote, read across every master.
            start, end = calendar_window("day", int(time.time() * 1000))
            _, by_key = AnalyticsReader(sync_client(cluster.url, True)).usage(
                start - 86_400_000, end, "key")
            mine = by_key[caller]
            assert (mine.spend_nano, mine.requests) == (10_000 + 1, 2)  # + the reaped 1
            assert mine.refusals_by_reason == {"recursive_loop_detected": 1,
                                               "budget_exceeded": 1, "unknown_model": 1}
            assert mine.tokens == {"input": 2, "output": 4, "cache_read": 6,
                                   "cache_write": 8, "reasoning": 10}
            admin = BudgetAdmin(sync_client(cluster.url, True), limits)
            admin._status_call = admin._redis.register_script(_strict(admin._status).source)
            assert admin.status(caller).windows[2].spent_nano == 10_000 + 1
            pool = f"strict-pool-{os.urandom(3).hex()}"
            ids = PoolAdmin(sync_client(cluster.url, True), b"secret").import_keys(
                pool, [PoolKey(secret="sk-ant-strict-1", label="a", weight=1)], "anthropic")
            picked, _ = await pools.pick(pool, ids)
            assert picked == ids[0]
            assert await pools.report(pool, picked, 429, 1000) == "open"
        finally:
            await store.close()

    asyncio.run(scenario())


def test_eviction_check_reads_every_master(cluster: RedisCluster) -> None:
    victim = non_seed_masters(cluster)[0]

    async def check(allow: bool) -> str | None:
        client = async_client(cluster.url, 1.0, cluster=True)
        try:
            return await eviction.check(client, allow)
        finally:
            await client.aclose()

    assert asyncio.run(check(False)) is None
    victim.client().config_set("maxmemory-policy", "volatile-lru")
    try:
        with pytest.raises(eviction.EvictionRefused) as refused:
            asyncio.run(check(False))
        assert f"'volatile-lru' on 127.0.0.1:{victim.port}" in str(refused.value)
        assert "TOKENFUSE_ALLOW_EVICTION=1" in str(asyncio.run(check(True)))
    finally:
        victim.client().config_set("maxmemory-policy", "noeviction")


def test_router_through_a_failover(cluster: RedisCluster) -> None:
    """A master dies: its slots' calls raise ConnectionError at once (never hang), the
    other masters' calls go on, and once its replica is promoted the same router serves
    the dead master's slots again."""
    victim = non_seed_masters(cluster)[0]
    live = next(m for m in cluster.masters() if m is not victim)
    on_victim = _free_key(cluster, victim, "victim")
    on_live = _free_key(cluster, live, "live")

    async def scenario() -> None:
        pipe = ClusterPipelinedRedis(cluster.url, 1.0)
        try:
            assert await pipe.evalsha(ECHO_KEY, [on_victim], ["1"]) == b"1"
            assert await pipe.evalsha(ECHO_KEY, [on_live], ["1"]) == b"1"
            cluster.kill(victim)
            started = time.monotonic()
            with pytest.raises(redis.ConnectionError):
                await pipe.evalsha(ECHO_KEY, [on_victim], ["2"])
            assert time.monotonic() - started < 0.5
            for _ in range(20):  # the live master is not held up by the dead one
                started = time.monotonic()
                assert await pipe.evalsha(ECHO_KEY, [on_live], ["2"]) == b"2"
                assert time.monotonic() - started < 0.5
            await asyncio.to_thread(cluster.wait_promoted, on_victim, victim)
            deadline = time.monotonic() + 10
            while True:  # the map is re-read: the promoted replica serves the slot
                try:
                    assert await pipe.evalsha(ECHO_KEY, [on_victim], ["3"]) == b"3"
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, "the router never recovered"
                    await asyncio.sleep(0.05)
            assert ("127.0.0.1", victim.port) not in pipe.masters()
        finally:
            await pipe.close()

    try:
        asyncio.run(scenario())
    finally:
        cluster.restart(victim)  # back, as a replica of its promoted replica


def test_router_through_a_frozen_master(cluster: RedisCluster) -> None:
    """A master stops answering without closing its connections (SIGSTOP): calls time
    out (the caller's bound), and the router, told by those timeouts, re-reads the map
    and reaches the promoted replica while the old master is still frozen."""
    victim = non_seed_masters(cluster)[0]
    key = _free_key(cluster, victim, "frozen")

    async def scenario() -> None:
        pipe = ClusterPipelinedRedis(cluster.url, 1.0)
        try:
            await frozen_then_promoted(pipe)
        finally:
            await pipe.close()

    async def frozen_then_promoted(pipe: ClusterPipelinedRedis) -> None:
        async def call(value: str) -> bytes:
            async with asyncio.timeout(0.25):
                return await pipe.evalsha(ECHO_KEY, [key], [value])

        assert await call("1") == b"1"
        cluster.freeze(victim)
        with pytest.raises(TimeoutError):
            await call("2")
        # The replica's promotion, seen from a live node (the victim is frozen).
        await asyncio.to_thread(cluster.wait_promoted, key, victim)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await call("3") == b"3"
                break
            except (TimeoutError, redis.ConnectionError):
                assert time.monotonic() < deadline, "the router stayed on the frozen master"
                await asyncio.sleep(0.05)

    try:
        asyncio.run(scenario())
    finally:
        cluster.thaw(victim)


def test_a_password_protected_cluster() -> None:
    """AUTH on every node: the routed decisions reach every master, the cold client, the
    CLI's client and the control channel's node URLs carry the seed's credentials; the
    password appears in no error."""
    password = "pw-" + os.urandom(8).hex()
    protected = RedisCluster(password=password).start()
    try:
        keys = [_free_key(protected, m, "auth") for m in protected.masters()]

        async def scenario() -> None:
            pipe = ClusterPipelinedRedis(protected.url, 1.0)
            cold = async_client(protected.url, 1.0, cluster=True)
            try:
                for key in keys:
                    assert await pipe.evalsha(ECHO_KEY, [key], ["ok"]) == b"ok"
                assert len(pipe.masters()) == 3
                assert await eviction.check(cold, False) is None
                assert len([k async for k in cold.scan_iter(match="test:*")]) == 3
                watcher = ControlWatcher(protected.url, cluster=True)
                watcher._learn(await pipe.execute("CLUSTER", "SLOTS"))
                assert len(watcher._nodes) == 6
                for url in watcher._nodes:
                    assert f":{password}@" in url
                    node = aioredis.Redis.from_url(url)
                    assert await node.ping()
                    await node.aclose()
            finally:
                await pipe.close()
                await cold.aclose()
            wrong = ClusterPipelinedRedis(protected.url.replace(password, "wrong"), 1.0)
            with pytest.raises(redis.RedisError) as refused:
                await wrong.execute("GET", keys[0])
            assert password not in str(refused.value)
            await wrong.close()

        asyncio.run(scenario())
        assert sync_client(protected.url, True).get(keys[0]) == b"ok"
    finally:
        protected.cleanup()


# -- a master dies mid-flood ------------------------------------------------------------


def test_master_killed_mid_flood(cstack: Stack, cluster: RedisCluster,
                                 fake: FakeProvider) -> None:
    """The seed's master dies while a flood runs on a caller it serves: 503s while the
    replica takes over (never forwarded), the budget holds, traffic comes back on the
    promoted replica without restarting tokenfuse, and the control channel moves to a
    live node (the kill switch still ends a stream)."""
    seed = cluster.seed
    key = key_on(cstack, cluster, seed)
    budget = 10_000_000
    assert cstack.cli("budget", "set", "--key", key, "--daily", "0.01").returncode == 0
    survivor = non_seed_masters(cluster)[0]
    live_env = {**cstack.env, "REDIS_URL": f"redis://{survivor.address}/0"}
    outcomes: list[str] = []
    killed_at: list[float] = []

    async def flood() -> None:
        client = openai.AsyncOpenAI(base_url=cstack.envoy.base_url + "/openai/v1",
                                    api_key=key, max_retries=0, timeout=30)
        serial = itertools.count()
        deadline = time.monotonic() + 60

        async def worker() -> None:
            while time.monotonic() < deadline and outcomes.count("status_402") < 20:
                try:
                    await client.chat.completions.create(
                        model="gpt-4o-mini", max_tokens=40, messages=[
                            {"role": "user", "content": f"failover {spell(next(serial))}"}])
                    outcomes.append("allowed")
                except openai.APIStatusError as exc:
                    outcomes.append(f"status_{exc.status_code}")
                    if exc.status_code == 503:
                        await asyncio.sleep(0.01)  # pacing only: 503s come fast
                if not killed_at and outcomes.count("allowed") >= 60:
                    killed_at.append(time.monotonic())
                    cluster.kill(seed)

        try:
            await asyncio.gather(*(worker() for _ in range(12)))
        finally:
            await client.close()

    try:
        asyncio.run(flood())
        assert killed_at, "the flood never reached the kill"
        allowed = outcomes.count("allowed")
        unavailable = outcomes.count("status_503")
        print(f"\nfailover flood: {allowed} allowed, {unavailable} 503, "
              f"{outcomes.count('status_402')} 402", end="")
        assert set(outcomes) <= {"allowed", "status_402", "status_503"}, set(outcomes)
        assert unavailable > 0  # the failover was seen: closed, not open
        last_503 = len(outcomes) - 1 - outcomes[::-1].index("status_503")
        assert "allowed" in outcomes[last_503:]  # traffic recovered without a restart
        assert outcomes.count("status_402") >= 20  # ... up to the budget's end
        assert requests_for(fake, key) == allowed  # no 503 was forwarded
        billed = billed_for(fake, key)
        assert billed <= budget
        day = status(cstack, key, live_env)["windows"]["day"]
        # Every billed call is spent or still reserved (a settle lost with the master
        # leaves its reservation, to be reaped); together they stay within the budget.
        assert billed <= day["spent_nano_usd"] + day["reserved_nano_usd"] <= budget
        print(f", billed {billed}, spent {day['spent_nano_usd']} reserved "
              f"{day['reserved_nano_usd']} of {budget}", end="")

        # The CLI needs a seed that answers: the dead one is a clean error, not a trace.
        dead_seed = cstack.cli("budget", "status", "--key", key)
        assert dead_seed.returncode == 2
        assert "Redis refused or unreachable" in dead_seed.stderr, dead_seed.stderr

        # The control channel was on the seed: it moved, so a kill switch still lands.
        other = key_on(cstack, cluster, survivor)
        consumer = PacedStream(cstack, other)
        assert consumer.started.wait(20)
        assert _cli(cstack, live_env, "kill", "--key", other).returncode == 0
        at_kill = consumer.chunks
        consumer.thread.join(20)
        assert consumer.error is not None and "kill switch" in consumer.error.message
        assert consumer.chunks - at_kill <= 2  # the channel, not the next extension
        assert cstack.processor.running()
    finally:
        if not seed.running():
            cluster.restart(seed)
