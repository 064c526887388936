"""Redis state: one Lua script per atomic decision, keys grouped by the caller's hash tag.

Key layout (everything of one caller shares the hash tag `{<id>}`, so every script also
runs on Redis Cluster):
    tf:{<id>}:b          limits hash: minute..total (nano-USD), killed
    tf:{<id>}:u:<window> counters of one calendar window: s (spent), r (reserved)
    tf:{<id>}:rs         open reservations: rid -> "amount|touched_ms|window ids"
    tf:{<id>}:lp:<fp>    loop guard: ZSET of forwarded requests with this fingerprint
    tf:{<id>}:lc:<fp>    loop guard: cooldown after a block (hit count, PX = cooldown)
    tf:{<id>}:vel        velocity breaker: ZSET of forwarded requests, last minute
    tf:{<id>}:wt:<w>     threshold alert sent for window w (expires with it)
    tf:{<id>}:wx:<w>     budget.exceeded alert sent for window w (expires with it)
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from tokenfuse.config import WINDOWS
from tokenfuse.control import announce
from tokenfuse.redis_pipe import PipelinedRedis, Script

#: What a Redis call can fail with (errors, connection loss, our own time bound).
REDIS_FAILURES = (redis.RedisError, OSError, asyncio.TimeoutError)
LUA_DIR = Path(os.environ.get("TOKENFUSE_LUA_DIR", Path(__file__).resolve().parents[2] / "lua"))


def script_source(name: str) -> str:
    prelude = (LUA_DIR / "lib" / "windows.lua").read_text()
    return prelude + "\n" + (LUA_DIR / f"{name}.lua").read_text()


def limits_key(caller: str) -> str:
    return f"tf:{{{caller}}}:b"


def reservations_key(caller: str) -> str:
    return f"tf:{{{caller}}}:rs"


@dataclass(frozen=True)
class Refusal:
    reason: str  # budget_exceeded | killed | reservation_gone | state_store_unavailable
    window: str
    limit_nano: int
    used_nano: int
    resets_at: int  # epoch seconds, 0 = never
    first_in_window: bool = False  # the first refusal in this window (for webhooks)


@dataclass(frozen=True)
class LoopRefusal:
    kind: str  # loop | velocity
    hit_count: int
    retry_after_ms: int


@dataclass(frozen=True)
class Reservation:
    granted_nano: int
    crossed_threshold: tuple[str, ...]  # windows that just crossed the alert threshold


@dataclass(frozen=True)
class GuardPolicy:
    """Loop guard, velocity breaker and alert threshold, passed to reserve.lua."""

    loop_max_hits: int = 0  # 0 = loop guard off
    loop_window_ms: int = 60_000
    loop_cooldown_ms: int = 30_000
    velocity_max_per_minute: int = 0  # 0 = off
    threshold_percent: int = 0  # 0 = no threshold alerts

    def args(self) -> list[int]:
        return [self.loop_max_hits, self.loop_window_ms, self.loop_cooldown_ms,
                self.velocity_max_per_minute, self.threshold_percent]


@dataclass(frozen=True)
class WindowStatus:
    window: str
    limit_nano: int | None
    spent_nano: int
    reserved_nano: int
    resets_at: int  # epoch seconds, 0 = never

    @property
    def remaining_nano(self) -> int | None:
        if self.limit_nano is None:
            return None
        return max(0, self.limit_nano - self.spent_nano - self.reserved_nano)


@dataclass(frozen=True)
class BudgetStatus:
    now_ms: int
    killed: bool
    own_limits: bool
    windows: list[WindowStatus]


class BudgetStore:
    """Async access for the processor: reserve, extend and settle, one round trip each, on
    one pipelined connection (redis_pipe); the reaper and the pools use redis-py."""

    def __init__(self, client: aioredis.Redis, decisions: PipelinedRedis,
                 default_limits: list[int], policy: GuardPolicy | None = None) -> None:
        self._redis = client
        self._decisions = decisions
        self._defaults = default_limits
        self._policy = (policy or GuardPolicy()).args()
        self._reserve = Script(script_source("reserve"))
        self._settle = Script(script_source("settle"))
        self._extend = Script(script_source("extend"))
        self._reap = client.register_script(script_source("reap"))

    @classmethod
    def from_url(cls, url: str, timeout_ms: int, default_limits: list[int],
                 policy: GuardPolicy | None = None) -> BudgetStore:
        timeout = timeout_ms / 1000
        # A blocking pool: under a flood, callers queue for a connection (bounded by the
        # decision timeout) instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=64,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        # One immediate retry replaces a pooled connection that died with a Redis restart;
        # no backoff: the decision is bounded by TOKENFUSE_REDIS_TIMEOUT_MS anyway.
        client = aioredis.Redis(connection_pool=pool, retry=AsyncRetry(NoBackoff(), 1))
        return cls(client, PipelinedRedis(url, timeout), default_limits, policy)

    async def reserve(self, caller: str, rid: str, desired_nano: int,
                      minimum_nano: int | None = None,
                      fingerprint: str | None = None) -> Reservation | Refusal | LoopRefusal:
        """Loop guard, velocity and budget in one call; reserve between `minimum`
        (default: all) and `desired` in every window, or say why not."""
        minimum = desired_nano if minimum_nano is None else minimum_nano
        policy = self._policy if fingerprint else [0, *self._policy[1:]]
        fp = fingerprint or "-"
        result: list[Any] = await self._decisions.evalsha(
            self._reserve,
            keys=[limits_key(caller), reservations_key(caller),
                  f"tf:{{{caller}}}:lp:{fp}", f"tf:{{{caller}}}:lc:{fp}",
                  f"tf:{{{caller}}}:vel"],
            args=[rid, desired_nano, minimum, *self._defaults, *policy],
        )
        if int(result[0]) == 1:
            crossed = _text(result[3])
            return Reservation(int(result[1]), tuple(crossed.split(",")) if crossed else ())
        if _text(result[1]) in ("loop", "velocity"):
            return LoopRefusal(_text(result[1]), int(result[2]), int(result[3]))
        return _refusal(result)

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    @property
    def decisions(self) -> PipelinedRedis:
        return self._decisions

    async def extend(self, caller: str, rid: str, desired_nano: int,
                     minimum_nano: int) -> int | Refusal:
        """Grow an open reservation by up to `desired` (at least `minimum`)."""
        result: list[Any] = await self._decisions.evalsha(
            self._extend, keys=[limits_key(caller), reservations_key(caller)],
            args=[rid, desired_nano, minimum_nano, *self._defaults],
        )
        if int(result[0]) == 1:
            return int(result[1])
        return _refusal(result)

    async def settle(self, caller: str, rid: str, actual_nano: int) -> bool:
        """Replace a reservation by the actual cost. False when it was already settled."""
        result = await self._decisions.evalsha(self._settle, keys=[reservations_key(caller)],
                                               args=[rid, actual_nano])
        return int(result[0]) == 1

    async def reap(self, ttl_ms: int) -> tuple[int, int]:
        """Charge every reservation untouched for `ttl_ms` as spent, across all callers.

        Returns (reservations reaped, nano-USD charged). SCAN finds the callers with open
        reservations; each is reaped by one atomic script call."""
        reaped = charged = 0
        async for key in self._redis.scan_iter(match="tf:*:rs", count=500):
            count, nano = await self._reap(keys=[key], args=[ttl_ms])
            reaped += int(count)
            charged += int(nano)
        return reaped, charged

    async def close(self) -> None:
        await self._decisions.close()
        await self._redis.aclose()


class BudgetAdmin:
    """Synchronous operator access (CLI, tests): set, clear and read budgets."""

    def __init__(self, client: redis.Redis, default_limits: list[int]) -> None:
        self._redis = client
        self._defaults = default_limits
        self._status = client.register_script(script_source("status"))

    @classmethod
    def from_url(cls, url: str, default_limits: list[int]) -> BudgetAdmin:
        return cls(redis.Redis.from_url(url, socket_timeout=5), default_limits)

    def set_limits(self, caller: str, limits_nano: dict[str, int]) -> None:
        unknown = set(limits_nano) - set(WINDOWS)
        if unknown:
            raise ValueError(f"unknown windows: {sorted(unknown)}")
        if limits_nano:
            self._redis.hset(limits_key(caller), mapping=limits_nano)
            announce(self._redis, caller)  # a lower limit ends streams now over it

    def clear_limits(self, caller: str) -> None:
        """Remove the caller's own limits (defaults apply again); spend is kept."""
        self._redis.hdel(limits_key(caller), *WINDOWS)
        announce(self._redis, caller)

    def set_killed(self, caller: str, killed: bool) -> None:
        """Kill switch: refuse new requests and end in-flight streams (or lift it)."""
        if killed:
            self._redis.hset(limits_key(caller), "killed", 1)
        else:
            self._redis.hdel(limits_key(caller), "killed")
        announce(self._redis, caller)

    def status(self, caller: str) -> BudgetStatus:
        raw = self._status(keys=[limits_key(caller)], args=self._defaults)
        windows = [
            WindowStatus(
                window=_text(row[0]),
                limit_nano=None if int(row[1]) < 0 else int(row[1]),
                spent_nano=int(row[2]),
                reserved_nano=int(row[3]),
                resets_at=int(row[4]),
            )
            for row in raw[3:]
        ]
        return BudgetStatus(
            now_ms=int(raw[0]), killed=bool(int(raw[1])), own_limits=bool(int(raw[2])),
            windows=windows,
        )


def _refusal(result: list[Any]) -> Refusal:
    return Refusal(
        reason=_text(result[1]),
        window=_text(result[2]),
        limit_nano=int(result[3]),
        used_nano=int(result[4]),
        resets_at=int(result[5]),
        first_in_window=len(result) > 6 and int(result[6]) == 1,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
