"""Ollama's native API (`/ollama/api/*`) through Envoy with the official Python client
(ollama 0.6.3): chat and generate, streamed (NDJSON) and not, settled exactly; a stream cut
at its budget raises the client's ResponseError with tokenfuse's message; refusals too.
Plus the provider's parsing rules, without the stack."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import ollama
import pytest

from tests.support.fake_provider import FakeProvider, RequestRecord
from tests.support.harness import Stack, wait_until
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.providers import PROVIDERS
from tokenfuse.providers.base import RequestRejected
from tokenfuse.providers.ndjson import NdjsonDecoder

ROUTE = PROVIDERS["ollama"]
NATIVE = ROUTE.for_path("/api/chat")
#: The operator's prices (self-hosted: an internal rate): $1 / $4 per million tokens,
#: i.e. 1,000 / 4,000 nano-USD per token, so a bill is exact integer arithmetic here.
INPUT_NANO, OUTPUT_NANO = 1000, 4000
MAX_OUTPUT = 4096
PRICES = {"unit": "USD per 1M tokens", "models": {
    f"ollama/{model}": {"provider": "ollama", "mode": "chat", "input": "1.00",
                        "output": "4.00", "max_output_tokens": MAX_OUTPUT,
                        "context_window": 131072}
    for model in ("llama3.2", "qwen3", "nomic-embed-text")}}
GRACE = 32  # TOKENFUSE_STREAM_GRACE_TOKENS default
#: An operator's pool of keys for a hosted Ollama (ollama.com takes Bearer keys).
POOL_KEYS = [f"ollama-pool-secret-{i}-{'z' * 20}" for i in range(2)]


# ------------------------------------------------------------------ the provider alone


def test_one_route_two_wire_formats() -> None:
    assert ROUTE.for_path("/v1/chat/completions") is ROUTE  # the OpenAI-compatible API
    assert NATIVE is not ROUTE and NATIVE.for_path("/api/generate") is NATIVE
    assert isinstance(NATIVE.stream_decoder(), NdjsonDecoder)
    assert ROUTE.error_body("budget", "budget_exceeded", "m") == json.dumps(
        {"error": {"message": "m", "type": "insufficient_quota", "code": "budget_exceeded",
                   "param": None}}).encode()
    # A string `error`: what ollama-python shows as the message.
    assert json.loads(NATIVE.error_body("budget", "budget_exceeded", "m", {"x": 1})) == {
        "error": "m", "tokenfuse": {"x": 1}}
    cut = NATIVE.stream_error_event("stream_cut", "budget_exceeded", "stop", {})
    assert cut.endswith(b"}\n") and json.loads(cut)["error"] == "stop"


def test_native_requests() -> None:
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    call = ROUTE.parse_request("/api/chat", chat)  # the route hands it to the native API
    assert (call.endpoint, call.stream, call.max_output_tokens) == ("chat", True, None)
    assert call.messages == chat["messages"] and not call.hide_usage_chunk
    assert not NATIVE.parse_request("/api/chat", {**chat, "stream": False}).stream
    for predict, cap in ((-1, None), (-2, None), (0, None), (200, 200), (200.9, 200)):
        body = {**chat, "options": {"num_predict": predict, "temperature": 0}}
        assert NATIVE.parse_request("/api/chat", body).max_output_tokens == cap, predict
    for bad in ("200", True, float("inf"), 1e30):
        with pytest.raises(RequestRejected):
            NATIVE.parse_request("/api/chat", {**chat, "options": {"num_predict": bad}})
    generate = NATIVE.parse_request("/api/generate", {"model": "m", "prompt": "p",
                                                      "system": "s"})
    assert generate.endpoint == "generate" and generate.messages == []
    assert NATIVE.parse_request("/api/embed", {"model": "m", "input": "x"}).max_output_tokens == 0
    assert not NATIVE.parse_request("/api/show", {"model": "m"}).priced
    for path in ("/api/pull", "/api/create", "/api/delete", "/api/experimental/web_search"):
        with pytest.raises(RequestRejected) as refused:
            NATIVE.parse_request(path, {"model": "m"})
        assert refused.value.status == 404
    capped = NATIVE.with_output_cap({**chat, "options": {"seed": 1}}, call, 77)
    assert capped["options"] == {"seed": 1, "num_predict": 77}
    with pytest.raises(RequestRejected):
        NATIVE.with_output_cap(chat, call, 0)  # num_predict 0 would mean no cap


def test_native_responses() -> None:
    tool_line = json.dumps({"message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "finish", "arguments": {"done": True}}}]}, "done": False})
    assert not NATIVE.is_final_event("message", tool_line)  # `done` of a tool argument
    assert NATIVE.stream_output("message", json.loads(tool_line)) == ["finish",
                                                                     '{"done": true}']
    last = '{"message":{"content":""},"done":true,"prompt_eval_count":26,"eval_count":3}'
    assert NATIVE.is_final_event("message", last)
    usage = NATIVE.usage(json.loads(last))
    assert usage is not None and (usage.input, usage.output) == (26, 3)
    assert NATIVE.usage({"embeddings": [[0.1]], "prompt_eval_count": 5}).input == 5
    assert NATIVE.usage({"response": "x", "done": False}) is None
    assert NATIVE.stream_output("message", {"response": "a", "thinking": "b"}) == ["a", "b"]
    assert NATIVE.is_event_stream(b'{"model":') and not NATIVE.is_event_stream(b"<html>")
    meter = StreamMeter(NATIVE, False, NATIVE.tokenizer("llama3.2"))
    lines = ('{"message":{"content":" hello"},"done":false}\n' + last + "\n").encode()
    events = meter.feed(lines[:30], False) + meter.feed(lines[30:], True)
    assert [e.final for e in events] == [False, True]
    assert events[1].usage == usage and events[0].output_tokens >= 1


# ------------------------------------------------------------------ through Envoy


@pytest.fixture(scope="module")
def ollama_stack(fake: FakeProvider, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("ollama")
    prices = workdir / "prices.json"
    prices.write_text(json.dumps(PRICES))
    pools = workdir / "pools"
    pools.mkdir()
    (pools / "ollama-main.csv").write_text(
        "key,label\n" + "".join(f"{k},ol-{i}\n" for i, k in enumerate(POOL_KEYS)))
    s = Stack(fake.base_url, {"TOKENFUSE_PRICES_FILE": str(prices),
                              "TOKENFUSE_POOLS_DIR": str(pools),
                              "TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300",
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000"}).start()
    imported = s.cli("keys", "import", "--pool", "ollama-main", "--provider", "ollama",
                     str(pools / "ollama-main.csv"))
    assert imported.returncode == 0, imported.stderr
    yield s
    s.cleanup()


@pytest.fixture
def key() -> str:
    return "ollama-key-" + uuid.uuid4().hex


def client(stack: Stack, key: str, **headers: str) -> ollama.Client:
    return ollama.Client(host=stack.envoy.base_url + "/ollama", timeout=30,
                         headers={"Authorization": f"Bearer {key}", **headers})


def spent(stack: Stack, key: str) -> dict:
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return doc["windows"]["day"]


def records(fake: FakeProvider, key: str) -> list[RequestRecord]:
    return [r for r in list(fake.records) if r.api_key == key]


def bill(fake: FakeProvider, key: str, completed_only: bool = True) -> int:
    """What the Ollama operator's price makes of what the fake reported (or generated)."""
    return sum(r.usage.input_tokens * INPUT_NANO + r.usage.output_tokens * OUTPUT_NANO
               for r in records(fake, key)
               if r.usage is not None and (r.completed or not completed_only))


MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_settled_exactly(ollama_stack: Stack, fake: FakeProvider, key: str,
                              stream: bool) -> None:
    c = client(ollama_stack, key, **{"x-fake-output-tokens": "12"})
    if stream:
        parts = list(c.chat(model="llama3.2", messages=MESSAGES, stream=True))
        text = "".join(p.message.content or "" for p in parts)
        last = parts[-1]
    else:
        last = c.chat(model="llama3.2", messages=MESSAGES)
        text = last.message.content or ""
    assert last.done and last.eval_count == 12 and last.prompt_eval_count
    assert fake.wait_for_requests(1)
    wait_until(lambda: records(fake, key) and records(fake, key)[-1].finished,
               what="the fake's record")
    (record,) = records(fake, key)
    assert record.bill is not None and record.bill.generations[0].visible == 12 and text
    day = spent(ollama_stack, key)
    assert day["spent_nano_usd"] == bill(fake, key) == (
        last.prompt_eval_count * INPUT_NANO + 12 * OUTPUT_NANO)
    assert day["reserved_nano_usd"] == 0
    # Without num_predict: a non-streamed call gets the model's maximum written into
    # options.num_predict (Ollama would generate without end); a stream is metered.
    assert record.cap == (None if stream else MAX_OUTPUT)


@pytest.mark.parametrize("stream", [False, True])
def test_generate_settled_exactly(ollama_stack: Stack, fake: FakeProvider, key: str,
                                  stream: bool) -> None:
    c = client(ollama_stack, key)
    options = {"num_predict": 9}
    if stream:
        parts = list(c.generate(model="llama3.2", prompt="Once upon a time", system="Be brief",
                                options=options, stream=True))
        last = parts[-1]
        text = "".join(p.response for p in parts)
    else:
        last = c.generate(model="llama3.2", prompt="Once upon a time", system="Be brief",
                          options=options)
        text = last.response
    assert last.done and last.done_reason == "length" and last.eval_count == 9
    assert len(text) > 0
    wait_until(lambda: any(r.finished for r in records(fake, key)), what="the fake's record")
    assert records(fake, key)[-1].cap == 9  # the request's own cap, within the budget
    assert spent(ollama_stack, key)["spent_nano_usd"] == bill(fake, key) > 0


