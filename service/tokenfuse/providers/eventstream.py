"""AWS event streams (`application/vnd.amazon.eventstream`): Bedrock's binary stream
framing, the third one beside SSE and NDJSON.

A frame is a 12-byte prelude (total length, headers length, CRC32 of those 8 bytes),
headers, a payload and a CRC32 of everything before it (botocore 1.44.8
`botocore/eventstream.py`; AWS's published test vectors in tests/test_bedrock.py).

Decoding is botocore's `EventStreamBuffer` (both CRCs, length limits, header types), fed
one whole frame at a time: the bytes of a frame in progress are held here and the prelude
is validated as soon as its 12 bytes are in, so a large frame arriving in small pieces costs
linear time (botocore's buffer re-copies everything it holds on each `add_data`).

Each frame becomes an `SseEvent` whose `end` is the absolute offset just past the frame
(the meter forwards whole frames): `event` is `:event-type` (`:exception-type` for an
exception frame, `:error-code` or "error" for an error frame), `data` the payload as
text. A frame that does not decode (a CRC mismatch, an impossible length) breaks the
stream (logged): it and everything after it are no longer framed, and become `:corrupt`
events `{"undecodable_bytes": N}`, forwarded as received (the client's own decoder rejects
them too) and counted by the provider as one output token per byte (`undecodable_tokens`):
what they carried is unknown, and no token is shorter than a byte, so the reservation
keeps covering, and cutting, a stream that broke.

`encode_frame` writes a frame (string headers only): the in-stream cut and the fake.
"""

from __future__ import annotations

import binascii
import json
import logging
import struct
import zlib

from botocore.eventstream import EventStreamBuffer, ParserError

from tokenfuse.providers.sse import SseEvent

PRELUDE_BYTES = 12
#: botocore's limits (`_MAX_HEADERS_LENGTH`, `_MAX_PAYLOAD_LENGTH`).
MAX_HEADERS_BYTES = 128 * 1024
MAX_PAYLOAD_BYTES = 24 * 1024 * 1024
#: The event name of a frame that did not decode (not an AWS name: they have no `:`).
CORRUPT_EVENT = ":corrupt"
#: The data of a `chunk` whose payload is not base64 JSON: garbage to the meter.
CORRUPT_DATA = "{undecodable chunk payload"

log = logging.getLogger("tokenfuse.streaming")
_STRING = 7  # header value type: string (uint16 length + UTF-8)


