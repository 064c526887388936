"""`make bench`: tokenfuse side by side with Envoy alone and with the LiteLLM proxy, in one
run on this machine. Prints one table with ratios and targets; writes bench/results/*.json.

1. non-streaming saturation (wrk, BENCH_CONNECTIONS connections): the same Envoy, once
   through the processor with the full policy (budget reserve + settle, loop guard) on
   `/openai/...`, once with the processor disabled on `/direct/openai/...`; the upstream is
   a second Envoy answering with `direct_response`. Rounds alternate so drift hits both.
2. added latency at a fixed offered rate (BENCH_RATE, default 300 req/s) on both paths.
3. streaming (bench/streaming.py): added latency per chunk, chunks/s flat out; SSE plain,
   NDJSON (Ollama's native API, the second framing), SSE with the client asking gzip
   (Envoy compresses), and an upstream that gzips anyway (the processor decodes to meter
   and re-encodes). 1 also runs with the clients asking gzip.
4. the peer: LiteLLM proxy (bench/litellm_peer.py, with PostgreSQL and a virtual key with
   max_budget, so its budget checks run) on the same upstream and workload; then the same
   1,000-request flood against a $0.01 budget through tokenfuse and through LiteLLM, with
   the fake provider billing what it answers (leakage = billed beyond the budget).
5. memory: RSS idle (after start) and peak under load, per process tree.
6. scaling (bench/scaling.py): TOKENFUSE_PROCESSES 1 and 2 and two whole stacks on one
   Redis, req/s and p99 side by side, CPU per request of each part (what to provision).
7. Redis Cluster (bench/redis_cluster.py): a 3+3 cluster vs one node, end to end (wrk)
   and the decision path alone, side by side.
8. tracing (bench/tracing.py): the per-request cost of the OpenTelemetry hooks, off and on,
   and req/s through Envoy with tracing off vs on (every request sampled).
9. usage analytics (bench/analytics.py): the analytics writes in the settlement script,
   TOKENFUSE_ANALYTICS=1 vs 0, end to end and on the decision path alone; the memory of
   one busy key's buckets per day.

BENCH_LITELLM=0 skips the peer (and its one-time ~1 min install).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import analytics  # noqa: E402
import scaling  # noqa: E402
import streaming  # noqa: E402
import tracing  # noqa: E402
from flood import flood  # noqa: E402
from load import UpstreamEnvoy, wrk  # noqa: E402
from memory import PeakRss, tree_rss  # noqa: E402
from redis_cluster import bench_redis_cluster  # noqa: E402
from redis_cluster import report_rows as redis_cluster_rows  # noqa: E402

from tests.support.fake_provider import FakeProvider  # noqa: E402
from tests.support.harness import Stack, free_port  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DURATION_S = int(os.environ.get("BENCH_DURATION_S", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
RATE = int(os.environ.get("BENCH_RATE", "300"))
WITH_LITELLM = os.environ.get("BENCH_LITELLM", "1") != "0"
FLOOD_BUDGET_NANO = 10_000_000  # $0.01
BENCH_KEY = "sk-bench-key"
PATHS = {"envoy_alone": "/direct/openai/v1/chat/completions",
         "tokenfuse": "/openai/v1/chat/completions"}
MB = 1024 * 1024


def _median(runs: list[dict[str, float]], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {f: _median(runs, f) for f in ("rps", "p50_ms", "p99_ms")}
    out["failures"] = sum(r["errors"] + r["non2xx"] for r in runs)
    return out


def _stack_roots(stack: Stack) -> dict[str, int | None]:
    def pid(part: Any) -> int | None:
        return part.proc.pid if part.proc is not None else None
    return {"processor": pid(stack.processor), "redis": pid(stack.redis),
            "envoy": pid(stack.envoy)}


def _rss_mb(roots: dict[str, int | None]) -> dict[str, float]:
    return {name: tree_rss(root) / MB for name, root in roots.items()}


def bench_tokenfuse(upstream: UpstreamEnvoy, workdir: Path) -> dict[str, Any]:
    """Scenarios 1, 2 and 5 (tokenfuse side) on one stack."""
    stack = Stack(f"http://127.0.0.1:{upstream.port}",
                  {"TOKENFUSE_BENCH_ROUTES": "1", "TOKENFUSE_LOG_LEVEL": "WARNING"})
    try:
        stack.start()
        # The full policy: a budget to check and charge; the loop guard is on by default.
        stack.cli("budget", "set", "--key", BENCH_KEY, "--daily", "1000000")
        roots = _stack_roots(stack)
        idle = _rss_mb(roots)
        base = stack.envoy.base_url
        for name, path in PATHS.items():  # warm-up, and proof that both paths answer 200
            warm = wrk(base + path, workdir, 1, CONNECTIONS, BENCH_KEY)
            if warm["non2xx"] or warm["errors"]:
                raise SystemExit(f"bench: {name} warm-up had failures: {warm}")
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in PATHS}
        gzip_runs: dict[str, list[dict[str, float]]] = {n: [] for n in PATHS}
        with PeakRss(roots) as peak:
            for _ in range(ROUNDS):
                for name, path in PATHS.items():
                    runs[name].append(wrk(base + path, workdir, DURATION_S, CONNECTIONS,
                                          BENCH_KEY))
                    # The same, the clients asking for gzip (Envoy compresses the answer).
                    gzip_runs[name].append(wrk(base + path, workdir, DURATION_S,
                                               CONNECTIONS, BENCH_KEY,
                                               accept_encoding="gzip"))
        # Fixed rate: 60 connections, each waiting 60/RATE s after every answer.
        connections = 60
        delay_ms = 1000 * connections // RATE
        fixed = {name: wrk(base + path, workdir, DURATION_S * 2, connections, BENCH_KEY,
                           delay_ms) for name, path in PATHS.items()}
        settled = [x for x in stack.processor.metrics().splitlines()
                   if x.startswith("tokenfuse_settlements_total")]
    finally:
        stack.cleanup()
    return {"saturation": {n: _summary(r) for n, r in runs.items()}, "runs": runs,
            "saturation_gzip": {n: _summary(r) for n, r in gzip_runs.items()},
            "fixed_rate": fixed, "rss_idle_mb": idle,
            "rss_peak_mb": {n: v / MB for n, v in peak.peak.items()},
            "settlements_metric": settled}


def bench_streaming() -> dict[str, dict[str, float]]:
    port = free_port()
    sse = subprocess.Popen([sys.executable, str(ROOT / "bench" / "sse_upstream.py"), str(port)])
    stack = Stack(f"http://127.0.0.1:{port}",
                  {"TOKENFUSE_BENCH_ROUTES": "1", "TOKENFUSE_LOG_LEVEL": "WARNING"})
    prices = stack.workdir / "ollama-prices.json"  # the NDJSON mode's model, priced
    prices.write_text(json.dumps(streaming.NDJSON_PRICES))
    stack.env["TOKENFUSE_PRICES_FILE"] = str(prices)
    try:
        stack.start()
        return streaming.run(stack.envoy.port, ROUNDS)
    finally:
        stack.cleanup()
        sse.terminate()
        sse.wait()


def bench_litellm(upstream: UpstreamEnvoy, workdir: Path) -> dict[str, Any]:
    """Scenario 4 (throughput) and 5 (LiteLLM side), on the same upstream and workload."""
    import litellm_peer

    litellm_peer.ensure_installed()
    with litellm_peer.LiteLLMProxy(workdir / "litellm", f"http://127.0.0.1:{upstream.port}/v1",
                                   with_db=True) as proxy:
        roots = proxy.roots()
        idle = _rss_mb(roots)
        key = proxy.create_virtual_key(1_000_000.0)  # budget checks on, never reached
        url = proxy.base_url + "/v1/chat/completions"
        warm = wrk(url, workdir, 2, CONNECTIONS, key)
        if warm["requests"] == 0 or warm["non2xx"] > warm["requests"] // 2:
            raise SystemExit(f"bench: LiteLLM warm-up failed: {warm}\n{proxy.log_tail()}")
        with PeakRss(roots) as peak:
            runs = [wrk(url, workdir, DURATION_S, CONNECTIONS, key) for _ in range(ROUNDS)]
        return {"version": litellm_peer.LITELLM_VERSION, "saturation": _summary(runs),
                "runs": runs, "rss_idle_mb": idle,
                "rss_peak_mb": {n: v / MB for n, v in peak.peak.items()},
                "start_seconds": proxy.start_seconds}


def bench_floods(workdir: Path) -> dict[str, Any]:
    """The 1,000-request flood against a $0.01 budget, tokenfuse then LiteLLM."""
    fake = FakeProvider()
    fake.start()
    out: dict[str, Any] = {}
    stack = Stack(fake.base_url, {"TOKENFUSE_LOG_LEVEL": "WARNING"})
    try:
        stack.start()
        key = "sk-bench-flood"
        stack.cli("budget", "set", "--key", key, "--daily", "0.01")
        out["tokenfuse"] = flood(stack.envoy.base_url + "/openai/v1", key, key, fake,
                                 FLOOD_BUDGET_NANO)
        stack.cleanup()
        if WITH_LITELLM:
            import litellm_peer

            with litellm_peer.LiteLLMProxy(workdir / "litellm-flood", fake.base_url + "/v1",
                                           with_db=True) as proxy:
                vkey = proxy.create_virtual_key(FLOOD_BUDGET_NANO / 1e9)
                out["litellm"] = flood(proxy.base_url + "/v1", vkey,
                                       litellm_peer.UPSTREAM_KEY, fake, FLOOD_BUDGET_NANO)
    finally:
        stack.cleanup()
        fake.stop()
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (measure, figures, ratio, target) of the results table."""
    sat = res["tokenfuse"]["saturation"]
    alone, tf = sat["envoy_alone"], sat["tokenfuse"]
    fixed = res["tokenfuse"]["fixed_rate"]
    added50 = fixed["tokenfuse"]["p50_ms"] - fixed["envoy_alone"]["p50_ms"]
    added99 = fixed["tokenfuse"]["p99_ms"] - fixed["envoy_alone"]["p99_ms"]
    ratio = tf["rps"] / alone["rps"]
    rows = [
        ("non-streaming req/s (Envoy alone | tokenfuse)",
         f"{alone['rps']:,.0f} | {tf['rps']:,.0f}", f"{ratio:.2f}",
         f">= 0.50: {_mark(ratio >= 0.5)}"),
        ("  p50 / p99 ms at saturation",
         f"{alone['p50_ms']:.1f}/{alone['p99_ms']:.1f} | {tf['p50_ms']:.1f}/{tf['p99_ms']:.1f}",
         "", ""),
        (f"added latency at {RATE} req/s (offered; achieved "
         f"{fixed['envoy_alone']['rps']:.0f} | {fixed['tokenfuse']['rps']:.0f})",
         f"p50 +{added50:.2f} ms, p99 +{added99:.2f} ms", "",
         f"p50 <= 1 ms: {_mark(added50 <= 1)}, p99 <= 5 ms: {_mark(added99 <= 5)}"),
    ]
    gz = res["tokenfuse"]["saturation_gzip"]
    rows.append(("  client asks gzip: req/s (Envoy alone | tokenfuse)",
                 f"{gz['envoy_alone']['rps']:,.0f} | {gz['tokenfuse']['rps']:,.0f}",
                 f"{gz['tokenfuse']['rps'] / gz['envoy_alone']['rps']:.2f}",
                 f"vs plain tokenfuse {gz['tokenfuse']['rps'] / tf['rps']:.2f}"))
    for mode, label in streaming.MODES.items():
        st = res["streaming"][mode]
        chunk50 = st["tokenfuse"]["p50_ms"] - st["envoy_alone"]["p50_ms"]
        chunk99 = st["tokenfuse"]["p99_ms"] - st["envoy_alone"]["p99_ms"]
        rows.append((f"streaming{label}: added per chunk",
                     f"p50 +{chunk50:.3f} ms, p99 +{chunk99:.3f} ms", "",
                     f"p50 <= 0.5 ms: {_mark(chunk50 <= 0.5)}"))
        if mode == "plain" and st["tokenfuse"].get("refused_streams"):
            rows.append(("streaming, all modes: streams refused 503 (state store late)",
                         f"{st['tokenfuse']['refused_streams']:.0f}", "", ""))
        rows.append((f"streaming{label} chunks/s (Envoy alone | tokenfuse)",
                     f"{st['envoy_alone']['chunks_per_s']:,.0f} | "
                     f"{st['tokenfuse']['chunks_per_s']:,.0f}",
                     f"{st['tokenfuse']['chunks_per_s'] / st['envoy_alone']['chunks_per_s']:.2f}",
                     f">= 5,000: {_mark(st['tokenfuse']['chunks_per_s'] >= 5000)}"))
    lite = res.get("litellm")
    if lite:
        lr = lite["saturation"]
        times = tf["rps"] / lr["rps"] if lr["rps"] else float("inf")
        rows.append((f"LiteLLM {lite['version']} req/s, p99 ms (vs tokenfuse)",
                     f"{lr['rps']:,.0f}, p99 {lr['p99_ms']:.1f} (failures {lr['failures']:.0f})",
                     f"{times:.1f}x", f">= 20x: {_mark(times >= 20)}"))
    for name, fl in res["floods"].items():
        rows.append((f"flood 1,000 vs $0.01: {name}",
                     f"{fl['allowed']} allowed, billed {fl['budget_used_percent']:.2f} % of "
                     f"budget, leak {fl['leak_nano_usd']:,} nano-USD", "",
                     f"zero leak: {_mark(fl['leak_nano_usd'] == 0)}"))
    idle, peak = res["tokenfuse"]["rss_idle_mb"], res["tokenfuse"]["rss_peak_mb"]
    rows.append(("RSS MB idle | peak: processor, redis, envoy",
                 ", ".join(f"{idle[n]:.0f} | {peak[n]:.0f}" for n in idle), "",
                 f"processor idle <= 60 MB: {_mark(idle['processor'] <= 60)}"))
    if lite:
        li, lp = lite["rss_idle_mb"], lite["rss_peak_mb"]
        rows.append(("RSS MB idle | peak: LiteLLM (+engine), postgres",
                     ", ".join(f"{li[n]:.0f} | {lp[n]:.0f}" for n in li), "", ""))
    rows += scaling.rows(res["scaling"])
    rows += redis_cluster_rows(res["redis_cluster"])
    rows += tracing_rows(res["tracing"])
    rows += analytics.report_rows(res["analytics"])
    return rows


