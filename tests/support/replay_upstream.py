"""An upstream that answers with a recorded real response, byte for byte.

The fixtures are in ``tests/fixtures/recorded/`` (``<name>.body``: the response body exactly
as the provider sent it, compressed if it was; ``<name>.json``: where it was recorded and
the headers that matter). A request picks its fixture with ``x-replay: <name>``; whatever
body it carries is accepted and kept for the test to inspect.

The response carries the recorded status, ``content-type`` and ``content-encoding`` (a
recorded gzip answer is replayed gzip although tokenfuse asks for identity: real providers
compressed these, so they may), and the other recorded headers (Bedrock's
``x-amzn-errortype`` and token-count headers, Cohere's ``num_tokens``). It is written in the
provider's own pieces: a recorded gzip stream is cut at its ``Z_SYNC_FLUSH`` markers
(Anthropic flushes every event), an identity stream per event (after its blank line, ``\n\n``
or Google's ``\r\n\r\n``, kept as recorded), a binary AWS eventstream per frame (each
frame's length is its first four bytes). ``x-replay-gzip: 1`` gzips an identity recording,
flushed per event, for an upstream that compresses what it was not asked to;
``x-replay-delay-ms`` waits between pieces so that a client going away is seen before the
end. Like the fake provider, it never imports ``tokenfuse``.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.background_server import BackgroundServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "recorded"
SYNC_FLUSH = b"\x00\x00\xff\xff"
EVENTSTREAM = "application/vnd.amazon.eventstream"
#: One SSE event and the blank line that ends it, as recorded (LF or CRLF).
SSE_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n)|.+", re.S)
#: Recorded response headers the replay leaves out (hop-by-hop; aiohttp sets its own).
NOT_REPLAYED = {"content-length", "transfer-encoding", "connection", "date",
                "content-encoding-recorded"}


@dataclass(frozen=True)
class Recording:
    """One recorded response and what is known about it."""

    name: str
    meta: dict[str, Any]
    body: bytes  # exactly as recorded

    @property
    def coding(self) -> str:
        return str(self.meta["response"]["headers"].get("content-encoding", ""))

    @property
    def content_type(self) -> str:
        return str(self.meta["response"]["headers"]["content-type"])

    @property
    def is_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream") or self.is_eventstream

    @property
    def is_eventstream(self) -> bool:
        """A binary AWS eventstream (Bedrock's ConverseStream, InvokeModelWithResponseStream)."""
        return self.content_type.startswith(EVENTSTREAM)

    @property
    def decoded(self) -> bytes:
        if self.coding == "gzip":
            return zlib.decompress(self.body, 16 + zlib.MAX_WBITS)
        if self.coding:
            raise ValueError(f"{self.name}: unsupported recorded coding {self.coding}")
        return self.body

    def pieces(self, gzip_it: bool = False) -> list[bytes]:
        """The body in the pieces the provider flushed (as near as the recording tells)."""
        if self.coding == "gzip":
            parts = self.body.split(SYNC_FLUSH)
            return [p + SYNC_FLUSH for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        if self.is_eventstream:
            events = frames(self.body)
        elif self.is_stream:
            events = SSE_EVENT.findall(self.body)
        else:
            events = [self.body]
        if not gzip_it:
            return events
        gz = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        out = [gz.compress(e) + gz.flush(zlib.Z_SYNC_FLUSH) for e in events]
        out[-1] += gz.flush(zlib.Z_FINISH)
        return out


def frames(raw: bytes) -> list[bytes]:
    """An eventstream cut into its frames (prelude: total length, headers length, CRC)."""
    out, at = [], 0
    while at < len(raw):
        (total,) = struct.unpack_from("!I", raw, at)
        out.append(raw[at:at + total])
        at += total
    return out


def load(name: str) -> Recording:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return Recording(name, meta, (FIXTURES / meta["response"]["body_file"]).read_bytes())


def names() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json"))


@dataclass
class Replayed:
    """One request the upstream answered."""

    fixture: str
    path: str
    headers: dict[str, str]
    body: bytes
    pieces_total: int = 0
    pieces_sent: int = 0
    completed: bool = False  # every piece written and the response ended
    disconnected: bool = False  # the peer went away before the end

    def json(self) -> Any:
        return json.loads(self.body)


class ReplayUpstream(BackgroundServer):
    """The replay server, in a background thread (like the fake provider)."""

    thread_name = "replay-upstream"

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.requests: list[Replayed] = []

    def start(self) -> ReplayUpstream:  # type: ignore[override]
        super().start()
        return self

    def for_fixture(self, name: str) -> list[Replayed]:
        return [r for r in list(self.requests) if r.fixture == name]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.headers.get("x-replay", "")
        body = await request.read()
        if name not in names():
            return web.json_response({"error": {"message": f"no fixture {name!r}"}},
                                     status=404)
        recording = load(name)
        gzip_it = request.headers.get("x-replay-gzip") == "1" and not recording.coding
        pieces = recording.pieces(gzip_it)
        seen = Replayed(name, request.path_qs, dict(request.headers), body, len(pieces))
        self.requests.append(seen)
        delay = int(request.headers.get("x-replay-delay-ms", "0")) / 1000
        response = web.StreamResponse(status=int(recording.meta["response"]["status"]))
        for header, value in recording.meta["response"]["headers"].items():
            if header not in NOT_REPLAYED and header != "content-encoding":
                response.headers[header] = value
        response.headers["content-type"] = recording.content_type
        if recording.coding or gzip_it:
            response.headers["content-encoding"] = recording.coding or "gzip"
        response.headers["vary"] = "Accept-Encoding"
        try:
            await response.prepare(request)
            for piece in pieces:
                await response.write(piece)
                seen.pieces_sent += 1
                if delay:
                    await asyncio.sleep(delay)
            await response.write_eof()
            seen.completed = True
        except ConnectionError:
            seen.disconnected = True
        except asyncio.CancelledError:
            seen.disconnected = True
            raise
        return response
