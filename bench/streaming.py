"""Streaming benchmark: per-chunk added latency and chunks/s, Envoy + tokenfuse (per-event
metering, reservation extensions) vs Envoy alone, side by side on the same Envoy.

- latency: 8 concurrent streams, one event every 5 ms each; latency = receive time minus
  the upstream's send stamp in the event. Added latency = tokenfuse p50/p99 minus direct.
- throughput: 32 concurrent streams of 2,000 events sent as fast as possible; chunks/s
  received in total.
- each in the modes of MODES: SSE plain; NDJSON (Ollama's native `/api/chat`: the second
  framing, next to SSE in the same run); binary eventstream frames (Bedrock's
  ConverseStream: the third); Gemini's SSE (CRLF framing, usage on every event); SSE
  with the client asking gzip; SSE with the upstream gzipping anyway.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.flood import spell

STAMP = re.compile(rb'"ts":(\d+)\}')
_streams = itertools.count()
STREAMS_TIMEOUT_S = 300  # a hung stream fails the bench instead of stalling it


def request_body(mode: str = "plain") -> bytes:
    """A distinct prompt per stream (spelled in letters: the loop guard ignores digits)."""
    words = spell(next(_streams))
    if mode == "eventstream":  # Bedrock ConverseStream: the operation streams, no cap
        return json.dumps({"messages": [
            {"role": "user", "content": [{"text": f"bench {words}"}]}]}).encode()
    if mode == "gemini":  # the model is in the path; a non-thinking one (nothing hidden)
        return json.dumps({"contents": [{"role": "user", "parts": [{"text": f"bench {words}"}]}],
                           "generationConfig": {"maxOutputTokens": 16384}}).encode()
    if mode == "ndjson":  # Ollama's native chat: streams by default, no cap (metered)
        return json.dumps({"model": "llama3.2", "messages": [
            {"role": "user", "content": f"bench {words}"}]}).encode()
    return json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": 1_000_000,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": f"bench {words}"}]}).encode()


#: Streaming variants: plain; the client asks for gzip (Envoy compresses toward it); the
#: upstream gzips although asked for identity (the processor decodes and re-encodes).
MODES = {"plain": "", "ndjson": " NDJSON (Ollama /api/chat)",
         "eventstream": " eventstream (Bedrock converse-stream)",
         "gemini": " Gemini SSE (usageMetadata on every event)",
         "client_gzip": " (client asks gzip)", "upstream_gzip": " (upstream gzips anyway)"}
MODE_HEADERS = {"plain": b"", "ndjson": b"", "eventstream": b"", "gemini": b"",
                "client_gzip": b"accept-encoding: gzip\r\n",
                "upstream_gzip": b"accept-encoding: gzip\r\nx-compress: gzip\r\n"}
#: The paths each mode streams on: Envoy alone, tokenfuse.
SSE_PATHS = {"envoy_alone": "/direct/openai/v1/chat/completions",
             "tokenfuse": "/openai/v1/chat/completions"}
NDJSON_PATHS = {"envoy_alone": "/direct/ollama/api/chat", "tokenfuse": "/ollama/api/chat"}
_BEDROCK_MODEL = "amazon.nova-lite-v1%3A0"  # as boto3 encodes it
EVENTSTREAM_PATHS = {
    "envoy_alone": f"/direct/bedrock/model/{_BEDROCK_MODEL}/converse-stream",
    "tokenfuse": f"/bedrock/model/{_BEDROCK_MODEL}/converse-stream"}
_GEMINI_STREAM = "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
GEMINI_PATHS = {"envoy_alone": f"/direct{_GEMINI_STREAM}", "tokenfuse": _GEMINI_STREAM}
#: What the bench's Ollama, Bedrock and Gemini models cost (the operator's price file):
#: gpt-4o-mini's price, so NDJSON and eventstream streams reserve and extend as the SSE
#: ones do.
NDJSON_PRICES = {"models": {name: {
    "provider": name.split("/")[0], "mode": "chat", "input": "0.15", "output": "0.60",
    "max_output_tokens": 16384, "context_window": 131072}
    for name in ("ollama/llama3.2", "bedrock/amazon.nova-lite-v1:0", "gemini/gemini-2.0-flash")}}


def paths_of(mode: str) -> dict[str, str]:
    return {"ndjson": NDJSON_PATHS, "eventstream": EVENTSTREAM_PATHS,
            "gemini": GEMINI_PATHS}.get(mode, SSE_PATHS)


#: Streams answered 503 (per path) in this run.
REFUSED: dict[str, int] = {}


class Dechunker:
    """HTTP/1.1 chunked framing removed from a byte stream, as it arrives."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = b""
        while True:
            line_end = self._buf.find(b"\r\n")
            if line_end < 0:
                return out
            size = int(self._buf[:line_end].split(b";")[0] or b"0", 16)
            if len(self._buf) < line_end + 2 + size + 2:
                return out
            out += self._buf[line_end + 2:line_end + 2 + size]
            self._buf = self._buf[line_end + 2 + size + 2:]


