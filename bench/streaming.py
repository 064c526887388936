"""Streaming benchmark: per-chunk added latency and chunks/s, Envoy + tokenfuse (per-event
metering, reservation extensions) vs Envoy alone, side by side on the same Envoy.

- latency: 8 concurrent streams, one event every 5 ms each; latency = receive time minus
  the upstream's send stamp in the event. Added latency = tokenfuse p50/p99 minus direct.
- throughput: 32 concurrent streams of 2,000 events sent as fast as possible; chunks/s
  received in total.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.flood import spell

STAMP = re.compile(rb'"ts":(\d+)\}')
_streams = itertools.count()
STREAMS_TIMEOUT_S = 300  # a hung stream fails the bench instead of stalling it


def request_body() -> bytes:
    """A distinct prompt per stream (spelled in letters: the loop guard ignores digits)."""
    words = spell(next(_streams))
    return json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": 1_000_000,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": f"bench {words}"}]}).encode()


async def one_stream(port: int, path: str, events: int, interval_us: int,
                     latencies: list[float] | None) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = request_body()
    writer.write(b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"authorization: Bearer sk-bench-stream\r\nx-events: %d\r\n"
                 b"x-interval-us: %d\r\ncontent-length: %d\r\n\r\n"
                 % (path.encode(), events, interval_us, len(body)) + body)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        head = status + await reader.read(2000)
        writer.close()
        raise RuntimeError(f"bench stream refused on {path}: {head[:600]!r}")
    seen, tail = 0, b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        now = time.monotonic_ns()
        buf = tail + data
        last = 0
        for match in STAMP.finditer(buf):
            seen += 1
            last = match.end()
            if latencies is not None:
                latencies.append((now - int(match.group(1))) / 1e6)
        tail = buf[last:][-200:]
        if b"[DONE]" in buf or b"0\r\n\r\n" in buf[-7:]:
            break
    writer.close()
    return seen


async def latency_run(port: int, path: str) -> list[float]:
    latencies: list[float] = []
    await asyncio.wait_for(asyncio.gather(
        *(one_stream(port, path, 400, 5000, latencies) for _ in range(8))), STREAMS_TIMEOUT_S)
    return latencies


async def throughput_run(port: int, path: str) -> float:
    started = time.perf_counter()
    counts = await asyncio.wait_for(asyncio.gather(
        *(one_stream(port, path, 2000, 0, None) for _ in range(32))), STREAMS_TIMEOUT_S)
    return sum(counts) / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def run(port: int, rounds: int) -> dict[str, dict[str, float]]:
    paths = {"envoy_alone": "/direct/openai/v1/chat/completions",
             "tokenfuse": "/openai/v1/chat/completions"}
    lat: dict[str, list[float]] = {n: [] for n in paths}
    rate: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            lat[name] += asyncio.run(latency_run(port, path))
            rate[name].append(asyncio.run(throughput_run(port, path)))
    return {n: {"p50_ms": pct(lat[n], 50), "p99_ms": pct(lat[n], 99),
                "chunks_per_s": statistics.median(rate[n]), "samples": len(lat[n])}
            for n in paths}
