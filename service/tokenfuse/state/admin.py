"""Operator access to budgets (CLI, tests): set, clear, kill, read. Synchronous."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from tokenfuse.config import WINDOWS
from tokenfuse.state import scripts
from tokenfuse.state.connection import sync_client, text
from tokenfuse.state.control import announce
from tokenfuse.state.keys import (
    LIMITS_PATTERN,
    TOTAL_WINDOW_PATTERN,
    caller_of_key,
    caller_prefix,
    limits_key,
    total_window_key,
)


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


class BudgetAdmin:
    """Synchronous operator access (CLI, tests): set, clear and read budgets."""

    def __init__(self, client: redis.Redis, default_limits: list[int]) -> None:
        self._redis = client
        self._defaults = scripts.default_limits(default_limits)
        self._status = scripts.load("status")
        self._status_call = client.register_script(self._status.source)

    @classmethod
    def from_url(cls, url: str, default_limits: list[int],
                 cluster: bool = False) -> BudgetAdmin:
        return cls(sync_client(url, cluster), default_limits)

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

    def known(self, caller: str) -> bool:
        """Has Redis seen this caller: own limits, a kill, or any spend?"""
        return bool(self._redis.exists(limits_key(caller), total_window_key(caller)))

    def callers(self) -> list[str]:
        """Every caller with own limits, a kill switch or spend (SCAN: the admin's cold
        path, one pass per pattern)."""
        found = {caller_of_key(text(key)) for pattern in (LIMITS_PATTERN, TOTAL_WINDOW_PATTERN)
                 for key in self._redis.scan_iter(match=pattern, count=1000)}
        return sorted(found)

    def status(self, caller: str) -> BudgetStatus:
        keys, args = self._status.bind({"limits": limits_key(caller)},
                                       {**self._defaults, "prefix": caller_prefix(caller)})
        raw = self._status_call(keys=keys, args=args)
        windows = [
            WindowStatus(
                window=text(row[0]),
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
