"""Real provider streams (raw bytes from the fake provider's wire format) metered under
every possible split: same events, same token counts, same usage as the unsplit stream."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fake_provider import FakeProvider
from tokenfuse.metering.stream import MeteredEvent, StreamMeter


def _raw_stream(fake: FakeProvider, provider: str, crlf: bool, garbage: bool = False) -> bytes:
    headers = {"authorization": "Bearer sk-meter", "anthropic-version": "2023-06-01",
               "accept-encoding": "identity"}  # the wire bytes the processor meets
    if crlf:
        headers["x-fake-crlf"] = "1"
    if garbage:
        headers["x-fake-garbage"] = "1"
    if provider == "openai":
        path, body = "/v1/chat/completions", {
            "model": "gpt-4o-mini", "stream": True, "max_tokens": 30,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "meter me"}]}
    else:
        path, body = "/v1/messages", {
            "model": "claude-haiku-4-5", "stream": True, "max_tokens": 30,
            "messages": [{"role": "user", "content": "meter me"}]}
    with httpx.stream("POST", fake.base_url + path, json=body, headers=headers) as response:
        assert response.status_code == 200
        return b"".join(response.iter_raw())


@pytest.fixture(scope="module")
def streams(fake: FakeProvider) -> dict[str, bytes]:
    return {f"{p}{'-crlf' if crlf else ''}": _raw_stream(fake, p, crlf)
            for p in ("openai", "anthropic") for crlf in (False, True)}


def meter(provider: str, chunks: list[bytes]) -> tuple[list[MeteredEvent], bytes]:
    m = StreamMeter(provider, hide_usage_chunk=True)
    events: list[MeteredEvent] = []
    forwarded = bytearray()
    for i, chunk in enumerate(chunks):
        for event in m.feed(chunk, end_of_stream=i == len(chunks) - 1):
            events.append(event)
            if event.hidden:
                forwarded += m.take(event.start)
                m.drop(event.end)
        forwarded += m.take(m.complete_end)
    forwarded += m.rest()
    return events, bytes(forwarded)


def test_whole_streams_count_what_the_provider_reports(streams: dict[str, bytes]) -> None:
    for name, raw in streams.items():
        provider = name.split("-")[0]
        events, _ = meter(provider, [raw])
        assert sum(e.output_tokens for e in events) == 30, name  # 30 one-token pieces
        usages = [e.usage for e in events if e.usage is not None]
        assert usages and max(u.output for u in usages) == 30, name


def test_only_the_last_event_is_final(streams: dict[str, bytes]) -> None:
    """[DONE] / message_stop: the processor settles before forwarding it."""
    for name, raw in streams.items():
        events, _ = meter(name.split("-")[0], [raw])
        assert [e.final for e in events] == [False] * (len(events) - 1) + [True], name
        final_usage = [e.usage for e in events if e.usage is not None][-1]
        assert final_usage is not None and final_usage.output == 30, name  # usage came first
    responses = StreamMeter("openai", hide_usage_chunk=False).feed(
        b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
        b'"delta":"hi"}\n\nevent: response.completed\ndata: {"type":"response.completed",'
        b'"response":{"usage":{"input_tokens":3,"output_tokens":1}}}\n\n')
    assert [(e.final, e.output_tokens) for e in responses] == [(False, 1), (True, 0)]
    assert responses[1].usage is not None and responses[1].usage.output == 1


def test_every_split_point(streams: dict[str, bytes]) -> None:
    for name, raw in streams.items():
        provider = name.split("-")[0]
        whole = meter(provider, [raw])
        for cut in range(len(raw) + 1):
            assert meter(provider, [raw[:cut], raw[cut:]]) == whole, (name, cut)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_chunkings(streams: dict[str, bytes], data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(streams)))
    raw = streams[name]
    provider = name.split("-")[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=60)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert meter(provider, chunks) == meter(provider, [raw])


def test_hidden_usage_chunk_removed_and_nothing_else(streams: dict[str, bytes]) -> None:
    raw = streams["openai"]
    events, forwarded = meter("openai", [raw])
    hidden = [e for e in events if e.hidden]
    assert len(hidden) == 1
    assert len(forwarded) == len(raw) - (hidden[0].end - hidden[0].start)
    assert b'"choices":[]' not in forwarded.replace(b" ", b"")
    assert forwarded.rstrip().endswith(b"data: [DONE]")


def test_garbage_is_counted_conservatively(fake: FakeProvider) -> None:
    raw = _raw_stream(fake, "anthropic", crlf=False, garbage=True)
    m = StreamMeter("anthropic", hide_usage_chunk=False)
    events = m.feed(raw, end_of_stream=True)
    assert m.malformed_events == 1
    assert sum(e.output_tokens for e in events) == 31  # 30 real + 1 for the garbage


def _events(provider: str, *payloads: dict) -> bytes:
    lines = []
    for p in payloads:
        if provider == "anthropic":
            lines.append(f"event: {p['type']}\n")
        lines.append("data: " + json.dumps(p) + "\n\n")
    return "".join(lines).encode()


def test_tool_calls_reasoning_and_thinking_are_counted() -> None:
    openai_raw = _events("openai", {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "let me think"}}]},
        {"choices": [{"index": 0, "delta": {"refusal": "no"}}]})
    counted = [e.output_tokens for e in StreamMeter("openai", False).feed(openai_raw, True)]
    assert counted[0] >= 6 and counted[1] == 3 and counted[2] == 1
    anthropic_raw = _events(
        "anthropic",
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": '{"location": "San Fra'}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "thinking_delta", "thinking": "step one, step two"}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "signature_delta", "signature": "c2lnbmF0dXJl"}},
        {"type": "message_delta", "usage": {"output_tokens": 40}})
    events = StreamMeter("anthropic", False).feed(anthropic_raw, True)
    assert [e.output_tokens > 0 for e in events] == [True, True, False, False]
    assert events[3].usage is not None and events[3].usage.output == 40
