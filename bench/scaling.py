"""Scaling: non-streaming saturation (wrk, the full policy) with TOKENFUSE_PROCESSES 1, 2
(and 4 where the machine has the cores), and two complete stacks (two Envoys, two
processors) on one Redis, flooded at the same time; req/s and p99 side by side.

The CPU each part burns (utime + stime of its process tree, from /proc) over each run
gives the cores to provision per 1,000 req/s: processor, Envoy, Redis.

`bench/run.py` calls `scaling(upstream, workdir)` and adds `rows(result)` to its table;
`python bench/scaling.py` runs it alone (its own canned upstream).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import UpstreamEnvoy, wrk  # noqa: E402
from memory import children_by_parent, process_tree  # noqa: E402

from tests.support.harness import RedisServer, Stack  # noqa: E402

BENCH_KEY = "sk-bench-scaling"
PATH = "/openai/v1/chat/completions"
DIRECT = "/direct/openai/v1/chat/completions"
TICK = os.sysconf("SC_CLK_TCK")
PARTS = ("processor", "envoy", "redis")


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / TICK


class CpuMeter:
    """CPU seconds of named process trees between start() and stop()."""

    def __init__(self, roots: dict[str, list[int | None]]) -> None:
        tree = children_by_parent()
        self._pids = {name: [p for root in rs for p in process_tree(root, tree)]
                      for name, rs in roots.items()}
        self._start = {name: _cpu_seconds(p) for name, p in self._pids.items()}

    def used(self) -> dict[str, float]:
        return {name: _cpu_seconds(p) - self._start[name] for name, p in self._pids.items()}


def _roots(stacks: list[Stack], redis: RedisServer | None) -> dict[str, list[int | None]]:
    def pid(part: Any) -> int | None:
        return part.proc.pid if part is not None and part.proc is not None else None
    redis_roots = ([pid(redis)] if redis is not None
                   else [pid(s.redis) for s in stacks if s.redis is not None])
    return {"processor": [pid(s.processor) for s in stacks],
            "envoy": [pid(s.envoy) for s in stacks], "redis": redis_roots}


def _measure(stacks: list[Stack], redis: RedisServer | None, workdir: Path,
             duration_s: int, rounds: int, connections: int, path: str = PATH
             ) -> dict[str, Any]:
    """wrk through every stack at once (connections split evenly), `rounds` times; the
    median round's req/s (summed over stacks) and its p99 (the worst stack's)."""
    per_stack = max(1, connections // len(stacks))
    runs = []
    for _ in range(rounds):
        meter = CpuMeter(_roots(stacks, redis))
        results: list[dict[str, float]] = [{} for _ in stacks]

        def drive(i: int, results: list[dict[str, float]] = results) -> None:
            results[i] = wrk(stacks[i].envoy.base_url + path, workdir, duration_s,
                             per_stack, BENCH_KEY)

        threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(stacks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu = meter.used()
        seconds = max(r["seconds"] for r in results)
        rps = sum(r["rps"] for r in results)
        runs.append({
            "rps": rps, "p50_ms": max(r["p50_ms"] for r in results),
            "p99_ms": max(r["p99_ms"] for r in results),
            "failures": sum(r["errors"] + r["non2xx"] for r in results),
            "cores": {n: c / seconds for n, c in cpu.items()},
            # Cores each part needs per 1,000 req/s at this throughput.
            "cores_per_1000_rps": {n: 1000 * c / seconds / rps if rps else 0.0
                                   for n, c in cpu.items()}})
    runs.sort(key=lambda r: r["rps"])
    median = dict(runs[len(runs) // 2])
    median["rounds"] = runs
    return median


def _env(processes: int) -> dict[str, str]:
    return {"TOKENFUSE_BENCH_ROUTES": "1", "TOKENFUSE_LOG_LEVEL": "WARNING",
            "TOKENFUSE_PROCESSES": str(processes)}


def _warm(stacks: list[Stack], workdir: Path, connections: int) -> None:
    for stack in stacks:
        warm = wrk(stack.envoy.base_url + PATH, workdir, 1, connections, BENCH_KEY)
        if warm["non2xx"] or warm["errors"]:
            raise SystemExit(f"bench scaling: warm-up had failures: {warm}")


def scaling(upstream: UpstreamEnvoy, workdir: Path, duration_s: int = 8, rounds: int = 3,
            connections: int = 32, redis_url: str | None = None,
            redis_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Every scenario on the canned upstream: {"envoy_alone", "processes_<n>",
    "two_stacks_one_redis"} -> req/s, p50/p99 ms, failures, cores (per part).

    `redis_url` (+ `redis_env`, e.g. the variable selecting cluster mode): the two stacks
    share that Redis instead of one started here (its CPU is then not metered)."""
    upstream_url = f"http://127.0.0.1:{upstream.port}"
    cores = os.cpu_count() or 1
    # The load average before and after: on a shared machine the figures say little
    # without it (other work takes cores from every part).
    out: dict[str, Any] = {"cpus": cores, "connections": connections,
                           "duration_s": duration_s, "rounds": rounds,
                           "loadavg_before": os.getloadavg()[0]}
    for processes in [n for n in (1, 2, 4) if n == 1 or n <= cores]:
        stack = Stack(upstream_url, _env(processes))
        try:
            stack.start()
            stack.cli("budget", "set", "--key", BENCH_KEY, "--daily", "1000000")
            _warm([stack], workdir, connections)
            if processes == 1:  # the ceiling: the same Envoy, no processor
                out["envoy_alone"] = _measure([stack], None, workdir, duration_s, rounds,
                                              connections, DIRECT)
            out[f"processes_{processes}"] = _measure([stack], None, workdir, duration_s,
                                                     rounds, connections)
        finally:
            stack.cleanup()
    redis_dir = Path(tempfile.mkdtemp(prefix="tf-scale-redis-"))
    redis = RedisServer(redis_dir) if redis_url is None else None
    secret = "bench-secret-" + os.urandom(8).hex()  # one key id through both stacks
    env = {**_env(1), "TOKENFUSE_SECRET": secret, **(redis_env or {})}
    shared = redis.url if redis is not None else str(redis_url)
    stacks = [Stack(upstream_url, env, redis_url=shared) for _ in range(2)]
    try:
        if redis is not None:
            redis.start()
        for stack in stacks:
            stack.start()
        stacks[0].cli("budget", "set", "--key", BENCH_KEY, "--daily", "1000000")
        _warm(stacks, workdir, connections // 2)
        out["two_stacks_one_redis"] = _measure(stacks, redis, workdir, duration_s, rounds,
                                               connections)
    finally:
        for stack in stacks:
            stack.cleanup()
        if redis is not None:
            redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)
    out["loadavg_after"] = os.getloadavg()[0]
    return out


