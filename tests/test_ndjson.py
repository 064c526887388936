"""The NDJSON decoder gives the same events however the byte stream is split."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfuse.providers.ndjson import NdjsonDecoder
from tokenfuse.providers.sse import SseEvent

# Shaped like Ollama's /api/chat stream (server/routes.go streamResponse: json.Marshal of
# each value plus "\n"), with multi-byte UTF-8, a CRLF line and a blank line.
CHAT_STREAM = (
    '{"model":"llama3.2","message":{"role":"assistant","content":"caf\u00e9 \u65e5\u672c"},'
    '"done":false}\n'
    '{"model":"llama3.2","message":{"role":"assistant","thinking":"\U0001f914 hmm"},'
    '"done":false}\r\n'
    "\n"
    '{"model":"llama3.2","message":{"role":"assistant","content":""},"done":true,'
    '"done_reason":"stop","prompt_eval_count":26,"eval_count":3}\n'
).encode()
# A last line without its LF (a server that ends the body after the final object).
GENERATE_STREAM = (
    '{"response":"\u4e2d\u6587","done":false}\n'
    '  {"response":" \u00e9","done":false}  \n'
    '{"response":"","done":true,"prompt_eval_count":4,"eval_count":2}'
).encode()


def decode(chunks: list[bytes]) -> list[SseEvent]:
    decoder = NdjsonDecoder()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.finish())
    return events


def test_whole_stream() -> None:
    events = decode([CHAT_STREAM])
    assert len(events) == 3  # the blank line is no event
    assert all(e.event == "message" for e in events)
    assert json.loads(events[0].data)["message"]["content"] == "caf\u00e9 \u65e5\u672c"
    assert json.loads(events[1].data)["message"]["thinking"] == "\U0001f914 hmm"
    assert json.loads(events[2].data)["eval_count"] == 3
    # `end` is just past each line's LF: the bytes of each event are exactly delimited.
    first_lf = CHAT_STREAM.index(b"\n") + 1
    assert events[0].end == first_lf
    assert events[1].end == CHAT_STREAM.index(b"\r\n", first_lf) + 2
    assert events[2].end == len(CHAT_STREAM)


def test_last_line_without_newline() -> None:
    decoder = NdjsonDecoder()
    fed = decoder.feed(GENERATE_STREAM)
    assert [json.loads(e.data)["response"] for e in fed] == ["\u4e2d\u6587", " \u00e9"]
    last = decoder.finish()
    assert len(last) == 1 and json.loads(last[0].data)["done"] is True
    assert last[0].end == len(GENERATE_STREAM)
    assert decoder.finish() == []  # finished once


def test_every_single_split_point() -> None:
    for stream in (CHAT_STREAM, GENERATE_STREAM):
        whole = decode([stream])
        for cut in range(len(stream) + 1):
            assert decode([stream[:cut], stream[cut:]]) == whole, cut


def test_byte_by_byte() -> None:
    for stream in (CHAT_STREAM, GENERATE_STREAM):
        assert decode([stream[i:i + 1] for i in range(len(stream))]) == decode([stream])


def test_invalid_utf8_is_replaced_not_raised() -> None:
    events = decode([b'{"response":"\xff"}\n'])
    assert events[0].data == '{"response":"\ufffd"}'


@settings(max_examples=300)
@given(st.data())
def test_arbitrary_chunking(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from([CHAT_STREAM, GENERATE_STREAM]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode(chunks) == decode([stream])


@settings(max_examples=200)
@given(st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3),
                min_size=1, max_size=6),
       st.sampled_from([b"\n", b"\r\n"]), st.data())
def test_any_objects_any_terminator(objects: list[dict[str, str]], newline: bytes,
                                    data: st.DataObject) -> None:
    """Any JSON objects (any Unicode, ensure_ascii off) come back whole and in order."""
    stream = b"".join(json.dumps(o, ensure_ascii=False).encode() + newline for o in objects)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    events = decode(chunks)
    assert [json.loads(e.data) for e in events] == objects
    assert events[-1].end == len(stream)