def test_thinking_is_metered_and_billed(ollama_stack: Stack, fake: FakeProvider,
                                        key: str) -> None:
    c = client(ollama_stack, key, **{"x-fake-reasoning-tokens": "20",
                                     "x-fake-output-tokens": "5"})
    parts = list(c.chat(model="qwen3", messages=MESSAGES, think=True, stream=True))
    thinking = "".join(p.message.thinking or "" for p in parts)
    assert thinking and parts[-1].eval_count == 25
    wait_until(lambda: any(r.finished for r in records(fake, key)), what="the fake's record")
    assert spent(ollama_stack, key)["spent_nano_usd"] == bill(fake, key)


def test_stream_cut_at_its_budget(ollama_stack: Stack, fake: FakeProvider, key: str) -> None:
    budget = 150 * OUTPUT_NANO  # 150 output tokens (the input costs ~20 of them)
    assert ollama_stack.cli("budget", "set", "--key", key, "--daily",
                            f"0.{budget:09d}").returncode == 0
    c = client(ollama_stack, key, **{"x-fake-output-tokens": "4000",
                                     "x-fake-chunk-delay-ms": "2"})
    delivered = 0
    with pytest.raises(ollama.ResponseError) as raised:
        for part in c.chat(model="llama3.2", messages=MESSAGES, stream=True):
            delivered += bool(part.message.content)
    assert "budget exhausted" in str(raised.value) and raised.value.status_code == -1
    assert raised.value.error.startswith("stream ended: tokenfuse day budget exhausted")
    assert 40 < delivered <= 150  # counted with the open-weight bound (cl100k x 1.5)
    print(f"\nollama: delivered {delivered} of a 150-token budget", end=" ")
    wait_until(lambda: any(r.finished for r in records(fake, key)),
               what="the provider to see the disconnect")
    (record,) = records(fake, key)
    assert not record.completed and record.output_tokens_sent <= delivered + GRACE * 2
    day = spent(ollama_stack, key)
    assert bill(fake, key, completed_only=False) <= day["spent_nano_usd"] <= budget
    assert day["reserved_nano_usd"] == 0


def test_refusals_are_raised_by_the_client(ollama_stack: Stack, fake: FakeProvider,
                                           key: str) -> None:
    c = client(ollama_stack, key)
    with pytest.raises(ollama.ResponseError) as unknown:
        c.chat(model="mistral-nemo", messages=MESSAGES)
    assert unknown.value.status_code == 400
    assert "model 'mistral-nemo' has no price in tokenfuse" in str(unknown.value)
    with pytest.raises(ollama.ResponseError) as pulled:
        c.pull("llama3.2")  # not metered: refused, never forwarded
    assert pulled.value.status_code == 404 and "fail-closed" in pulled.value.error
    assert ollama_stack.cli("budget", "set", "--key", key, "--daily",
                            "0.000001").returncode == 0
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as broke:
            result = c.generate(model="llama3.2", prompt="hello", stream=stream)
            if stream:
                list(result)
        assert broke.value.status_code == 402 and "budget exhausted" in broke.value.error
    assert records(fake, key) == []  # nothing reached the provider
    with pytest.raises(ollama.ResponseError) as anonymous:
        ollama.Client(host=ollama_stack.envoy.base_url + "/ollama").list()
    assert anonymous.value.status_code == 401 and "no API key" in anonymous.value.error


