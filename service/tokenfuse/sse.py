"""Incremental Server-Sent Events parser, robust to arbitrary chunk boundaries.

Bytes are split into lines on CR, LF or CRLF (a CR at a chunk's end is held until the
next byte shows whether LF follows); multi-byte UTF-8 split between chunks is decoded
only once complete, because lines are decoded whole. Comments (`:`) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    event: str  # "message" when no `event:` line was given
    data: str


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Parse one more chunk; return the events it completed."""
        if not chunk:
            return []
        if self._pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._pending_cr = False
        data = self._buffer + chunk
        events: list[SseEvent] = []
        start = 0
        size = len(data)
        while start < size:
            lf = data.find(b"\n", start)
            cr = data.find(b"\r", start, lf if lf >= 0 else size)
            if cr >= 0:
                end, nxt = cr, cr + 1
                if nxt < size and data[nxt : nxt + 1] == b"\n":
                    nxt += 1
                elif nxt == size:
                    self._pending_cr = True
            elif lf >= 0:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(data[start:end].decode("utf-8", "replace"), events)
            start = nxt
        self._buffer = data[start:]
        return events

    def finish(self) -> list[SseEvent]:
        """End of stream: a last unterminated line is processed, a partial event dropped."""
        events: list[SseEvent] = []
        if self._buffer:
            self._line(self._buffer.decode("utf-8", "replace"), events)
            self._buffer = b""
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if not line:
            if self._data:
                events.append(SseEvent(self._event or "message", "\n".join(self._data)))
            self._event = ""
            self._data = []
            return
        if line[0] == ":":
            return
        name, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