def tracing_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    hooks, off, on = res["hooks"], res["envoy"]["off"], res["envoy"]["on"]
    return [
        ("tracing hooks per request, us (off | on, + OTLP encoding)",
         f"{hooks['off_us_per_request']:.2f} | {hooks['on_hooks_us_per_request']:.0f} + "
         f"{hooks['on_export_encode_us_per_request']:.0f}", "", ""),
        ("tracing req/s, p99 ms (off | on, every request sampled)",
         f"{off['rps']:,.0f}, {off['p99_ms']:.0f} | {on['rps']:,.0f}, {on['p99_ms']:.0f}",
         f"{on['rps'] / off['rps']:.2f}" if off["rps"] else "", ""),
    ]


def main() -> int:
    if shutil.which("wrk") is None:
        print("bench: wrk not found (make bench installs it with apt)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": _cpu_model(),
        "cpus": os.cpu_count(), "connections": CONNECTIONS, "duration_s": DURATION_S,
        "rounds": ROUNDS, "rate": RATE}
    upstream = UpstreamEnvoy(workdir)
    upstream.start()
    try:
        results["tokenfuse"] = bench_tokenfuse(upstream, workdir)
        results["streaming"] = bench_streaming()
        if WITH_LITELLM:
            results["litellm"] = bench_litellm(upstream, workdir)
        results["floods"] = bench_floods(workdir)
        results["scaling"] = scaling.scaling(upstream, workdir, DURATION_S, ROUNDS,
                                             CONNECTIONS)
        results["redis_cluster"] = bench_redis_cluster(upstream, workdir, DURATION_S, ROUNDS,
                                                       CONNECTIONS)
        results["tracing"] = tracing.bench_tracing(workdir, DURATION_S, ROUNDS, CONNECTIONS)
        results["analytics"] = analytics.bench_analytics(upstream, workdir, DURATION_S, ROUNDS,
                                                         CONNECTIONS)
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = report(results)
    print(f"\ntokenfuse bench, {results['date']}, {results['cpu']}, {results['cpus']} cores; "
          f"wrk {CONNECTIONS} connections, {ROUNDS}x{DURATION_S}s per side, medians")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    RESULTS.mkdir(parents=True, exist_ok=True)
    results["table"] = rows
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {RESULTS / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
