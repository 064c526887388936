"""The Lua budget scripts against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.harness import RedisServer
from tokenfuse.config import WINDOWS
from tokenfuse.state.admin import BudgetAdmin
from tokenfuse.state.budgets import BudgetStore, Refusal, Reservation
from tokenfuse.state.keys import limits_key, reservations_key

NO_DEFAULTS = [-1] * len(WINDOWS)


def granted(amount: int) -> Reservation:
    return Reservation(amount, ())


def run(coro):
    return asyncio.run(coro)


async def _store(server: RedisServer, defaults: list[int] = NO_DEFAULTS) -> BudgetStore:
    return BudgetStore.from_url(server.url, 1000, defaults)


def test_reserve_settle_and_refuse(redis_server: RedisServer) -> None:
    admin = BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS)
    admin.set_limits("c1", {"day": 1000})

    async def scenario() -> None:
        store = await _store(redis_server)
        assert await store.reserve("c1", "r1", 600) == granted(600)
        refusal = await store.reserve("c1", "r2", 600)
        assert isinstance(refusal, Refusal)
        assert (refusal.reason, refusal.window, refusal.limit_nano, refusal.used_nano) == (
            "budget_exceeded", "day", 1000, 600)
        assert refusal.resets_at % 86400 == 0
        assert await store.settle("c1", "r1", 450) is True
        assert await store.settle("c1", "r1", 450) is False  # idempotent
        assert await store.reserve("c1", "r3", 550) == granted(550)
        await store.close()

    run(scenario())
    day = {w.window: w for w in admin.status("c1").windows}["day"]
    assert (day.spent_nano, day.reserved_nano, day.remaining_nano) == (450, 550, 0)


def test_refusal_reserves_nothing_in_any_window(redis_server: RedisServer) -> None:
    admin = BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS)
    admin.set_limits("c2", {"minute": 100, "total": 10_000})

    async def scenario() -> None:
        store = await _store(redis_server)
        refusal = await store.reserve("c2", "r1", 101)
        assert isinstance(refusal, Refusal) and refusal.window == "minute"
        await store.close()

    run(scenario())
    for w in admin.status("c2").windows:
        assert (w.spent_nano, w.reserved_nano) == (0, 0), w.window
    assert redis_server.client().hlen(reservations_key("c2")) == 0


def test_window_counters_expire_at_window_end(redis_server: RedisServer) -> None:
    client = redis_server.client()
    for attempt in range(3):  # a minute that ends mid-check (its key expires) is retried
        caller = f"c3-{attempt}"
        before = client.time()[0]
        run(_reserve_once(redis_server, caller, 5))
        now = client.time()[0]
        ttls = {}
        for key in client.scan_iter(f"tf:{{{caller}}}:u:*"):
            name = key.decode().rsplit(":", 1)[1]
            ttls[name[:2] if name[:2] in ("mi", "mo") else name[0]] = client.ttl(key)
        seconds = client.time()[0]
        # TTL rounds to whole seconds: read it in the same minute, not in its last second.
        if before // 60 == seconds // 60 and seconds % 60 < 59:
            break
    assert 0 < ttls["mi"] <= 60 - now % 60 + 1
    assert 0 < ttls["h"] <= 3600 - now % 3600 + 1
    assert 0 < ttls["d"] <= 86400 - now % 86400 + 1
    assert 0 < ttls["w"] <= 7 * 86400
    assert 0 < ttls["mo"] <= 31 * 86400
    assert ttls["t"] == -1  # lifetime never expires


async def _reserve_once(server: RedisServer, caller: str, amount: int) -> None:
    store = await _store(server)
    assert await store.reserve(caller, "r", amount) == granted(amount)
    await store.close()


def test_settle_skips_expired_windows(redis_server: RedisServer) -> None:
    run(_reserve_once(redis_server, "c4", 70))
    client = redis_server.client()
    minute_key = next(client.scan_iter("tf:{c4}:u:mi*"))
    client.delete(minute_key)  # as if the minute had ended before settlement

    async def settle() -> None:
        store = await _store(redis_server)
        assert await store.settle("c4", "r", 50)
        await store.close()

    run(settle())
    assert not client.exists(minute_key)  # not recreated without an expiry
    total = client.hgetall("tf:{c4}:u:t")
    assert (int(total[b"s"]), int(total[b"r"])) == (50, 0)


def test_defaults_apply_only_without_own_limits(redis_server: RedisServer) -> None:
    defaults = [-1, -1, 100, -1, -1, -1]  # daily default of 100 nano-USD

    async def scenario() -> None:
        store = await _store(redis_server, defaults)
        assert await store.reserve("d1", "a", 100) == granted(100)
        refused = await store.reserve("d1", "b", 1)
        assert isinstance(refused, Refusal)
        assert refused.window == "day" and refused.limit_nano == 100
        await store.close()

    run(scenario())
    admin = BudgetAdmin.from_url(redis_server.url, defaults)
    admin.set_limits("d1", {"hour": 1000})  # own limits replace the defaults entirely
    run(_reserve_once(redis_server, "d1", 500))
    assert admin.status("d1").own_limits
    admin.clear_limits("d1")
    status = admin.status("d1")
    assert not status.own_limits
    assert {w.window: w.limit_nano for w in status.windows}["day"] == 100


@pytest.mark.parametrize("estimate", [1, 7, 333])
def test_concurrent_reservations_never_exceed(redis_server: RedisServer, estimate: int) -> None:
    limit = 10_000
    BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS).set_limits("flood", {"day": limit})
    redis_server.client().delete(*redis_server.client().keys("tf:{flood}:u:*") or ["x"])

    async def scenario() -> int:
        store = await _store(redis_server)
        results = await asyncio.gather(
            *(store.reserve("flood", f"r{i}", estimate) for i in range(2000))
        )
        await store.close()
        return sum(1 for r in results if r == granted(estimate))

    count = run(scenario())
    assert count == min(2000, limit // estimate)
    day = {w.window: w for w in BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS)
           .status("flood").windows}["day"]
    assert day.reserved_nano == count * estimate <= limit


def test_kill_flag_refuses(redis_server: RedisServer) -> None:
    redis_server.client().hset(limits_key("k1"), "killed", 1)

    async def scenario() -> None:
        store = await _store(redis_server)
        refusal = await store.reserve("k1", "r", 0)
        assert isinstance(refusal, Refusal) and refusal.reason == "killed"
        await store.close()

    run(scenario())


def test_partial_grant_and_extension(redis_server: RedisServer) -> None:
    admin = BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS)
    admin.set_limits("s1", {"day": 1000})

    async def scenario() -> None:
        store = await _store(redis_server)
        assert await store.reserve("s1", "a", 700, 100) == granted(700)
        assert await store.reserve("s1", "b", 700, 100) == granted(300)  # what is left
        refused = await store.reserve("s1", "c", 700, 1)
        assert isinstance(refused, Refusal) and refused.window == "day"
        await store.settle("s1", "a", 500)  # frees 200
        assert await store.extend("s1", "b", 150, 50) == 150
        assert await store.extend("s1", "b", 150, 10) == 50  # partial
        gone = await store.extend("s1", "b", 1, 1)
        assert isinstance(gone, Refusal) and gone.reason == "budget_exceeded"
        await store.settle("s1", "b", 400)
        after = await store.extend("s1", "b", 1, 1)
        assert isinstance(after, Refusal) and after.reason == "reservation_gone"
        await store.close()

    run(scenario())
    day = {w.window: w for w in admin.status("s1").windows}["day"]
    assert (day.spent_nano, day.reserved_nano) == (900, 0)


def test_reaper_charges_orphans_once(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        store = await _store(redis_server)
        assert await store.reserve("o1", "dead", 700) == granted(700)
        assert await store.reserve("o2", "dead", 50) == granted(50)
        first = await store.reap(ttl_ms=60_000)  # too young: nothing reaped
        second = await store.reap(ttl_ms=-1)  # every reservation is older than -1 ms
        third = await store.reap(ttl_ms=-1)  # idempotent: nothing left
        assert await store.settle("o1", "dead", 1) is False  # a late settle is a no-op
        await store.close()
        return first, second, third

    first, second, third = run(scenario())
    assert first == (0, 0) and second == (2, 750) and third == (0, 0)
    total = {w.window: w for w in BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS)
             .status("o1").windows}["total"]
    assert (total.spent_nano, total.reserved_nano) == (700, 0)


def test_concurrent_reapers_charge_each_orphan_once(redis_server: RedisServer) -> None:
    async def scenario() -> list[tuple[int, int]]:
        stores = [await _store(redis_server) for _ in range(5)]  # five "replicas"
        for i in range(20):
            assert await stores[0].reserve(f"z{i % 4}", f"r{i}", 10 + i) == granted(10 + i)
        results = await asyncio.gather(*(s.reap(ttl_ms=-1) for s in stores))
        for s in stores:
            await s.close()
        return results

    results = run(scenario())
    assert sum(count for count, _ in results) == 20
    assert sum(nano for _, nano in results) == sum(10 + i for i in range(20))
    admin = BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS)
    spent = sum({w.window: w for w in admin.status(f"z{c}").windows}["total"].spent_nano
                for c in range(4))
    assert spent == sum(10 + i for i in range(20))


def test_an_open_reservation_id_is_never_overwritten(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = await _store(redis_server)
        assert await store.reserve("dup", "same", 300) == granted(300)
        again = await store.reserve("dup", "same", 5)
        assert isinstance(again, Refusal) and again.reason == "duplicate_reservation"
        assert await store.settle("dup", "same", 120) is True  # the first one, intact
        await store.close()

    run(scenario())
    day = {w.window: w for w in BudgetAdmin.from_url(redis_server.url, NO_DEFAULTS)
           .status("dup").windows}["day"]
    assert (day.spent_nano, day.reserved_nano) == (120, 0)
