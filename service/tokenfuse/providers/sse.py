"""Incremental Server-Sent Events parser, robust to arbitrary chunk boundaries.

Bytes are split into lines on CR, LF or CRLF; a CR at the end of the data is held until
the next byte shows whether an LF follows. Lines are decoded whole, so multi-byte UTF-8
split between chunks is never decoded in halves. Comments (`:` lines) are skipped.

Every event carries `end`: the absolute stream offset just past its terminating blank
line, so a caller can forward, hold back or drop the exact bytes of each event.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    event: str  # "message" when no `event:` line was given
    data: str
    end: int = 0


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0  # absolute stream offset of self._buffer[0]
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Parse one more chunk; return the events it completed."""
        data = self._buffer + chunk if self._buffer else chunk
        events: list[SseEvent] = []
        start = 0
        size = len(data)
        while start < size:
            lf = data.find(b"\n", start)
            cr = data.find(b"\r", start, lf if lf >= 0 else size)
            if cr >= 0:
                if cr + 1 == size:
                    break  # CR at the end: wait for the next byte (LF or not)
                end, nxt = cr, cr + 2 if data[cr + 1 : cr + 2] == b"\n" else cr + 1
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(data[start:end], self._offset + nxt, events)
            start = nxt
        self._buffer = data[start:]
        self._offset += start
        return events

    def finish(self) -> list[SseEvent]:
        """End of stream: a last unterminated line is processed, a partial event dropped."""
        events: list[SseEvent] = []
        if self._buffer:
            line = self._buffer.rstrip(b"\r")
            self._offset += len(self._buffer)
            self._buffer = b""
            self._line(line, self._offset, events)
        return events

    def _line(self, raw: bytes, end: int, events: list[SseEvent]) -> None:
        if not raw:
            if self._data:
                events.append(SseEvent(self._event or "message", "\n".join(self._data), end))
            self._event = ""
            self._data = []
            return
        if raw[:1] == b":":
            return
        line = raw.decode("utf-8", "replace")
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
