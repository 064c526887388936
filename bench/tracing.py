"""What OpenTelemetry tracing costs per request (docs/design.md, "Traces").

`bench_tracing(workdir)` (for bench/run.py, or `python bench/tracing.py`):

1. hooks in process: one request's whole span lifecycle as the processor runs it (begin,
   traceparent out, reservation event, forwarded, first byte, answer facts, settlement
   event, end with the exchange's attributes) with the real SDK, in µs per request; the
   OTLP encoding of those spans (what the batch exporter's thread spends, in the same
   process); the same for a client whose traceparent says "not sampled"; and the
   tracing-off cost: the hooks' `ex.trace is not None` tests (10 per request).
2. through Envoy: the same Envoy + processor + Redis on the canned upstream of
   bench/load.py, with tracing off and on (exporting to the local receiver), wrk at
   saturation, rounds alternating so drift hits both: req/s, p50, p99.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import UpstreamEnvoy, wrk  # noqa: E402
from memory import tree_rss  # noqa: E402

from tests.support.harness import Stack  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver  # noqa: E402
from tokenfuse.config import TracingSettings  # noqa: E402
from tokenfuse.extproc.exchange import Exchange  # noqa: E402
from tokenfuse.pricing import TokenUsage  # noqa: E402
from tokenfuse.providers import PROVIDERS, Call  # noqa: E402
from tokenfuse.state.results import Reservation  # noqa: E402
from tokenfuse.tracing import Tracing  # noqa: E402

KEY = "sk-bench-tracing"
PATH = "/openai/v1/chat/completions"
HOOKS_PER_REQUEST = 10  # `ex.trace is not None` tests on a settled non-streamed call


def _exchange() -> Exchange:
    ex = Exchange(provider_name="openai", provider=PROVIDERS["openai"],
                  caller="0123456789abcdef" * 4, status=200, reserved_nano=12_000)
    ex.call = Call(endpoint="chat.completions", model="gpt-4o-mini", stream=False,
                   max_output_tokens=16)
    ex.usage = TokenUsage(input=12, output=1)
    return ex


def _one_request(tracing: Tracing, headers: dict[str, str], provider: Any,
                 payload: dict[str, Any], granted: Reservation) -> None:
    """Every tracing hook one request's exchange runs, in order."""
    ex = _exchange()
    trace = ex.trace = tracing.begin(headers)
    trace.outgoing()
    trace.decided(time.time_ns(), granted)
    trace.forwarded()
    trace.first_byte()
    trace.answered(*provider.response_facts(payload))
    trace.settled(time.time_ns(), "usage", 7_800, True)
    trace.end(ex)


def hooks_us(requests: int = 2_000, repeats: int = 5) -> dict[str, float]:
    """µs per request, best of `repeats` batches (this machine is shared: the best batch
    is the least disturbed): the span lifecycle on the request path (spans kept in
    memory), their OTLP encoding (what the batch exporter's thread then spends, in the
    same process), and the tracing-off path (the hooks' tests, a bare loop subtracted)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(endpoint="http://127.0.0.1:4318/v1/traces"),
                      processor=SimpleSpanProcessor(memory))
    headers = {":path": PATH, "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}
    payload = {"model": "gpt-4o-mini-2024-07-18", "choices": [{"finish_reason": "stop"}]}
    provider = PROVIDERS["openai"]
    granted = Reservation(12_000, ())
    on, encode = [], []
    for _ in range(repeats):
        memory.clear()
        started = time.perf_counter()
        for _ in range(requests):
            _one_request(tracing, headers, provider, payload, granted)
        on.append((time.perf_counter() - started) / requests * 1e6)
        spans = memory.get_finished_spans()
        started = time.perf_counter()
        encode_spans(spans).SerializeToString()
        encode.append((time.perf_counter() - started) / requests * 1e6)
    unsampled = []  # the client's traceparent says "not sampled": a non-recording span
    quiet = {":path": PATH, "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-00"}
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(requests):
            _one_request(tracing, quiet, provider, payload, granted)
        unsampled.append((time.perf_counter() - started) / requests * 1e6)
    tracing.shutdown()
    ex, off = _exchange(), []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(requests * HOOKS_PER_REQUEST):
            if ex.trace is not None:
                raise AssertionError
        checked = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(requests * HOOKS_PER_REQUEST):
            pass
        off.append(max(0.0, checked - (time.perf_counter() - started)) / requests * 1e6)
    return {"on_hooks_us_per_request": min(on), "on_export_encode_us_per_request": min(encode),
            "unsampled_us_per_request": min(unsampled),
            "off_us_per_request": min(off), "spans_per_request": len(spans) / requests,
            "requests": requests}


def through_envoy(workdir: Path, duration_s: int = 8, rounds: int = 3,
                  connections: int = 32) -> dict[str, dict[str, float]]:
    """wrk at saturation, tracing off vs on, alternating rounds; medians."""
    upstream = UpstreamEnvoy(workdir)
    upstream.start()
    receiver = OtlpReceiver()
    receiver.start()
    env = {"TOKENFUSE_LOG_LEVEL": "WARNING", "LOOP_GUARD_MAX_HITS": "0",
           "LOOP_GUARD_NEAR_DUPLICATE": "0"}
    stacks = {"off": Stack(f"http://127.0.0.1:{upstream.port}", env),
              "on": Stack(f"http://127.0.0.1:{upstream.port}",
                          {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
    rss_mb: dict[str, float] = {}
    try:
        for name, stack in stacks.items():
            stack.start()
            stack.cli("budget", "set", "--key", KEY, "--daily", "1000000")
            wrk(stack.envoy.base_url + PATH, workdir, 1, connections, KEY)  # warm-up
            assert stack.processor.proc is not None
            rss_mb[name] = tree_rss(stack.processor.proc.pid) / (1024 * 1024)
        for _ in range(rounds):
            for name, stack in stacks.items():
                runs[name].append(wrk(stack.envoy.base_url + PATH, workdir, duration_s,
                                      connections, KEY))
        stacks["on"].processor.stop()  # flushes what is queued
        exported = len(receiver.spans)
    finally:
        for stack in stacks.values():
            stack.cleanup()
        receiver.stop()
        upstream.stop()
    out: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        out[name] = {field: statistics.median(r[field] for r in results)
                     for field in ("rps", "p50_ms", "p99_ms")}
        out[name]["failures"] = sum(r["errors"] + r["non2xx"] for r in results)
        out[name]["requests"] = sum(r["requests"] for r in results)
        out[name]["processor_rss_mb_after_warmup"] = rss_mb[name]
    out["on"]["spans_exported"] = exported
    return out


def bench_tracing(workdir: Path, duration_s: int = 8, rounds: int = 3,
                  connections: int = 32) -> dict[str, Any]:
    return {"hooks": hooks_us(),
            "envoy": through_envoy(workdir, duration_s, rounds, connections)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="tf-bench-tracing-") as tmp:
        print(json.dumps(bench_tracing(Path(tmp)), indent=2))
