"""Incremental newline-delimited JSON (NDJSON) decoder, robust to arbitrary chunk
boundaries: Ollama's native streaming framing, the second one beside SSE.

One JSON value per line (github.com/ndjson/ndjson-spec): lines end with LF, a CR before
it is part of the terminator (CRLF), blank lines are skipped. Lines are decoded whole, so
multi-byte UTF-8 split between chunks is never decoded in halves. Each line becomes an
`SseEvent` (event "message", data the line without its terminator and surrounding
whitespace, `end` the absolute offset just past its LF), so the stream meter handles both
framings alike. Only each new chunk is searched for the LF: a long line arriving in many
small chunks costs linear time.
"""

from __future__ import annotations

from tokenfuse.providers.sse import SseEvent

#: JSON's insignificant whitespace (RFC 8259 section 2), the CR of a CRLF included.
_WHITESPACE = b" \t\r\n"


class NdjsonDecoder:
    def __init__(self) -> None:
        self._partial = bytearray()  # the current line's bytes so far (no LF yet)
        self._offset = 0  # absolute stream offset of the next byte fed

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Decode one more chunk; return the lines it completed, as events."""
        base, self._offset = self._offset, self._offset + len(chunk)
        lf = chunk.find(b"\n")
        if lf < 0:
            self._partial += chunk
            return []
        events: list[SseEvent] = []
        if self._partial:
            self._partial += chunk[:lf]
            _line(bytes(self._partial), base + lf + 1, events)
            self._partial.clear()
        else:
            _line(chunk[:lf], base + lf + 1, events)
        start = lf + 1
        while (lf := chunk.find(b"\n", start)) >= 0:
            _line(chunk[start:lf], base + lf + 1, events)
            start = lf + 1
        self._partial += chunk[start:]
        return events

    def finish(self) -> list[SseEvent]:
        """End of stream: a last line without its LF is an event all the same."""
        events: list[SseEvent] = []
        if self._partial:
            _line(bytes(self._partial), self._offset, events)
            self._partial.clear()
        return events


def _line(raw: bytes, end: int, events: list[SseEvent]) -> None:
    line = raw.strip(_WHITESPACE)
    if line:
        events.append(SseEvent("message", line.decode("utf-8", "replace"), end))
