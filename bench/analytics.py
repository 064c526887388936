"""What writing usage analytics in the settlement script costs, side by side on this machine
(TOKENFUSE_ANALYTICS=1 vs 0), and what its buckets hold in Redis memory.

- the decision path alone: in one process, `concurrency` callers each doing reserve then
  settle (with a call's facts: status, latency, tokens) in a loop on one Redis node, with
  analytics on and off; reserve+settle pairs/s and p50/p99 of one pair.
- end to end: wrk through Envoy and the processor with the full policy on one key against
  the canned upstream (bench/load.py), a stack with TOKENFUSE_ANALYTICS=1 and one with 0.
- memory: one key's realistic minute of traffic (2 models of one provider, a pooled
  third, statuses 200/429/500, latencies and times to first byte over several bins, a
  few refusals) written by the real scripts; MEMORY USAGE of its minute, hour and day
  buckets; a day of such traffic = 1440 minute + 24 hour + 1 day buckets.

Rounds alternate so drift hits both sides. `bench_analytics(upstream, workdir, ...)` returns
the figures and `report_rows(result)` bench/run.py's rows. Alone: `python bench/analytics.py`.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import redis  # noqa: E402
from load import UpstreamEnvoy, start_warmed, wrk  # noqa: E402

from tests.support.harness import RedisServer, Stack  # noqa: E402
from tokenfuse.config import WINDOWS  # noqa: E402
from tokenfuse.state.analytics import (  # noqa: E402
    AnalyticsPolicy,
    CallFacts,
    RefusalRecorder,
    group_of,
)
from tokenfuse.state.budgets import BudgetStore, Reservation  # noqa: E402
from tokenfuse.state.keys import CALLER, analytics_key, caller_prefix  # noqa: E402

BENCH_KEY = "sk-bench-analytics"
PATH = "/openai/v1/chat/completions"
CALLERS = 64
QUIET = {"TOKENFUSE_BENCH_ROUTES": "1", "TOKENFUSE_LOG_LEVEL": "WARNING"}
FACTS = CallFacts(group_of("openai", "", "gpt-4o-mini"), 200, 420, 180, (812, 96, 0, 0, 0))


async def _decisions(url: str, analytics: bool, duration_s: float,
                     concurrency: int) -> dict[str, float]:
    """reserve + settle pairs for `duration_s` from `concurrency` callers."""
    store = BudgetStore.from_url(url, 2000, [-1] * len(WINDOWS),
                                 analytics=AnalyticsPolicy(enabled=analytics))
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + duration_s

    async def caller(index: int) -> None:
        nonlocal failures
        name, n = f"bench-analytics-{index % CALLERS}", 0
        while time.monotonic() < deadline:
            n += 1
            rid = f"{index}-{n}"
            started = time.perf_counter()
            try:
                granted = await store.reserve(name, rid, 1000, group=FACTS.group)
                assert isinstance(granted, Reservation)
                await store.settle(name, rid, 900, facts=FACTS)
            except Exception:
                failures += 1
                continue
            latencies.append(time.perf_counter() - started)

    stats = redis.Redis.from_url(url)
    try:
        await store.reserve("warm-up", "w", 1)
        await store.settle("warm-up", "w", 1)
        stats.config_resetstat()
        began = time.monotonic()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.monotonic() - began
        # Redis's own time in the scripts: a reserve and a settle per pair.
        script = stats.info("commandstats").get("cmdstat_evalsha", {})
    finally:
        await store.close()
        stats.close()
    latencies.sort()
    return {"pairs_per_s": len(latencies) / elapsed,
            "redis_us_per_pair": 2 * float(script.get("usec_per_call", 0)),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "failures": failures}


async def _one_minute(url: str, caller: str) -> None:
    """A busy key's minute: 600 calls over three groups, refusals among them."""
    store = BudgetStore.from_url(url, 2000, [-1] * len(WINDOWS))
    recorder = RefusalRecorder(store.decisions, AnalyticsPolicy(), 100, 2.0)
    rng = random.Random(16)
    groups = [group_of("openai", "", "gpt-4o-mini"), group_of("openai", "", "gpt-4.1"),
              group_of("anthropic", "team-pool", "claude-haiku-4-5")]
    try:
        for i in range(600):
            group = rng.choice(groups)
            status = rng.choices((200, 429, 500), (96, 3, 1))[0]
            facts = CallFacts(group, status, int(rng.lognormvariate(6.5, 0.8)),
                              int(rng.lognormvariate(5.5, 0.6)),
                              (rng.randint(100, 4000), rng.randint(10, 800),
                               rng.choice((0, 0, 1024)), rng.choice((0, 0, 0, 256)), 0))
            assert isinstance(await store.reserve(caller, f"m{i}", 10_000, group=group),
                              Reservation)
            await store.settle(caller, f"m{i}", 0 if status >= 400 else rng.randint(1, 9_999),
                               facts=facts)
        for i in range(6):
            recorder.record(caller, groups[i % 3], ("unknown_model", "tool_loop_detected")[i % 2])
        await recorder.flush()
    finally:
        await store.close()


