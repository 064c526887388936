"""Usage queries of the admin service: the analytics buckets the settlement script writes
(state/analytics.py) as the proto's UsageReport / UsageSeries, and as export rows."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from tokenfuse.admin.v1 import admin_pb2 as pb
from tokenfuse.state.analytics import AnalyticsReader, Histogram, Totals, calendar_window
from tokenfuse.state.connection import SyncRedis

WINDOWS = ("minute", "hour", "day", "week", "month")
GROUPS = ("", "model", "key", "provider", "pool")
RESOLUTION_MS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
DEFAULT_BUCKETS = 60
MAX_BUCKETS = 1500
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")
ROW_FIELDS = ["bucket_start", "bucket_start_ms", "group", "spend_nano_usd",
              *(f"{kind}_tokens" for kind in TOKEN_KINDS), "requests", "errors", "refusals"]


def _invalid(message: str) -> Exception:
    from tokenfuse.admin.core import AdminError  # core imports this module

    return AdminError("invalid", message)


def _check_group(group_by: str) -> str:
    if group_by not in GROUPS:
        raise _invalid(f"group_by is one of {', '.join(g for g in GROUPS if g)} (or none)")
    return group_by


def _histogram(h: Histogram) -> pb.Histogram:
    return pb.Histogram(bounds_ms=list(h.bounds_ms), counts=list(h.counts), count=h.count,
                        sum_ms=h.sum_ms)


def totals_message(t: Totals) -> pb.UsageTotals:
    return pb.UsageTotals(
        spend_nano_usd=t.spend_nano,
        tokens=pb.TokenCounts(**{kind: t.tokens.get(kind, 0) for kind in TOKEN_KINDS}),
        requests=t.requests, errors_by_status=t.errors_by_status,
        refusals_by_reason=t.refusals_by_reason, latency_ms=_histogram(t.latency),
        ttft_ms=_histogram(t.ttft))


def _groups(groups: dict[str, Totals]) -> list[pb.UsageGroup]:
    return [pb.UsageGroup(key=key, totals=totals_message(t))
            for key, t in sorted(groups.items(), key=lambda kv: (-kv[1].spend_nano, kv[0]))]


def report(client: SyncRedis, window: str, group_by: str, start_ms: int = 0,
           end_ms: int = 0) -> pb.UsageReport:
    """One calendar window (UTC, the budgets' calendar) or an explicit [start, end)."""
    _check_group(group_by)
    if start_ms or end_ms:
        if not 0 <= start_ms < end_ms:
            raise _invalid("start_ms must be below end_ms")
        if start_ms % RESOLUTION_MS["minute"] or end_ms % RESOLUTION_MS["minute"]:
            raise _invalid("start_ms and end_ms are whole minutes (buckets are per minute)")
        window = ""
    else:
        window = window or "day"
        if window not in WINDOWS:
            raise _invalid(f"window is one of {', '.join(WINDOWS)}")
        start_ms, end_ms = calendar_window(window, int(time.time() * 1000))
    totals, groups = AnalyticsReader(client).usage(start_ms, end_ms, group_by)
    return pb.UsageReport(window=window, group_by=group_by, start_ms=start_ms, end_ms=end_ms,
                          totals=totals_message(totals), groups=_groups(groups))


def series(client: SyncRedis, resolution: str, group_by: str, start_ms: int = 0,
           end_ms: int = 0) -> pb.UsageSeries:
    _check_group(group_by)
    resolution = resolution or "hour"
    step = RESOLUTION_MS.get(resolution)
    if step is None:
        raise _invalid(f"resolution is one of {', '.join(RESOLUTION_MS)}")
    if not end_ms:
        end_ms = (int(time.time() * 1000) // step + 1) * step
    if not start_ms:
        start_ms = end_ms - DEFAULT_BUCKETS * step
    if start_ms % step or end_ms % step or not 0 <= start_ms < end_ms:
        raise _invalid(f"start_ms < end_ms, both multiples of one {resolution} ({step} ms)")
    if (end_ms - start_ms) // step > MAX_BUCKETS:
        raise _invalid(f"at most {MAX_BUCKETS} buckets per query")
    buckets = [pb.SeriesBucket(start_ms=at, totals=totals_message(t), groups=_groups(g))
               for at, t, g in AnalyticsReader(client).series(resolution, start_ms, end_ms,
                                                              group_by)]
    return pb.UsageSeries(resolution=resolution, group_by=group_by, buckets=buckets)


def rows(usage: pb.UsageSeries) -> list[dict[str, Any]]:
    """One row per bucket and group (per bucket when not grouped), for CSV and JSON."""
    out = []
    for bucket in usage.buckets:
        parts = [(g.key, g.totals) for g in bucket.groups] if usage.group_by else [
            ("", bucket.totals)]
        for group, t in parts:
            out.append({
                "bucket_start": datetime.fromtimestamp(bucket.start_ms // 1000, UTC).isoformat(),
                "bucket_start_ms": bucket.start_ms, "group": group,
                "spend_nano_usd": t.spend_nano_usd,
                **{f"{kind}_tokens": getattr(t.tokens, kind) for kind in TOKEN_KINDS},
                "requests": t.requests, "errors": sum(t.errors_by_status.values()),
                "refusals": sum(t.refusals_by_reason.values()),
            })
    return out


def requests_last_minute(client: SyncRedis) -> int:
    """Requests of the last complete minute (every key)."""
    step = RESOLUTION_MS["minute"]
    end = int(time.time() * 1000) // step * step
    return sum(t.requests for _, t, _ in AnalyticsReader(client).series("minute", end - step,
                                                                         end, ""))


def live_streams(client: SyncRedis) -> int:
    return AnalyticsReader(client).live_streams()
