"""Redis Cluster overhead vs one Redis node, side by side on this machine.

Two measures, each on one Redis node and on a local 3-master + 3-replica cluster
(tests/support/redis_cluster.py), in alternating rounds so drift hits both:

- end to end: wrk through Envoy and the processor with the full policy (budget reserve +
  settle, loop guard) on one key, against the canned upstream (bench/load.py); a stack on
  the single node and a stack with TOKENFUSE_REDIS_MODE=cluster. One key means one slot:
  all its decisions go to one master, as a hot caller's do.
- the decision path alone: in one process, `concurrency` callers each doing reserve then
  settle in a loop (BudgetStore over PipelinedRedis vs ClusterPipelinedRedis), 64
  distinct callers spread over the masters; decisions/s (a reserve + a settle) and p99 of
  one decision pair.

`bench_redis_cluster(upstream, workdir, ...)` returns the figures; `report_rows(result)`
the table rows bench/run.py prints. Alone: `python bench/redis_cluster.py`.
"""

from __future__ import annotations

import asyncio
import json
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

from load import UpstreamEnvoy, start_warmed, wrk  # noqa: E402

from tests.support.harness import RedisServer, Stack  # noqa: E402
from tests.support.redis_cluster import RedisCluster  # noqa: E402
from tokenfuse.config import WINDOWS  # noqa: E402
from tokenfuse.state.budgets import BudgetStore, Reservation  # noqa: E402

BENCH_KEY = "sk-bench-cluster"
PATH = "/openai/v1/chat/completions"
CALLERS = 64
QUIET = {"TOKENFUSE_BENCH_ROUTES": "1", "TOKENFUSE_LOG_LEVEL": "WARNING"}


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {f: statistics.median(r[f] for r in runs) for f in ("rps", "p50_ms", "p99_ms")}
    out["failures"] = sum(r["errors"] + r["non2xx"] for r in runs)
    return out


async def _decisions(url: str, cluster: bool, duration_s: float,
                     concurrency: int) -> dict[str, float]:
    """reserve + settle pairs for `duration_s` from `concurrency` callers."""
    store = BudgetStore.from_url(url, 2000, [-1] * len(WINDOWS), cluster=cluster)
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + duration_s

    async def caller(index: int) -> None:
        nonlocal failures
        name, n = f"bench-caller-{index % CALLERS}", 0
        while time.monotonic() < deadline:
            n += 1
            rid = f"{index}-{n}"
            started = time.perf_counter()
            try:
                granted = await store.reserve(name, rid, 1000)
                assert isinstance(granted, Reservation)
                await store.settle(name, rid, 900)
            except Exception:
                failures += 1
                continue
            latencies.append(time.perf_counter() - started)

    try:
        await store.reserve("warm-up", "w", 1)  # connect (and learn the slot map) first
        await store.settle("warm-up", "w", 1)
        began = time.monotonic()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        elapsed = time.monotonic() - began
    finally:
        await store.close()
    latencies.sort()
    return {"pairs_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "failures": failures}


def bench_redis_cluster(upstream: UpstreamEnvoy, workdir: Path, duration_s: int = 8,
                        rounds: int = 3, connections: int = 32,
                        concurrency: int = 64) -> dict[str, Any]:
    """The figures of both measures, single node vs cluster, medians of `rounds`."""
    cluster = RedisCluster().start()
    node = RedisServer(Path(tempfile.mkdtemp(prefix="tf-bench-node-", dir=workdir)))
    node.start()
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    stacks = {"single": Stack(upstream_url, QUIET),
              "cluster": Stack(upstream_url, {**QUIET, "TOKENFUSE_REDIS_MODE": "cluster"},
                               redis_url=cluster.url)}
    urls = {"single": node.url, "cluster": cluster.url}
    wrk_runs: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
    decision_runs: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
    try:
        start_warmed(stacks, PATH, workdir, connections, BENCH_KEY, "Redis Cluster")
        for _ in range(rounds):
            for name, stack in stacks.items():
                wrk_runs[name].append(wrk(stack.envoy.base_url + PATH, workdir, duration_s,
                                          connections, BENCH_KEY))
            for name, url in urls.items():
                decision_runs[name].append(asyncio.run(_decisions(
                    url, name == "cluster", duration_s / 2, concurrency)))
    finally:
        for stack in stacks.values():
            stack.cleanup()
        node.stop()
        cluster.cleanup()
    decisions = {name: {f: statistics.median(r[f] for r in runs)
                        for f in ("pairs_per_s", "p50_ms", "p99_ms")}
                 | {"failures": sum(r["failures"] for r in runs)}
                 for name, runs in decision_runs.items()}
    return {"end_to_end": {name: _summary(runs) for name, runs in wrk_runs.items()},
            "decisions": decisions, "runs": wrk_runs, "decision_runs": decision_runs,
            "concurrency": concurrency, "connections": connections}


def report_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (measure, figures, ratio, target) for bench/run.py's table."""
    e2e, dec = res["end_to_end"], res["decisions"]
    one, many = e2e["single"], e2e["cluster"]
    d1, dn = dec["single"], dec["cluster"]
    return [
        ("Redis Cluster 3+3 vs one node: req/s (single | cluster)",
         f"{one['rps']:,.0f} | {many['rps']:,.0f} (failures {many['failures']:.0f})",
         f"{many['rps'] / one['rps']:.2f}", ""),
        ("  p50 / p99 ms at saturation",
         f"{one['p50_ms']:.1f}/{one['p99_ms']:.1f} | {many['p50_ms']:.1f}/{many['p99_ms']:.1f}",
         "", ""),
        (f"  decision path alone, {res['concurrency']} callers: reserve+settle pairs/s",
         f"{d1['pairs_per_s']:,.0f} | {dn['pairs_per_s']:,.0f}",
         f"{dn['pairs_per_s'] / d1['pairs_per_s']:.2f}", ""),
        ("  decision pair p50 / p99 ms",
         f"{d1['p50_ms']:.2f}/{d1['p99_ms']:.2f} | {dn['p50_ms']:.2f}/{dn['p99_ms']:.2f}",
         "", ""),
    ]


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-cluster-"))
    upstream = UpstreamEnvoy(workdir)
    upstream.start()
    try:
        res = bench_redis_cluster(upstream, workdir)
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for row in report_rows(res):
        print("  ".join(row).rstrip())
    print(json.dumps({k: res[k] for k in ("end_to_end", "decisions")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
