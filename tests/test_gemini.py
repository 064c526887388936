"""Gemini (`/gemini/…`) and Vertex AI Gemini (`/vertex/…`) through Envoy with Google's own
SDK (google-genai 3.6.1): calls streamed and not settled to the nano-dollar, hidden
thinking billed, cumulative usage not summed, a stream cut at its budget raising the SDK's
ClientError, a flood held to its budget, `?key=` moved out of the path, both-spellings
bodies refused, the missing cap written in, countTokens free, unmetered endpoints refused,
a pooled key failing over. Plus the provider's parsing rules and the JSON-array decoder,
without the stack.

Models (priced by the shipped table, `tokenfuse prices refresh` from LiteLLM 1.110.2):
gemini/gemini-2.5-flash, gemini/gemini-2.5-pro (long-context tier above 200k),
gemini/gemini-2.5-flash-lite, vertex/gemini-2.5-flash.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from google.oauth2.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fake_provider import FakeProvider, RequestRecord, Usage
from tests.support.harness import Stack, wait_until
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.pricing import PriceTable
from tokenfuse.providers import PROVIDERS, caller_credential, moved_query_credentials
from tokenfuse.providers.base import RequestRejected
from tokenfuse.providers.gemini import END_EVENT
from tokenfuse.providers.jsonarray import JsonArrayDecoder

GEMINI = PROVIDERS["gemini"]
VERTEX = PROVIDERS["vertex"]
PRICES = PriceTable.load()
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default
POOL_KEYS = [f"AIzaPoolKey{i}{'x' * 28}" for i in range(2)]
GEN = "/v1beta/models/gemini-2.5-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
BODY = {"contents": [{"role": "user", "parts": [{"text": "why is the sky blue?"}]}]}


def google_cost(usage: Usage) -> int:
    """Google's bill for a usage, written out from its pricing page independently of
    tokenfuse: prompt (cached part at the cache rate) and tool-use prompt at input rates,
    candidates and thoughts at the output rate; the whole call at the long-context tier
    when the prompt exceeds it (ai.google.dev/gemini-api/docs/pricing)."""
    price = PRICES.lookup(usage.model, usage.vendor)
    assert price is not None, usage.model
    for tier in price.tiers:
        if usage.input_tokens > tier.above_tokens:
            price = tier.price
    micro = ((usage.input_tokens - usage.cached_input_tokens) * price.input
             + usage.cached_input_tokens * price.cache_read
             + usage.output_tokens * price.output)
    return -(-micro // 1_000_000)


# ------------------------------------------------------------------ the provider alone


def test_paths_models_and_methods() -> None:
    call = GEMINI.parse_request(GEN, BODY)
    assert (call.endpoint, call.model, call.stream, call.choices) == (
        "generateContent", "gemini-2.5-flash", False, 1)
    assert call.hidden_output and call.max_output_tokens is None
    for version in ("v1", "v1beta", "v1alpha"):
        stream = GEMINI.parse_request(
            f"/{version}/models/gemini-2.5-pro:streamGenerateContent?alt=sse", BODY)
        assert stream.stream and stream.model == "gemini-2.5-pro"
    assert not GEMINI.parse_request("/v1/models/gemini-2.5-flash:countTokens", BODY).priced
    vertex_paths = ("/v1/projects/p/locations/us-central1/publishers/google/models/"
                    "gemini-2.5-flash:generateContent",
                    "/v1beta1/projects/p/locations/global/publishers/google/models/"
                    "gemini-2.5-flash:streamGenerateContent?alt=sse",
                    "/v1beta1/publishers/google/models/gemini-2.5-flash:generateContent")
    for path in vertex_paths:
        assert VERTEX.for_path(path).parse_request(path, BODY).model == "gemini-2.5-flash"
    refused = ["/v1beta/models/gemini-2.5-flash:batchGenerateContent",
               "/v1beta/models/gemini-embedding-001:embedContent",
               "/v1beta/models/gemini-embedding-001:batchEmbedContents",
               "/v1beta/models/imagen-4:predict", "/v1beta/models/veo-3:predictLongRunning",
               "/v1beta/interactions", "/v1beta/cachedContents", "/v1beta/files",
               "/v1beta/tunedModels/t:generateContent",
               "/v1beta/models/gemini-2.5-flash%3AgenerateContent"]
    for path in refused:
        with pytest.raises(RequestRejected) as out:
            GEMINI.parse_request(path, BODY)
        assert (out.value.status, out.value.code) == (404, "unsupported_endpoint"), path
    claude = ("/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
              "claude-sonnet-4-5@20250929:rawPredict")
    assert VERTEX.for_path(claude) is VERTEX  # until VertexClaude is wired: refused
    with pytest.raises(RequestRejected) as out:
        VERTEX.for_path(claude).parse_request(claude, {"messages": []})
    assert out.value.status == 404
    with pytest.raises(RequestRejected):  # Vertex paths are not the Gemini API's
        GEMINI.parse_request(vertex_paths[0], BODY)


def test_fields_in_both_spellings() -> None:
    snake = {"contents": BODY["contents"], "generation_config": {
        "max_output_tokens": 300, "candidate_count": 2,
        "thinking_config": {"thinking_budget": 0}}}
    call = GEMINI.parse_request(GEN, snake)
    assert (call.max_output_tokens, call.choices, call.hidden_output) == (300, 2, False)
    camel = {**BODY, "generationConfig": {"maxOutputTokens": 300, "candidateCount": 2,
                                          "thinkingConfig": {"thinkingBudget": 0}}}
    assert GEMINI.parse_request(GEN, camel).max_output_tokens == 300
    # google-genai's own shape: camelCase config, snake_case thinkingConfig keys
    sdk = {**BODY, "generationConfig": {"maxOutputTokens": 50, "thinkingConfig": {
        "thinking_budget": 0, "include_thoughts": False}}}
    assert not GEMINI.parse_request(GEN, sdk).hidden_output
    twice = [
        {**BODY, "generationConfig": {"maxOutputTokens": 10},
         "generation_config": {"max_output_tokens": 60000}},
        {**BODY, "generationConfig": {"maxOutputTokens": 10, "max_output_tokens": 60000}},
        {**BODY, "generationConfig": {"thinkingConfig": {"thinkingBudget": 0,
                                                         "thinking_budget": 9000}}},
        {**BODY, "cachedContent": "cachedContents/a", "cached_content": "cachedContents/b"},
        {"contents": [{"role": "user", "parts": [
            {"inlineData": {"mimeType": "image/png", "data": "AAAA"},
             "inline_data": {"mime_type": "image/png", "data": "AAAA"}}]}]},
    ]
    for body in twice:
        with pytest.raises(RequestRejected) as out:
            GEMINI.parse_request(GEN, body)
        assert (out.value.status, out.value.code) == (400, "ambiguous_field"), body
    # proto3: 0 is "unset", the model's maximum
    zero = {**BODY, "generationConfig": {"maxOutputTokens": 0, "candidateCount": 0}}
    assert GEMINI.parse_request(GEN, zero).max_output_tokens is None
    assert GEMINI.parse_request(GEN, zero).choices == 1
    # the cap written in keeps the body's spelling
    capped = GEMINI.with_output_cap(snake, call, 77)
    assert capped["generation_config"]["max_output_tokens"] == 77
    assert "generationConfig" not in capped
    assert GEMINI.with_output_cap(BODY, call, 5)["generationConfig"] == {"maxOutputTokens": 5}
    with pytest.raises(RequestRejected):
        GEMINI.with_output_cap(BODY, call, 0)  # 0 would mean the model's maximum


def test_bounds_for_server_content_and_formats() -> None:
    for body in ({**BODY, "cachedContent": "cachedContents/abc"},
                 {**BODY, "tools": [{"googleSearch": {}}]},
                 {**BODY, "tools": [{"code_execution": {}}]},
                 {"contents": [{"role": "user", "parts": [
                     {"fileData": {"fileUri": "gs://b/video.mp4"}}]}]}):
        assert GEMINI.parse_request(GEN, body).server_context, body
    assert not GEMINI.parse_request(GEN, {**BODY, "tools": [
        {"functionDeclarations": [{"name": "f"}]}]}).server_context
    for path in ("/v1beta/models/gemini-2.5-flash:generateContent?alt=proto",
                 "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=media",
                 "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse",
                 "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&alt=json"):
        with pytest.raises(RequestRejected) as out:
            GEMINI.for_path(path).parse_request(path, BODY)
        assert out.value.status == 400, path
    # non-thinking models stream visible output only
    lite = "/v1beta/models/gemini-2.0-flash:generateContent"
    assert not GEMINI.parse_request(lite, BODY).hidden_output


def test_usage_is_cumulative_and_complete() -> None:
    # vercel/ai google-usage-raw-live.chunks.txt: 12 + 71 + 89 + 65 = 237 (cached 4)
    usage = GEMINI.usage({"usageMetadata": {
        "promptTokenCount": 12, "cachedContentTokenCount": 4, "candidatesTokenCount": 71,
        "thoughtsTokenCount": 89, "toolUsePromptTokenCount": 65, "totalTokenCount": 237}})
    assert usage is not None
    assert (usage.input, usage.cache_read, usage.output) == (12 - 4 + 65, 4, 71 + 89)
    # Vertex's quirk (candidates already include thoughts): the total decides
    quirk = GEMINI.usage({"usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 50,
                                            "thoughtsTokenCount": 40, "totalTokenCount": 60}})
    assert quirk is not None and quirk.output == 50
    assert GEMINI.usage({"candidates": []}) is None
    first = GEMINI.usage({"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 5,
                                            "thoughtsTokenCount": 185, "totalTokenCount": 199}})
    last = GEMINI.usage({"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 23,
                                           "thoughtsTokenCount": 185, "totalTokenCount": 217}})
    assert first is not None and last is not None
    merged = GEMINI.merge_usage(GEMINI.merge_usage(None, first), last)
    assert merged.output == 23 + 185 and merged.input == 9  # the last, not the sum


def test_errors_and_the_cut_are_googles_shape() -> None:
    doc = json.loads(GEMINI.error_body("budget", "budget_exceeded", "m", {"x": 1}))
    assert list(doc) == ["error", "tokenfuse"]  # `error` first: google-genai reads it
    assert doc["error"] == {"code": 402, "message": "m", "status": "RESOURCE_EXHAUSTED"}
    assert json.loads(GEMINI.error_body("invalid_request", "unsupported_endpoint", "m"))[
        "error"]["code"] == 404
    cut = GEMINI.stream_error_event("stream_cut", "budget_exceeded", "stop", {})
    assert cut.startswith(b'data: {"error": {"code": 402') and cut.endswith(b"\r\n\r\n")
    assert b"event:" not in cut
    array = GEMINI.for_path("/v1beta/models/m:streamGenerateContent")
    assert array is not GEMINI and array.for_path("/x") is array
    assert json.loads(b"[" + array.stream_error_event("stream_cut", "c", "m", {}))[0][
        "error"]["code"] == 402


def test_query_credentials() -> None:
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=AIzaA"
    assert caller_credential(GEMINI, {":path": [path]}) == ("AIzaA", None)
    assert caller_credential(GEMINI, {":path": [path + "&key=AIzaA"]}) == (
        None, "duplicate_credential")
    assert caller_credential(GEMINI, {":path": [path + "&%24key=AIzaB"]})[1] == (
        "duplicate_credential")
    assert caller_credential(GEMINI, {":path": [path], "x-goog-api-key": ["AIzaB"]}) == (
        None, "conflicting_credentials")
    assert caller_credential(GEMINI, {":path": [path], "x-goog-api-key": ["AIzaA"]}) == (
        "AIzaA", None)
    assert caller_credential(GEMINI, {":path": [path.replace("AIzaA", "tfk-x")],
                                      "x-goog-api-key": ["AIzaA"]})[1] == (
        "gateway_key_with_credential")
    assert moved_query_credentials(GEMINI, path) == (
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        (("x-goog-api-key", "AIzaA"),))
    assert moved_query_credentials(VERTEX, "/v1/x?access_token=ya29.t&a=1") == (
        "/v1/x?a=1", (("authorization", "Bearer ya29.t"),))
    assert moved_query_credentials(GEMINI, "/v1/x?alt=sse") is None
    # providers that read no query credential ignore one
    assert caller_credential(PROVIDERS["openai"], {":path": ["/v1/chat/completions?key=k"],
                                                   "authorization": ["Bearer sk"]})[0] == "sk"


# ------------------------------------------------------------------ the JSON-array decoder

ARRAY = ('[{"candidates":[{"content":{"parts":[{"text":"a,]}[\\"\\\\"}]}}]}\n'
         ',\r\n{"candidates":[{"content":{"parts":[{"text":"b"}]},"finishReason":"STOP"}],'
         '"usageMetadata":{"promptTokenCount":3,"totalTokenCount":5}}\n]').encode()


def _decode(data: bytes, cuts: list[int]) -> list[tuple[str, str, int]]:
    decoder = JsonArrayDecoder(END_EVENT)
    events = []
    bounds = [0, *sorted(set(cuts)), len(data)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        events += decoder.feed(data[a:b])
    events += decoder.finish()
    return [(e.event, e.data, e.end) for e in events]


def test_json_array_decoder_events() -> None:
    events = _decode(ARRAY, [])
    assert [e[0] for e in events] == ["message", "message", "message", END_EVENT]
    assert events[0] == ("message", "", 1)  # the opening bracket, alone
    assert json.loads(events[1][1])["candidates"][0]["content"]["parts"][0]["text"] == \
        'a,]}["\\'
    assert ARRAY[:events[1][2]].endswith(b",")  # an element ends at its separator
    assert events[2][2] == events[3][2] == len(ARRAY)
    assert _decode(b'{"error":{"code":400}}', []) == []  # not an array
    assert [e[0] for e in _decode(b"[{}", [])] == ["message"]  # never closed: no end


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(ARRAY) - 1), max_size=12))
def test_json_array_decoder_any_chunking(cuts: list[int]) -> None:
    assert _decode(ARRAY, cuts) == _decode(ARRAY, [])


def test_stream_meter_reads_both_framings() -> None:
    sse = (b'data: {"candidates":[{"content":{"parts":[{"text":"hello"}]}}],'
           b'"usageMetadata":{"promptTokenCount":4,"thoughtsTokenCount":30,'
           b'"candidatesTokenCount":1,"totalTokenCount":35}}\r\n\r\n'
           b'data: {"candidates":[{"content":{"parts":[{"text":""}]},"finishReason":"STOP"}],'
           b'"usageMetadata":{"promptTokenCount":4,"thoughtsTokenCount":30,'
           b'"candidatesTokenCount":1,"totalTokenCount":35}}\r\n\r\n')
    meter = StreamMeter(GEMINI, False, GEMINI.tokenizer("gemini-2.5-flash"))
    events = meter.feed(sse[:50]) + meter.feed(sse[50:], True)
    assert [e.final for e in events] == [False, False, True]
    assert events[0].output_tokens >= 1 and events[1].usage is not None
    # a stream that ends without a finishReason is not final (settled as unfinished)
    meter = StreamMeter(GEMINI, False, GEMINI.tokenizer("gemini-2.5-flash"))
    assert not any(e.final for e in meter.feed(sse[:sse.index(b"\r\n\r\n") + 4], True))
    array = GEMINI.for_path("/v1beta/models/gemini-2.5-flash:streamGenerateContent")
    meter = StreamMeter(array, False, array.tokenizer("gemini-2.5-flash"))
    events = meter.feed(ARRAY, True)
    assert events[-1].final and events[2].usage is not None
