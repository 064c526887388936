"""Incremental decoder of a streamed JSON array, robust to arbitrary chunk boundaries:
Google's `streamGenerateContent` without `alt=sse` answers `[{…}` LF `,` CRLF `{…}` LF `]`
(one element per chunk, sent as it is generated).

Events (`SseEvent`, so the stream meter handles every framing alike):
- the opening `[` is an event of its own (no data), so it is forwarded before anything a
  cut may stop;
- each element is an event whose data is the element's JSON text and whose `end` is the
  offset just past the separator that follows it (`,` or the closing `]`): forwarded bytes
  therefore always end with `[` or `,`, where one more element and `]` make valid JSON;
- the closing `]` also yields `end_event` (no data): the array is complete.
Only strings, escapes and nesting are tracked (the meter parses each element); bytes after
the closing `]` are ignored. Not an array (an error document): no events.
"""

from __future__ import annotations

import re

from tokenfuse.providers.sse import SseEvent

#: The bytes that change the scanner's state outside a string, and inside one.
_STRUCTURE = re.compile(rb'[\[\]{},"]')
_IN_STRING = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"


class JsonArrayDecoder:
    def __init__(self, end_event: str) -> None:
        self._end_event = end_event
        self._offset = 0  # absolute stream offset of the next byte fed
        self._depth = 0  # nesting: 1 inside the array, more inside an element
        self._in_string = False
        self._escaped = False  # the previous byte in a string was a backslash
        self._element = bytearray()  # the current element's bytes so far
        self._state = "start"  # start, array, done, broken

    def feed(self, chunk: bytes) -> list[SseEvent]:
        events: list[SseEvent] = []
        base, self._offset = self._offset, self._offset + len(chunk)
        i, size = 0, len(chunk)
        while i < size and self._state in ("start", "array"):
            if self._state == "start":
                stripped = chunk[i:].lstrip(_WHITESPACE)
                if not stripped:
                    return events
                i = size - len(stripped)
                if stripped[:1] != b"[":
                    self._state = "broken"
                    return events
                self._state, self._depth, i = "array", 1, i + 1
                events.append(SseEvent("message", "", base + i))
                continue
            if self._in_string:
                i = self._scan_string(chunk, i)
                continue
            found = _STRUCTURE.search(chunk, i)
            if found is None:
                self._element += chunk[i:]
                break
            j = found.start()
            byte = chunk[j:j + 1]
            if byte == b'"':
                self._element += chunk[i:j + 1]
                self._in_string, i = True, j + 1
            elif byte in (b"{", b"["):
                self._element += chunk[i:j + 1]
                self._depth, i = self._depth + 1, j + 1
            elif self._depth > 1:  # `}`, `]` or `,` inside an element
                self._element += chunk[i:j + 1]
                if byte != b",":
                    self._depth -= 1
                i = j + 1
            else:  # `,` or `]` of the array itself: the element is complete
                self._element += chunk[i:j]
                self._emit(base + j + 1, events)
                i = j + 1
                if byte == b"]":
                    self._state = "done"
                    events.append(SseEvent(self._end_event, "", base + i))
                elif byte == b"}":  # unbalanced: not a JSON array after all
                    self._state = "broken"
        return events

    def _scan_string(self, chunk: bytes, i: int) -> int:
        """Consume string bytes from `i`; the index after them."""
        if self._escaped:
            self._element += chunk[i:i + 1]
            self._escaped = False
            return i + 1
        found = _IN_STRING.search(chunk, i)
        if found is None:
            self._element += chunk[i:]
            return len(chunk)
        j = found.start()
        self._element += chunk[i:j + 1]
        if chunk[j:j + 1] == b"\\":
            self._escaped = True
        else:
            self._in_string = False
        return j + 1

    def _emit(self, end: int, events: list[SseEvent]) -> None:
        text = bytes(self._element).strip(_WHITESPACE)
        self._element.clear()
        if text:
            events.append(SseEvent("message", text.decode("utf-8", "replace"), end))

    def finish(self) -> list[SseEvent]:
        """End of stream: an array that was not closed yields nothing more (unfinished)."""
        return []