def memory_per_key_day(workdir: Path) -> dict[str, Any]:
    """Bytes of one key's buckets after a realistic minute, and a day of such minutes."""
    node = RedisServer(Path(tempfile.mkdtemp(prefix="tf-bench-memory-", dir=workdir)))
    node.start()
    try:
        client = node.client()
        for _ in range(3):  # a minute that did not roll over while being written
            caller = f"bench-memory-{random.getrandbits(32):08x}"
            asyncio.run(_one_minute(node.url, caller))
            minute_keys = list(client.scan_iter(
                match=caller_prefix(caller) + CALLER["analytics_minute"] + "*"))
            if len(minute_keys) == 1:
                break
        minute = int(minute_keys[0].decode().rpartition(":")[2])
        sizes = {res: int(client.memory_usage(analytics_key(caller, res, number), samples=0))
                 for res, number in (("minute", minute), ("hour", minute // 60),
                                     ("day", minute // 1440))}
        fields = client.hlen(minute_keys[0])
        encoding = client.object("encoding", minute_keys[0]).decode()
    finally:
        node.stop()
    day = 1440 * sizes["minute"] + 24 * sizes["hour"] + sizes["day"]
    retained = (2 * 1440 * sizes["minute"] + 35 * 24 * sizes["hour"]
                + 400 * sizes["day"])  # at the default retention, every minute busy
    return {"bucket_bytes": sizes, "fields_per_bucket": fields, "encoding": encoding,
            "calls_per_minute": 600, "bytes_per_key_day": day,
            "bytes_per_key_retained_default": retained}


def bench_analytics(upstream: UpstreamEnvoy, workdir: Path, duration_s: int = 8,
                    rounds: int = 3, connections: int = 32,
                    concurrency: int = 64) -> dict[str, Any]:
    """Analytics on vs off: end to end and the decision path, medians of `rounds`; and
    the memory figure."""
    node = RedisServer(Path(tempfile.mkdtemp(prefix="tf-bench-node-", dir=workdir)))
    node.start()
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    stacks = {"on": Stack(upstream_url, {**QUIET, "TOKENFUSE_ANALYTICS": "1"}),
              "off": Stack(upstream_url, {**QUIET, "TOKENFUSE_ANALYTICS": "0"})}
    wrk_runs: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
    decision_runs: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
    try:
        start_warmed(stacks, PATH, workdir, connections, BENCH_KEY, "analytics")
        for _ in range(rounds):
            for name, stack in stacks.items():
                wrk_runs[name].append(wrk(stack.envoy.base_url + PATH, workdir, duration_s,
                                          connections, BENCH_KEY))
            for name in stacks:
                decision_runs[name].append(asyncio.run(_decisions(
                    node.url, name == "on", duration_s / 2, concurrency)))
    finally:
        for stack in stacks.values():
            stack.cleanup()
        node.stop()
    end_to_end = {}
    for name, runs in wrk_runs.items():
        end_to_end[name] = {f: statistics.median(r[f] for r in runs)
                            for f in ("rps", "p50_ms", "p99_ms")}
        end_to_end[name]["failures"] = sum(r["errors"] + r["non2xx"] for r in runs)
    decisions = {name: {f: statistics.median(r[f] for r in runs)
                        for f in ("pairs_per_s", "p50_ms", "p99_ms", "redis_us_per_pair")}
                 | {"failures": sum(r["failures"] for r in runs)}
                 for name, runs in decision_runs.items()}
    return {"end_to_end": end_to_end, "decisions": decisions, "runs": wrk_runs,
            "decision_runs": decision_runs, "memory": memory_per_key_day(workdir),
            "concurrency": concurrency, "connections": connections}


def report_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (measure, figures, ratio, target) for bench/run.py's table."""
    e2e, dec, mem = res["end_to_end"], res["decisions"], res["memory"]
    on, off = e2e["on"], e2e["off"]
    d_on, d_off = dec["on"], dec["off"]
    return [
        ("analytics in settle: req/s (off | on)",
         f"{off['rps']:,.0f} | {on['rps']:,.0f} (failures {on['failures']:.0f})",
         f"{on['rps'] / off['rps']:.2f}" if off["rps"] else "", ""),
        ("  p50 / p99 ms at saturation",
         f"{off['p50_ms']:.1f}/{off['p99_ms']:.1f} | {on['p50_ms']:.1f}/{on['p99_ms']:.1f}",
         f"p50 +{on['p50_ms'] - off['p50_ms']:.2f} ms", ""),
        (f"  decision path alone, {res['concurrency']} callers: reserve+settle pairs/s",
         f"{d_off['pairs_per_s']:,.0f} | {d_on['pairs_per_s']:,.0f}",
         f"{d_on['pairs_per_s'] / d_off['pairs_per_s']:.2f}", ""),
        ("  decision pair p50 / p99 ms",
         f"{d_off['p50_ms']:.2f}/{d_off['p99_ms']:.2f} | "
         f"{d_on['p50_ms']:.2f}/{d_on['p99_ms']:.2f}", "", ""),
        ("  Redis time per reserve+settle pair, us (INFO commandstats)",
         f"{d_off['redis_us_per_pair']:.0f} | {d_on['redis_us_per_pair']:.0f}",
         f"+{d_on['redis_us_per_pair'] - d_off['redis_us_per_pair']:.0f} us", ""),
        (f"  memory per busy key per day ({mem['calls_per_minute']} calls/min, 3 groups)",
         f"{mem['bytes_per_key_day'] / 1e6:.2f} MB (minute bucket "
         f"{mem['bucket_bytes']['minute']:,} B, {mem['fields_per_bucket']} fields, "
         f"{mem['encoding']})", "", ""),
    ]


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-analytics-"))
    upstream = UpstreamEnvoy(workdir)
    upstream.start()
    try:
        res = bench_analytics(upstream, workdir)
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for row in report_rows(res):
        print("  ".join(row).rstrip())
    print(json.dumps({k: res[k] for k in ("end_to_end", "decisions", "memory")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
