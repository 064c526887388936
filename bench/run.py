"""`make bench`: throughput, latency and per-chunk streaming cost through Envoy + tokenfuse
vs Envoy alone (non-streaming here, streaming in bench/streaming.py).

Side by side in one run, on the same Envoy: `/openai/...` goes through the processor with
the full policy (budget reserve + settle in Redis); `/direct/openai/...` is the same route
with the processor disabled. The upstream is a second Envoy answering a canned chat
completion with `direct_response`, so the provider is never the bottleneck. Load comes
from `wrk`. Results: a table with ratios, and bench/results/throughput.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import streaming  # noqa: E402

from tests.harness import Envoy, Stack, free_port, wait_until  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DURATION_S = int(os.environ.get("BENCH_DURATION_S", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))

COMPLETION = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}
REQUEST = {"model": "gpt-4o-mini", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Say ok. Benchmark request WORDS."}]}

# Every request is distinct (a counter spelled in letters, per wrk thread): the loop guard
# normalises digits away, so identical or number-only prompts would be refused as a loop.
WRK_SCRIPT = """
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tag", threads)
end
local counter = 0
local template = [[%s]]
local function spell(n)
  local letters, out = "ghijklmnopqrstuvwxyz", ""
  repeat
    local r = n %% 20
    out = out .. letters:sub(r + 1, r + 1)
    n = math.floor(n / 20)
  until n == 0
  return out
end
request = function()
  counter = counter + 1
  local body = template:gsub("WORDS", spell(counter) .. " " .. spell(tag or 0))
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
                                  ["Authorization"] = "Bearer sk-bench-key"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %%d, \\"seconds\\": %%f, \\"errors\\": %%d, " ..
    "\\"non2xx\\": %%d, \\"p50_ms\\": %%f, \\"p99_ms\\": %%f}\\n",
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def upstream_config(port: int, admin_port: int) -> dict[str, object]:
    """An Envoy that answers every request with the canned completion."""
    route = {"match": {"prefix": "/"}, "direct_response": {
        "status": 200, "body": {"inline_string": json.dumps(COMPLETION)}},
        "response_headers_to_add": [{"header": {"key": "content-type",
                                                "value": "application/json"}}]}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm}]}],
        }]},
    }


class UpstreamEnvoy(Envoy):
    def __init__(self, workdir: Path) -> None:
        port, admin = free_port(), free_port()
        super().__init__(workdir, {"TOKENFUSE_LISTEN_PORT": str(port),
                                   "TOKENFUSE_ENVOY_ADMIN_PORT": str(admin)})
        self.name = "upstream"
        self.log_path = workdir / "upstream.log"
        self.config = workdir / "upstream.json"
        self.config.write_text(json.dumps(upstream_config(port, admin)))

    def start(self) -> None:
        envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"
        self._spawn([envoy, "-c", str(self.config), "--concurrency", "1", "--log-level",
                     "error", "--base-id", str(self.admin_port)])
        wait_until(self._ready, what="upstream envoy")


def wrk(url: str, script: Path, duration: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(CONNECTIONS), "-d", f"{duration}s", "-s", str(script), url],
        capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("JSON "))
    result = json.loads(line[5:])
    result["rps"] = result["requests"] / result["seconds"]
    return result


def main() -> int:
    if shutil.which("wrk") is None:
        print("bench: wrk not found (make bench installs it with apt)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    upstream = UpstreamEnvoy(workdir)
    upstream.start()
    stack = Stack(f"http://127.0.0.1:{upstream.port}",
                  {"TOKENFUSE_BENCH_ROUTES": "1", "TOKENFUSE_LOG_LEVEL": "WARNING"})
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT % json.dumps(REQUEST))
    runs: dict[str, list[dict[str, float]]] = {"envoy_alone": [], "tokenfuse": []}
    sse_port = free_port()
    sse = subprocess.Popen([sys.executable, str(ROOT / "bench" / "sse_upstream.py"),
                            str(sse_port)])
    sse_stack = Stack(f"http://127.0.0.1:{sse_port}",
                      {"TOKENFUSE_BENCH_ROUTES": "1", "TOKENFUSE_LOG_LEVEL": "WARNING"})
    try:
        stack.start()
        # The full policy: a budget to check and charge, the loop guard on (the default).
        stack.cli("budget", "set", "--key", "sk-bench-key", "--daily", "1000000")
        base = stack.envoy.base_url
        paths = {"envoy_alone": "/direct/openai/v1/chat/completions",
                 "tokenfuse": "/openai/v1/chat/completions"}
        for name, path in paths.items():  # warm-up, and proof that both paths answer 200
            warm = wrk(base + path, script, 1)
            if warm["non2xx"] or warm["errors"]:
                raise SystemExit(f"bench: {name} warm-up had failures: {warm}")
        for _ in range(ROUNDS):  # alternate, so drift hits both sides alike
            for name, path in paths.items():
                runs[name].append(wrk(base + path, script, DURATION_S))
        settled = stack.processor.metrics()
        stack.stop()  # the streaming runs get the machine to themselves
        sse_stack.start()
        stream = streaming.run(sse_stack.envoy.port, ROUNDS)
    finally:
        sse_stack.cleanup()
        sse.terminate()
        stack.cleanup()
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[name])

    summary = {n: {f: med(n, f) for f in ("rps", "p50_ms", "p99_ms")} for n in runs}
    failures = {n: sum(r["errors"] + r["non2xx"] for r in runs[n]) for n in runs}
    ratio = summary["tokenfuse"]["rps"] / summary["envoy_alone"]["rps"]
    print(f"\nnon-streaming, {CONNECTIONS} connections, {ROUNDS}x{DURATION_S}s per side, "
          f"medians ({platform.node()}, {os.cpu_count()} cores)")
    print(f"{'path':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'failures':>10}")
    for name in runs:
        s = summary[name]
        print(f"{name:<14}{s['rps']:>10.0f}{s['p50_ms']:>10.2f}{s['p99_ms']:>10.2f}"
              f"{failures[name]:>10}")
    print(f"throughput ratio tokenfuse / envoy alone: {ratio:.2f}   added p50: "
          f"{summary['tokenfuse']['p50_ms'] - summary['envoy_alone']['p50_ms']:.2f} ms")
    print("\nstreaming, per chunk (8 streams x 1 event/5 ms for latency; "
          "32 streams x 2,000 events flat out for chunks/s)")
    print(f"{'path':<14}{'p50 ms':>10}{'p99 ms':>10}{'chunks/s':>12}")
    for name, s in stream.items():
        print(f"{name:<14}{s['p50_ms']:>10.3f}{s['p99_ms']:>10.3f}{s['chunks_per_s']:>12.0f}")
    added = {q: stream["tokenfuse"][q] - stream["envoy_alone"][q] for q in ("p50_ms", "p99_ms")}
    chunk_ratio = stream["tokenfuse"]["chunks_per_s"] / stream["envoy_alone"]["chunks_per_s"]
    print(f"added per chunk: p50 {added['p50_ms']:.3f} ms, p99 {added['p99_ms']:.3f} ms; "
          f"chunks/s ratio {chunk_ratio:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(), "rounds": ROUNDS,
        "results": stream, "added_ms": added, "chunks_per_s_ratio": chunk_ratio}, indent=2))
    (RESULTS / "throughput.json").write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(),
        "connections": CONNECTIONS, "duration_s": DURATION_S, "rounds": ROUNDS,
        "runs": runs, "medians": summary, "failures": failures, "ratio": ratio,
        "settlements_metric": [x for x in settled.splitlines()
                               if x.startswith("tokenfuse_settlements_total")],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
