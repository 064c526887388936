"""Usage analytics: per-caller minute, hour and day buckets, written where the money is
settled, and read back for the admin API. (Writer arguments, the background refusal
counter and the reader with its calendar share one format, so they are one module,
hence its length.)

Writers (no extra round trip on the request path): settle.lua records every settled call
(spend, one request, error status, tokens by kind, latency and time-to-first-byte
histograms, a cut stream), reserve.lua every refusal it decides, reap.lua what it charges
(as an unknown model), and `RefusalRecorder` the processor's other refusals of a known
caller, in the background after the answer went out. Every call writes the minute, the
hour and the day bucket of its Redis time, so the three resolutions agree exactly.

A bucket is the hash `tf:{<key id>}:am|ah|ad:<n>` (state/keys.py); a field is
`<metric>|<provider>|<pool>|<model>`, its value an integer:

    $        spend, nano-USD                 n       requests settled
    ti to    input / output tokens           tr tw   cache read / cache write tokens
    tx       reasoning tokens billed apart from output (TokenUsage.reasoning)
    e:<s>    calls answered with HTTP status s >= 400
    r:<code> refusals by the code the client got (stream_cut_<reason>: a cut stream)
    l:<i> ls      latency: observations in histogram bin i (BOUNDS_MS), sum (ms)
    f:<i> fs      time to first byte: the same (a histogram's count: its bins' sum)

Reading (cold path, admin only) is one SCAN per query over the bucket keys of the asked
resolution (`tf:{*}:a<r>:*`: it walks the whole keyspace once, O(keys), returning only
buckets), then one pipelined HGETALL per bucket in the range.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenfuse.state import scripts
from tokenfuse.state.background import BackgroundWrites
from tokenfuse.state.connection import text
from tokenfuse.state.keys import (
    ANALYTICS_RESOLUTIONS,
    RESERVATIONS_PATTERN,
    analytics_pattern,
    caller_prefix,
    limits_key,
    parse_analytics_key,
)
from tokenfuse.state.redis_pipe import PipelinedRedis

#: Histogram bin upper bounds (ms); bin len(BOUNDS_MS) is above the last one.
BOUNDS_MS: tuple[int, ...] = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
TOKEN_FIELDS = {"ti": "input", "to": "output", "tr": "cache_read", "tw": "cache_write",
                "tx": "reasoning"}
GROUPS = ("", "model", "key", "provider", "pool")
RESOLUTION_MS = {name: seconds * 1000 for name, (_, seconds) in ANALYTICS_RESOLUTIONS.items()}
#: The group of a charge whose call is not known (reap.lua).
UNKNOWN_GROUP = "||"


def bin_of(ms: int) -> int:
    """The histogram bin of an observation: the first bound it does not exceed."""
    for i, bound in enumerate(BOUNDS_MS):
        if ms <= bound:
            return i
    return len(BOUNDS_MS)


def group_of(provider: str, pool: str, model: str) -> str:
    """The group part of a field; "|" inside a name would shift the parts, so it is
    replaced."""
    return "|".join(part.replace("|", "_") for part in (provider, pool, model))


@dataclass(frozen=True)
class AnalyticsPolicy:
    """Whether the scripts write analytics, and each resolution's retention (s) after
    its period ended."""

    enabled: bool = True
    minute_retention_s: int = 48 * 3600
    hour_retention_s: int = 35 * 86400
    day_retention_s: int = 400 * 86400

    def args(self) -> dict[str, Any]:
        return {"analytics": 1 if self.enabled else 0,
                "ttl_minute": self.minute_retention_s, "ttl_hour": self.hour_retention_s,
                "ttl_day": self.day_retention_s}


@dataclass(frozen=True)
class CallFacts:
    """What settle.lua records of one call besides its cost."""

    group: str
    status: int = 0
    latency_ms: int = -1  # -1: not known
    ttft_ms: int = -1
    tokens: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # input output read write reasoning
    cut: str = ""  # the reason tokenfuse cut the stream ("" = not cut)

    def args(self) -> dict[str, Any]:
        t_in, t_out, t_read, t_write, t_reasoning = self.tokens
        return {"group": self.group, "status": self.status,
                "latency_ms": self.latency_ms, "latency_bin": bin_of(self.latency_ms),
                "ttft_ms": self.ttft_ms, "ttft_bin": bin_of(self.ttft_ms),
                "t_in": t_in, "t_out": t_out, "t_cache_read": t_read,
                "t_cache_write": t_write, "t_reasoning": t_reasoning, "cut": self.cut}


#: settle.lua's analytics arguments when nothing is recorded (a released call).
NO_FACTS = {**CallFacts("").args(), "analytics": 0, "ttl_minute": 0, "ttl_hour": 0,
            "ttl_day": 0}


class RefusalRecorder:
    """Counts the processor's own refusals of a known caller (refusal.lua), in the
    background: never awaited on the request path, bounded, failures dropped and
    counted."""

    def __init__(self, decisions: PipelinedRedis | Any, policy: AnalyticsPolicy,
                 queue_size: int, timeout_s: float) -> None:
        self._decisions = decisions
        self._policy = policy
        self._script = scripts.load("refusal")
        self._writes = BackgroundWrites("refusal_analytics", queue_size, timeout_s)

    def record(self, caller: str, group: str, reason: str) -> None:
        if not self._policy.enabled:
            return
        keys, args = self._script.bind(
            {"limits": limits_key(caller)},
            {"prefix": caller_prefix(caller), "group": group, "reason": reason,
             **{k: v for k, v in self._policy.args().items() if k != "analytics"}})
        self._writes.put(lambda: self._decisions.evalsha(self._script, keys, args))

    async def flush(self) -> None:
        await self._writes.flush()

    async def close(self) -> None:
        await self._writes.close()


# ---------------------------------------------------------------------------- reading

@dataclass
class Histogram:
    bounds_ms: tuple[int, ...] = BOUNDS_MS
    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_MS) + 1))
    count: int = 0
    sum_ms: int = 0


@dataclass
class Totals:
    spend_nano: int = 0
    tokens: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(TOKEN_FIELDS.values(), 0))
    requests: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    refusals_by_reason: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)

    def add(self, metric: str, value: int) -> None:
        """Add one field's value (an unknown metric is ignored: a newer writer's)."""
        if metric == "$":
            self.spend_nano += value
        elif metric == "n":
            self.requests += value
        elif metric in TOKEN_FIELDS:
            self.tokens[TOKEN_FIELDS[metric]] += value
        elif metric.startswith("e:"):
            self.errors_by_status[metric[2:]] = self.errors_by_status.get(metric[2:], 0) + value
        elif metric.startswith("r:"):
            self.refusals_by_reason[metric[2:]] = (self.refusals_by_reason.get(metric[2:], 0)
                                                   + value)
        elif metric[0] in "lf" and len(metric) > 1:
            histogram = self.latency if metric[0] == "l" else self.ttft
            if metric[1:] == "s":
                histogram.sum_ms += value
            elif metric[1] == ":" and metric[2:].isdigit() and int(metric[2:]) < len(
                    histogram.counts):
                histogram.counts[int(metric[2:])] += value
                histogram.count += value


def _group_name(group_by: str, caller: str, provider: str, pool: str, model: str) -> str:
    return {"model": model, "key": caller, "provider": provider, "pool": pool}[group_by]


class AnalyticsReader:
    """The admin side: totals and series over any range, grouped, from the buckets.
    `client`: a synchronous redis-py client (a RedisCluster too: SCAN walks every
    master, the pipeline routes each HGETALL)."""

    def __init__(self, client: Any) -> None:
        self._redis = client

    def usage(self, start_ms: int, end_ms: int,
              group_by: str = "") -> tuple[Totals, dict[str, Totals]]:
        """Totals of [start, end) and per group, from the coarsest buckets that tile the
        range exactly (day, else hour, else minute; a range not on minutes is widened to
        whole minutes)."""
        resolution = tiling_resolution(start_ms, end_ms)
        size = RESOLUTION_MS[resolution]
        first, last = start_ms // size, -(-end_ms // size)
        _, totals, groups = self._read(resolution, first, last, group_by, merge=True)[0]
        return totals, groups

    def series(self, resolution: str, start_ms: int, end_ms: int,
               group_by: str = "") -> list[tuple[int, Totals, dict[str, Totals]]]:
        """One (bucket start ms, totals, per group) for every bucket of `resolution`
        overlapping [start, end), empty ones included, oldest first."""
        size = RESOLUTION_MS[resolution]
        first, last = start_ms // size, -(-end_ms // size)
        return self._read(resolution, first, last, group_by, merge=False)

    def _read(self, resolution: str, first: int, last: int, group_by: str,
              merge: bool) -> list[tuple[int, Totals, dict[str, Totals]]]:
        if group_by not in GROUPS:
            raise ValueError(f"group_by must be '', model, key, provider or pool, got "
                             f"{group_by!r}")
        names: list[tuple[str, str, int]] = []
        for key in self._redis.scan_iter(match=analytics_pattern(resolution), count=1000):
            name = text(key)
            parsed = parse_analytics_key(name)
            if parsed is not None and first <= parsed[1] < last:
                names.append((name, *parsed))
        pipe = self._redis.pipeline(transaction=False)
        for name, _, _ in names:
            pipe.hgetall(name)
        size = RESOLUTION_MS[resolution]
        buckets = {} if merge else {n: (Totals(), {}) for n in range(first, last)}
        merged: tuple[Totals, dict[str, Totals]] = (Totals(), {})
        for (_, caller, number), fields in zip(names, pipe.execute() if names else [],
                                                strict=True):
            totals, groups = merged if merge else buckets[number]
            for raw, value in fields.items():
                metric, _, group = text(raw).partition("|")
                provider, pool, model = [*group.split("|", 2), "", ""][:3]
                amount = int(value)
                totals.add(metric, amount)
                if group_by:
                    name = _group_name(group_by, caller, provider, pool, model)
                    groups.setdefault(name, Totals()).add(metric, amount)
        if merge:
            return [(first * size, *merged)]
        return [(n * size, *buckets[n]) for n in range(first, last)]

    def live_streams(self) -> int:
        """Open reservations (calls in flight) across every caller."""
        keys = [text(k) for k in self._redis.scan_iter(match=RESERVATIONS_PATTERN, count=1000)]
        if not keys:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hlen(key)
        return sum(int(n) for n in pipe.execute())


def tiling_resolution(start_ms: int, end_ms: int) -> str:
    """The coarsest resolution whose buckets tile [start, end) exactly."""
    for resolution in ("day", "hour"):
        size = RESOLUTION_MS[resolution]
        if start_ms % size == 0 and end_ms % size == 0:
            return resolution
    return "minute"


def calendar_window(window: str, now_ms: int | None = None) -> tuple[int, int]:
    """[start, end) in ms of the current UTC calendar window (minute hour day week month),
    as lua/lib/windows.lua computes the budget windows: ISO weeks (Monday 00:00 UTC),
    calendar months."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    sec = now_ms // 1000
    day = sec // 86400
    if window in ("minute", "hour", "day"):
        size = {"minute": 60, "hour": 3600, "day": 86400}[window]
        start = sec // size * size
        return start * 1000, (start + size) * 1000
    if window == "week":
        week = (day + 3) // 7  # 1970-01-01 is a Thursday: weeks start on day -3
        return (week * 7 - 3) * 86_400_000, (week * 7 + 4) * 86_400_000
    if window == "month":
        y, m, _ = _civil_from_days(day)
        ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
        return _days_from_civil(y, m, 1) * 86_400_000, _days_from_civil(ny, nm, 1) * 86_400_000
    raise ValueError(f"window must be minute, hour, day, week or month, got {window!r}")


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 (Howard Hinnant's algorithm, as windows.lua)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * ((m + 9) % 12) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d