LABELS = {"envoy_alone": "Envoy alone (no processor)",
          "processes_1": "TOKENFUSE_PROCESSES=1", "processes_2": "TOKENFUSE_PROCESSES=2",
          "processes_4": "TOKENFUSE_PROCESSES=4",
          "two_stacks_one_redis": "two stacks, one Redis"}


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (measure, figures, ratio, target) for bench/run.py's table."""
    out: list[tuple[str, str, str, str]] = []
    base = result.get("processes_1", {}).get("rps") or 0.0
    for name, label in LABELS.items():
        r = result.get(name)
        if r is None:
            continue
        per = r["cores_per_1000_rps"]
        out.append((f"scaling: {label}: req/s, p50/p99 ms",
                    f"{r['rps']:,.0f}, {r['p50_ms']:.1f}/{r['p99_ms']:.1f} "
                    f"(failures {r['failures']:.0f})",
                    f"{r['rps'] / base:.2f}" if base else "",
                    "cores per 1,000 req/s: " + ", ".join(
                        f"{n} {per[n]:.2f}" for n in PARTS if n in per and per[n] > 0)))
    return out


def main() -> int:
    if shutil.which("wrk") is None:
        print("bench: wrk not found (make bench installs it with apt)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tf-scale-"))
    upstream = UpstreamEnvoy(workdir)
    upstream.start()
    try:
        result = scaling(upstream, workdir,
                         duration_s=int(os.environ.get("BENCH_DURATION_S", "8")),
                         rounds=int(os.environ.get("BENCH_ROUNDS", "3")),
                         connections=int(os.environ.get("BENCH_CONNECTIONS", "32")))
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    table = rows(result)
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    print(f"\ntokenfuse scaling, {result['cpus']} cores, wrk {result['connections']} "
          f"connections, {result['rounds']}x{result['duration_s']}s, medians; load average "
          f"{result['loadavg_before']:.1f} before, {result['loadavg_after']:.1f} after")
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    import json
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rounds"}
                      if isinstance(v, dict) else v for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