def test_free_endpoints_cost_nothing(ollama_stack: Stack, fake: FakeProvider,
                                     key: str) -> None:
    c = client(ollama_stack, key)
    assert {m.model for m in c.list().models} >= {"llama3.2", "qwen3"}
    assert c.show("llama3.2").details is not None
    assert c.embed(model="nomic-embed-text", input="a sentence").embeddings
    wait_until(lambda: len([r for r in records(fake, key) if r.finished]) == 3,
               what="the fake's records")
    # Only the embedding is billed (its prompt_eval_count); tags and show are free.
    assert spent(ollama_stack, key)["spent_nano_usd"] == bill(fake, key) > 0


def test_legacy_embeddings_without_usage_charge_the_reservation(
        ollama_stack: Stack, fake: FakeProvider, key: str) -> None:
    """`/api/embeddings` reports no count (api/types.go EmbeddingResponse): the call is
    charged its reservation, the input bound, never less than what was generated."""
    assert client(ollama_stack, key).embeddings(model="nomic-embed-text",
                                                prompt="a sentence").embedding
    wait_until(lambda: any(r.finished for r in records(fake, key)), what="the fake's record")
    day = spent(ollama_stack, key)
    assert day["spent_nano_usd"] > bill(fake, key) > 0 and day["reserved_nano_usd"] == 0


def test_loop_guard_refuses_the_sixth_identical_request(ollama_stack: Stack,
                                                       key: str) -> None:
    c = client(ollama_stack, key, **{"x-fake-output-tokens": "3"})
    for _ in range(5):
        c.chat(model="llama3.2", messages=MESSAGES, stream=False)
    with pytest.raises(ollama.ResponseError) as looped:
        c.chat(model="llama3.2", messages=MESSAGES, stream=False)
    assert looped.value.status_code == 429 and "loop" in looped.value.error


def test_streams_compressed_for_a_gzip_client(ollama_stack: Stack, fake: FakeProvider,
                                              key: str) -> None:
    """Ollama answers uncompressed; Envoy gzips NDJSON toward a client that accepts it
    (ollama-python sends accept-encoding: gzip, deflate), like SSE."""
    body = {"model": "llama3.2", "messages": MESSAGES}
    with httpx.stream("POST", ollama_stack.envoy.base_url + "/ollama/api/chat", json=body,
                      headers={"authorization": f"Bearer {key}",
                               "accept-encoding": "gzip"}, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/x-ndjson"
        assert resp.headers.get("content-encoding") == "gzip"
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == len(lines) - 1
    wait_until(lambda: any(r.finished for r in records(fake, key)), what="the fake's record")
    assert records(fake, key)[-1].response_encoding == ""  # the upstream was not asked to
    assert spent(ollama_stack, key)["spent_nano_usd"] == bill(fake, key)


def test_pooled_key_fails_over(ollama_stack: Stack, fake: FakeProvider) -> None:
    vkey = ollama_stack.cli("vkey", "create", "--name", "ollama-app", "--pool",
                            "ollama-main").stdout.strip()
    assert vkey.startswith("tfk-")
    assert ollama_stack.cli("budget", "set", "--key", vkey, "--daily", "5").returncode == 0
    failing, healthy = POOL_KEYS
    fake.key_failures[failing] = (429, 30)
    since = len(fake.records)
    try:
        c = client(ollama_stack, vkey, **{"x-fake-output-tokens": "4"})
        answers = [c.chat(model="llama3.2", stream=False, messages=[
            {"role": "user", "content": f"pooled question {word}"}]).message.content
            for word in ("one", "two", "three")]
        answers.append("".join(p.message.content or "" for p in c.chat(
            model="llama3.2", stream=True,
            messages=[{"role": "user", "content": "pooled stream"}])))
    finally:
        del fake.key_failures[failing]
    assert all(answers)  # the client saw no error
    posts = [r for r in list(fake.records)[since:] if r.method == "POST"]
    assert [r.status for r in posts if r.api_key == failing] == [429]  # then cooled down
    assert sum(1 for r in posts if r.api_key == healthy and r.status == 200) == 4
    assert not any(r.api_key == vkey for r in posts)  # the gateway key never went upstream
    billed = sum(r.usage.input_tokens * INPUT_NANO + r.usage.output_tokens * OUTPUT_NANO
                 for r in posts if r.usage is not None and r.completed)
    day = spent(ollama_stack, vkey)
    assert day["spent_nano_usd"] == billed > 0 and day["reserved_nano_usd"] == 0
