"""A minimal, fast streaming upstream for the streaming benchmark (not a test fake).

Answers every POST with an OpenAI chat-completion stream (SSE) of `x-events` one-token
events, or, on a path of Ollama's native API (`.../api/chat`), with the same as Ollama's
NDJSON lines, or on Bedrock's `.../converse-stream` as binary eventstream frames
(contentBlockDelta, then messageStop and metadata), or on Gemini's
`:streamGenerateContent` as Gemini's SSE (CRLF framing, the usage so far on every event);
each event its own HTTP chunk,
`x-interval-us` apart (0 = as fast as possible). Every event carries its send time
(`"ts"`, CLOCK_MONOTONIC ns, system-wide) so the client can measure per-chunk latency.
Runs in its own process: `python bench/sse_upstream.py PORT`.
"""

from __future__ import annotations

import asyncio
import sys
import time
import zlib

from tokenfuse.providers.eventstream import encode_frame

EVENT = (b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
         b'"choices":[{"index":0,"delta":{"content":" tok"}}],"ts":%d}\n\n')
USAGE = (b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
         b'"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":%d,'
         b'"total_tokens":%d}}\n\ndata: [DONE]\n\n')
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
# Ollama's /api/chat stream (server/routes.go streamResponse: one JSON object per line).
NDJSON_EVENT = (b'{"model":"llama3.2","created_at":"2026-12-01T00:00:00Z","message":'
                b'{"role":"assistant","content":" tok"},"done":false,"ts":%d}\n')
NDJSON_LAST = (b'{"model":"llama3.2","created_at":"2026-12-01T00:00:00Z","message":'
               b'{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
               b'"prompt_eval_count":10,"eval_count":%d}\n')
NDJSON_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
               b"transfer-encoding: chunked\r\n\r\n")


# Bedrock's ConverseStream (application/vnd.amazon.eventstream frames).
ES_HEADERS = {":event-type": "contentBlockDelta", ":content-type": "application/json",
              ":message-type": "event"}
ES_DELTA = b'{"contentBlockIndex":0,"delta":{"text":" tok"},"ts":%d}'
ES_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.amazon.eventstream\r\n"
           b"transfer-encoding: chunked\r\n\r\n")


def es_last(events: int) -> bytes:
    usage = (b'{"usage":{"inputTokens":10,"outputTokens":%d,"totalTokens":%d},'
             b'"metrics":{"latencyMs":1}}' % (events, events + 10))
    return (encode_frame({**ES_HEADERS, ":event-type": "messageStop"},
                         b'{"stopReason":"end_turn"}')
            + encode_frame({**ES_HEADERS, ":event-type": "metadata"}, usage))


# Gemini (alt=sse): no event names, CRLF framing, cumulative usageMetadata on every event
# (recorded streams: docs/providers.md, Google).
GEMINI_EVENT = (b'data: {"candidates":[{"content":{"parts":[{"text":" tok"}],"role":"model"},'
                b'"index":0}],"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":%d,'
                b'"totalTokenCount":%d},"modelVersion":"gemini-2.0-flash","ts":%d}\r\n\r\n')
GEMINI_LAST = (b'data: {"candidates":[{"content":{"parts":[{"text":""}],"role":"model"},'
               b'"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":10,'
               b'"candidatesTokenCount":%d,"totalTokenCount":%d},'
               b'"modelVersion":"gemini-2.0-flash"}\r\n\r\n')

HEAD_GZIP = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
             b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            if length:
                await reader.readexactly(length)
            events = int(headers.get(b"x-events", b"100"))
            interval = int(headers.get(b"x-interval-us", b"0")) / 1e6
            # `x-compress: gzip`: gzip the stream, flushed per event, even though tokenfuse
            # asks for identity (an upstream that compresses anyway).
            gz = (zlib.compressobj(6, zlib.DEFLATED, 31)
                  if headers.get(b"x-compress") == b"gzip" else None)

            def encode(data: bytes, final: bool = False, gz=gz) -> bytes:
                if gz is None:
                    return data
                return gz.compress(data) + gz.flush(zlib.Z_FINISH if final
                                                    else zlib.Z_SYNC_FLUSH)

            request_line = head.split(b"\r\n", 1)[0]
            ndjson = b"/api/" in request_line
            frames = b"/converse-stream" in request_line
            gemini = b":streamGenerateContent" in request_line
            event = NDJSON_EVENT if ndjson else EVENT
            last = NDJSON_LAST % events if ndjson else es_last(events) if frames \
                else GEMINI_LAST % (events, events + 10) if gemini \
                else USAGE % (events, events + 10)
            writer.write(NDJSON_HEAD if ndjson else ES_HEAD if frames
                         else HEAD_GZIP if gz is not None else HEAD)
            for n in range(1, events + 1):
                if frames:
                    piece = encode_frame(ES_HEADERS, ES_DELTA % time.monotonic_ns())
                elif gemini:
                    piece = GEMINI_EVENT % (n, n + 10, time.monotonic_ns())
                else:
                    piece = event % time.monotonic_ns()
                writer.write(_chunk(encode(piece)))
                await writer.drain()
                if interval:
                    await asyncio.sleep(interval)
            writer.write(_chunk(encode(last, True)) + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