class EventStreamDecoder:
    """`unwrap_chunks`: InvokeModelWithResponseStream, whose `chunk` frames carry the
    model's own event as `{"bytes": "<base64>"}`; the event is then the decoded JSON's
    `type` and the data that JSON (the model's stream format: Anthropic's for Claude)."""

    def __init__(self, unwrap_chunks: bool = False) -> None:
        self._unwrap = unwrap_chunks
        self._frame = bytearray()  # the bytes of the frame in progress
        self._total = 0  # its total length, once its prelude is validated (else 0)
        self._offset = 0  # absolute offset of self._frame[0]
        self._broken = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Decode one more chunk; return the frames it completed, as events."""
        if self._broken:
            return self._garbage(chunk)
        events: list[SseEvent] = []
        view = memoryview(chunk)
        while view:
            if not self._total:
                take = min(len(view), PRELUDE_BYTES - len(self._frame))
                self._frame += view[:take]
                view = view[take:]
                if len(self._frame) < PRELUDE_BYTES:
                    break
                if not self._prelude_ok():
                    return events + self._garbage(bytes(self._frame) + bytes(view))
                continue
            take = min(len(view), self._total - len(self._frame))
            self._frame += view[:take]
            view = view[take:]
            if len(self._frame) < self._total:
                break
            event = self._decode(bytes(self._frame))
            if event is None:
                return events + self._garbage(bytes(self._frame) + bytes(view))
            events.append(event)
            self._offset += self._total
            self._frame.clear()
            self._total = 0
        return events

    def finish(self) -> list[SseEvent]:
        """End of stream: a partial frame is not an event (the client's SDK drops it
        too); its bytes stay with the meter, forwarded as the stream's rest."""
        return []

    def _prelude_ok(self) -> bool:
        total, headers, crc = struct.unpack("!III", self._frame[:PRELUDE_BYTES])
        if (zlib.crc32(self._frame[:8]) & 0xFFFFFFFF) != crc or headers > MAX_HEADERS_BYTES \
                or not 16 + headers <= total <= 16 + headers + MAX_PAYLOAD_BYTES:
            return False
        self._total = total
        return True

    def _decode(self, frame: bytes) -> SseEvent | None:
        buffer = EventStreamBuffer()
        buffer.add_data(frame)
        try:
            message = next(buffer)
        except (ParserError, StopIteration, struct.error, UnicodeDecodeError, ValueError):
            return None
        headers = message.headers
        kind = headers.get(":message-type", "event")
        payload = message.payload.decode("utf-8", "replace")
        end = self._offset + self._total
        if kind == "exception":
            return SseEvent(str(headers.get(":exception-type", "exception")), payload, end)
        if kind == "error":
            return SseEvent(str(headers.get(":error-code") or "error"),
                            payload or json.dumps({"message": headers.get(":error-message",
                                                                          "")}), end)
        name = str(headers.get(":event-type", "message"))
        if self._unwrap and name == "chunk":
            return _unwrapped(payload, end)
        return SseEvent(name, payload, end)

    def _garbage(self, data: bytes) -> list[SseEvent]:
        """From here on nothing is framed: each piece is one undecodable event."""
        if not self._broken:
            log.warning("undecodable eventstream frame at offset %d: the rest of the "
                        "stream is counted a token per byte", self._offset)
        self._broken = True
        self._frame.clear()
        self._offset += len(data)
        return [SseEvent(CORRUPT_EVENT, json.dumps({"undecodable_bytes": len(data)}),
                         self._offset)] if data else []


def undecodable_tokens(event: str, payload: dict) -> list[str]:
    """What a `:corrupt` event counts as: one token per byte (one one-byte text each)."""
    size = payload.get("undecodable_bytes") if event == CORRUPT_EVENT else None
    return ["\x00"] * size if isinstance(size, int) and size > 0 else []


def _unwrapped(payload: str, end: int) -> SseEvent:
    """The model's event inside a `chunk` frame (garbage when it is not base64 JSON)."""
    try:
        inner = json.loads(payload)["bytes"]
        text = binascii.a2b_base64(inner.encode("ascii"), strict_mode=True).decode("utf-8")
        kind = json.loads(text).get("type")
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        return SseEvent("chunk", CORRUPT_DATA, end)
    return SseEvent(kind if isinstance(kind, str) else "chunk", text, end)


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (struct.pack("!B", len(raw_name)) + raw_name + bytes([_STRING])
            + struct.pack("!H", len(raw_value)) + raw_value)


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One frame with string headers, both CRCs set."""
    raw_headers = b"".join(_header(k, v) for k, v in headers.items())
    prelude = struct.pack("!II", PRELUDE_BYTES + len(raw_headers) + len(payload) + 4,
                          len(raw_headers))
    body = prelude + struct.pack("!I", zlib.crc32(prelude) & 0xFFFFFFFF) + raw_headers + payload
    return body + struct.pack("!I", zlib.crc32(body) & 0xFFFFFFFF)


def event_frame(event_type: str, payload: dict) -> bytes:
    """A JSON event frame (`:message-type: event`)."""
    return encode_frame({":event-type": event_type, ":content-type": "application/json",
                         ":message-type": "event"}, json.dumps(payload).encode())


def exception_frame(exception_type: str, message: str, extra: dict | None = None) -> bytes:
    """An exception frame: botocore raises EventStreamError(<type>, <message>) for a type
    that is a member of the operation's stream union (camelCase)."""
    return encode_frame({":exception-type": exception_type,
                         ":content-type": "application/json", ":message-type": "exception"},
                        json.dumps({"message": message, **(extra or {})}).encode())
