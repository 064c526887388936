"""The processor's budget decisions: reserve, extend and settle (one script call each,
on one pipelined connection), and the reaper of orphaned reservations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from tokenfuse.state import scripts
from tokenfuse.state.analytics import NO_FACTS, AnalyticsPolicy, CallFacts
from tokenfuse.state.cluster_pipe import ClusterPipelinedRedis
from tokenfuse.state.connection import async_client, decisions_client, text
from tokenfuse.state.keys import (
    NO_FINGERPRINT,
    RESERVATIONS_PATTERN,
    caller_keys,
    caller_prefix,
    limits_key,
    prefix_of_reservations,
    reservations_key,
    settle_keys,
)
from tokenfuse.state.redis_pipe import PipelinedRedis
from tokenfuse.state.results import LoopRefusal, Refusal, Reservation

__all__ = ["BudgetStore", "GuardPolicy", "LoopRefusal", "Refusal", "Reservation"]


@dataclass(frozen=True)
class GuardPolicy:
    """Loop guard tiers, velocity breaker and alert threshold, passed to reserve.lua (and
    the near-duplicate window to settle.lua)."""

    loop_max_hits: int = 0  # exact tier; 0 = off
    loop_window_ms: int = 60_000
    loop_cooldown_ms: int = 30_000
    near_max_hits: int = 0  # near-duplicate tier (identical answers in a row); 0 = off
    near_window_ms: int = 120_000
    near_cooldown_ms: int = 60_000
    velocity_max_per_minute: int = 0  # 0 = off
    threshold_percent: int = 0  # 0 = no threshold alerts

    def args(self) -> dict[str, int]:
        return {"loop_max_hits": self.loop_max_hits, "loop_window_ms": self.loop_window_ms,
                "loop_cooldown_ms": self.loop_cooldown_ms,
                "near_max_hits": self.near_max_hits, "near_window_ms": self.near_window_ms,
                "near_cooldown_ms": self.near_cooldown_ms,
                "velocity_max": self.velocity_max_per_minute,
                "threshold_percent": self.threshold_percent}


class BudgetStore:
    """Async access for the processor: reserve, extend and settle, one round trip each, on
    one pipelined connection (redis_pipe); the reaper uses redis-py."""

    def __init__(self, client: aioredis.Redis, decisions: PipelinedRedis | ClusterPipelinedRedis,
                 default_limits: list[int], policy: GuardPolicy | None = None,
                 analytics: AnalyticsPolicy | None = None) -> None:
        self._redis = client
        self._decisions = decisions
        self._defaults = scripts.default_limits(default_limits)
        self._policy = policy or GuardPolicy()
        self._analytics = analytics or AnalyticsPolicy()
        self._analytics_args = self._analytics.args()
        guarded = {**self._defaults, **self._policy.args(), **self._analytics_args}
        # By which tiers apply to a call: (exact fingerprint given, near fingerprint given).
        self._tiers = {(exact, near): {**guarded,
                                       **({} if exact else {"loop_max_hits": 0}),
                                       **({} if near else {"near_max_hits": 0})}
                       for exact in (False, True) for near in (False, True)}
        self._reserve = scripts.load("reserve")
        self._settle = scripts.load("settle")
        self._extend = scripts.load("extend")
        self._reap = scripts.load("reap")
        self._reap_call = client.register_script(self._reap.source)

    @classmethod
    def from_url(cls, url: str, timeout_ms: int, default_limits: list[int],
                 policy: GuardPolicy | None = None, cluster: bool = False,
                 analytics: AnalyticsPolicy | None = None) -> BudgetStore:
        timeout = timeout_ms / 1000
        return cls(async_client(url, timeout, cluster), decisions_client(url, timeout, cluster),
                   default_limits, policy, analytics)

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    @property
    def analytics(self) -> AnalyticsPolicy:
        return self._analytics

    @property
    def decisions(self) -> PipelinedRedis | ClusterPipelinedRedis:
        return self._decisions

    async def reserve(self, caller: str, rid: str, desired_nano: int,
                      minimum_nano: int | None = None,
                      fingerprint: str | None = None, near_fingerprint: str | None = None,
                      group: str = "||") -> Reservation | Refusal | LoopRefusal:
        """Loop guard tiers, velocity and budget in one call; reserve between `minimum`
        (default: all) and `desired` in every window, or say why not. A tier whose
        fingerprint is None is not checked. A refusal is counted in the analytics under
        `group` (analytics.group_of)."""
        minimum = desired_nano if minimum_nano is None else minimum_nano
        fixed = self._tiers[bool(fingerprint), bool(near_fingerprint)]
        keys, args = self._reserve.bind(
            caller_keys(caller, fingerprint or NO_FINGERPRINT,
                        near_fingerprint or NO_FINGERPRINT),
            {**fixed, "prefix": caller_prefix(caller), "rid": rid, "desired": desired_nano,
             "minimum": minimum, "group": group})
        result: list[Any] = await self._decisions.evalsha(self._reserve, keys, args)
        if int(result[0]) == 1:
            crossed = text(result[3])
            return Reservation(int(result[1]), tuple(crossed.split(",")) if crossed else ())
        if text(result[1]) in ("loop", "near_loop", "velocity"):
            return LoopRefusal(text(result[1]), int(result[2]), int(result[3]))
        return refusal_of(result)

    async def extend(self, caller: str, rid: str, desired_nano: int,
                     minimum_nano: int) -> int | Refusal:
        """Grow an open reservation by up to `desired` (at least `minimum`)."""
        keys, args = self._extend.bind(
            {"limits": limits_key(caller), "reservations": reservations_key(caller)},
            {**self._defaults, "prefix": caller_prefix(caller), "rid": rid,
             "desired": desired_nano, "minimum": minimum_nano})
        result: list[Any] = await self._decisions.evalsha(self._extend, keys, args)
        if int(result[0]) == 1:
            return int(result[1])
        return refusal_of(result)

    async def settle(self, caller: str, rid: str, actual_nano: int,
                     near_fingerprint: str | None = None, answer: str = "",
                     facts: CallFacts | None = None) -> bool:
        """Replace a reservation by the actual cost. False when it was already settled.
        With a near-duplicate fingerprint and the answer's fingerprint, the same call
        records the answer for the near-duplicate loop tier; with `facts` (a call that was
        forwarded) it writes the usage analytics too."""
        if not (near_fingerprint and answer and self._policy.near_max_hits):
            near_fingerprint, answer = NO_FINGERPRINT, ""
        keys, args = self._settle.bind(
            settle_keys(caller, near_fingerprint),
            {"prefix": caller_prefix(caller), "rid": rid, "actual": actual_nano,
             "answer": answer, "near_window_ms": self._policy.near_window_ms,
             **(NO_FACTS if facts is None or not self._analytics.enabled
                else {**facts.args(), **self._analytics_args})})
        result = await self._decisions.evalsha(self._settle, keys, args)
        return int(result[0]) == 1

    async def reap(self, ttl_ms: int) -> tuple[int, int]:
        """Charge every reservation untouched for `ttl_ms` as spent, across all callers.

        Returns (reservations reaped, nano-USD charged). SCAN finds the callers with open
        reservations; each is reaped by one atomic script call."""
        reaped = charged = 0
        async for key in self._redis.scan_iter(match=RESERVATIONS_PATTERN, count=500):
            name = text(key)
            keys, args = self._reap.bind({"reservations": name},
                                         {"prefix": prefix_of_reservations(name), "ttl": ttl_ms,
                                          **self._analytics_args})
            count, nano = await self._reap_call(keys=keys, args=args)
            reaped += int(count)
            charged += int(nano)
        return reaped, charged

    async def close(self) -> None:
        await self._decisions.close()
        await self._redis.aclose()


def refusal_of(result: list[Any]) -> Refusal:
    return Refusal(
        reason=text(result[1]),
        window=text(result[2]),
        limit_nano=int(result[3]),
        used_nano=int(result[4]),
        resets_at=int(result[5]),
        first_in_window=len(result) > 6 and int(result[6]) == 1,
    )