async def one_stream(port: int, path: str, events: int, interval_us: int,
                     latencies: list[float] | None, mode: str = "plain") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = request_body(mode)
    writer.write(b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"authorization: Bearer sk-bench-stream\r\nx-events: %d\r\n%s"
                 b"x-interval-us: %d\r\ncontent-length: %d\r\n\r\n"
                 % (path.encode(), events, MODE_HEADERS[mode], interval_us, len(body)) + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 503 " in head.split(b"\r\n")[0]:
        writer.close()  # fail-closed under overload (state store late): counted, not fatal
        REFUSED[path] = REFUSED.get(path, 0) + 1
        return 0
    if b" 200 " not in head.split(b"\r\n")[0]:
        head += await reader.read(2000)
        writer.close()
        raise RuntimeError(f"bench stream refused on {path}: {head[:600]!r}")
    gzipped = b"content-encoding: gzip" in head.lower()
    if mode in ("client_gzip", "upstream_gzip") and not gzipped:
        writer.close()
        raise RuntimeError(f"bench stream on {path} ({mode}) came back uncompressed")
    dechunk, gunzip = Dechunker(), zlib.decompressobj(31)
    seen, tail = 0, b""
    while True:
        raw = await reader.read(65536)
        if not raw:
            break
        now = time.monotonic_ns()
        data = gunzip.decompress(dechunk.feed(raw)) if gzipped else raw
        buf = tail + data
        last = 0
        for match in STAMP.finditer(buf):
            seen += 1
            last = match.end()
            if latencies is not None:
                latencies.append((now - int(match.group(1))) / 1e6)
        tail = buf[last:][-200:]
        if b"[DONE]" in buf or b'"done":true' in buf or raw.endswith(b"0\r\n\r\n"):
            break
    writer.close()
    return seen


async def latency_run(port: int, path: str, mode: str) -> list[float]:
    latencies: list[float] = []
    await asyncio.wait_for(asyncio.gather(
        *(one_stream(port, path, 400, 5000, latencies, mode) for _ in range(8))),
        STREAMS_TIMEOUT_S)
    return latencies


async def throughput_run(port: int, path: str, mode: str) -> float:
    started = time.perf_counter()
    counts = await asyncio.wait_for(asyncio.gather(
        *(one_stream(port, path, 2000, 0, None, mode) for _ in range(32))),
        STREAMS_TIMEOUT_S)
    return sum(counts) / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def run(port: int, rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per mode, per path: p50/p99 per-chunk latency and chunks/s (rounds interleaved)."""
    paths = SSE_PATHS  # the names; NDJSON streams on its own paths under the same names
    lat = {m: {n: [] for n in paths} for m in MODES}
    rate: dict[str, dict[str, list[float]]] = {m: {n: [] for n in paths} for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            for name, path in paths_of(mode).items():
                lat[mode][name] += asyncio.run(latency_run(port, path, mode))
                rate[mode][name].append(asyncio.run(throughput_run(port, path, mode)))
    results: dict[str, dict[str, dict[str, float]]] = {
        m: {n: {"p50_ms": pct(lat[m][n], 50), "p99_ms": pct(lat[m][n], 99),
                "chunks_per_s": statistics.median(rate[m][n]),
                "samples": len(lat[m][n])} for n in paths}
        for m in MODES}
    for name in paths:
        results["plain"][name]["refused_streams"] = sum(
            REFUSED.get(paths_of(mode)[name], 0) for mode in ("plain", "ndjson",
                                                              "eventstream", "gemini"))
    return results
