"""The SSE parser gives the same events however the byte stream is split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfuse.providers.sse import SseEvent, SseParser

OPENAI_STREAM = (
    'data: {"choices":[{"delta":{"content":"caf\u00e9 \u65e5\u672c"}}]}\n\n'
    ": keep-alive\n\n"
    'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n'
    "data: [DONE]\n\n"
).encode()
ANTHROPIC_STREAM = (
    "event: message_start\r\n"
    'data: {"type":"message_start","message":{"usage":{"input_tokens":7}}}\r\n\r\n'
    "event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n"
    "event: content_block_delta\r\n"
    'data: {"type":"content_block_delta","delta":{"text":"\u4e2d\u6587 \u00e9"}}\r\n\r\n'
    "event: message_delta\r\n"
    'data: {"type":"message_delta","usage":{"output_tokens":5}}\r\n\r\n'
).encode()


def parse(chunks: list[bytes]) -> list[SseEvent]:
    parser = SseParser()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.finish())
    return events


def test_whole_stream() -> None:
    events = parse([OPENAI_STREAM])
    assert [e.data for e in events][-1] == "[DONE]"
    assert len(events) == 3  # the keep-alive comment is not an event
    anthropic = parse([ANTHROPIC_STREAM])
    assert [e.event for e in anthropic] == [
        "message_start", "ping", "content_block_delta", "message_delta"]
    assert "\u4e2d\u6587" in anthropic[2].data


def test_every_single_split_point() -> None:
    for stream in (OPENAI_STREAM, ANTHROPIC_STREAM):
        whole = parse([stream])
        for cut in range(len(stream) + 1):
            assert parse([stream[:cut], stream[cut:]]) == whole, cut


@settings(max_examples=300)
@given(st.data())
def test_arbitrary_chunking(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from([OPENAI_STREAM, ANTHROPIC_STREAM]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert parse(chunks) == parse([stream])


def test_multiline_data_and_unterminated_tail() -> None:
    events = parse([b"data: a\ndata: b\n\n", b"data: tail"])
    assert events == [SseEvent("message", "a\nb", 17)]  # an unterminated event is dropped


def test_event_offsets_delimit_the_exact_bytes() -> None:
    for stream in (OPENAI_STREAM, ANTHROPIC_STREAM):
        events = parse([stream])
        starts = [0] + [e.end for e in events[:-1]]
        for start, event in zip(starts, events, strict=True):
            assert parse([stream[start : event.end]]) == [
                SseEvent(event.event, event.data, event.end - start)]
        assert events[-1].end == len(stream)
