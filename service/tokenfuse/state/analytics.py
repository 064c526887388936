"""PLACEHOLDER until the analytics branch lands (replaced by its analytics.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis


@dataclass
class Histogram:
    bounds_ms: tuple[int, ...] = ()
    counts: list[int] = field(default_factory=list)
    count: int = 0
    sum_ms: int = 0


@dataclass
class Totals:
    spend_nano: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    refusals_by_reason: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)


def calendar_window(window: str, now_ms: int) -> tuple[int, int]:
    step = {"minute": 60_000, "hour": 3_600_000}.get(window, 86_400_000)
    return now_ms // step * step, now_ms // step * step + step


class AnalyticsReader:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def usage(self, start_ms: int, end_ms: int, group_by: str
              ) -> tuple[Totals, dict[str, Totals]]:
        return Totals(), {}

    def series(self, resolution: str, start_ms: int, end_ms: int, group_by: str
               ) -> list[tuple[int, Totals, dict[str, Totals]]]:
        step = {"minute": 60_000, "hour": 3_600_000}.get(resolution, 86_400_000)
        return [(at, Totals(), {}) for at in range(start_ms, end_ms, step)]

    def live_streams(self) -> int:
        return 0
