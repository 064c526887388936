"""OpenTelemetry traces through Envoy: a real stack exporting over OTLP/HTTP to a local
receiver (tests/support/otlp_receiver.py). Each call's span carries what the fake provider
billed, is a child of the client's span, says why a request was refused or a stream cut,
and holds no key, gateway key or prompt; with tracing off nothing is sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import (
    billed_for,
    day_window,
    key_of,
    requests_for,
    set_daily,
    usage_cost,
)
from tests.support.fake_provider import FakeProvider, RequestRecord
from tests.support.harness import Stack, free_port, wait_until
from tests.support.otlp_receiver import Event, OtlpReceiver, ReceivedSpan
from tokenfuse.config import ConfigError, load_settings
from tokenfuse.identity import PREFIX_CHARS, key_id

SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2
POOL_SECRET = "sk-proj-traced-pool-secret-" + "z" * 24
PROMPT_MARK = "zebra-quartz-prompt"  # in every prompt: no exported value may contain it
#: Every secret the scan looks for, and every prompt text sent (filled in as tests run).
SECRETS: set[str] = {POOL_SECRET, PROMPT_MARK}
#: The exact loop tier refuses a prompt's third repeat (each test's calls differ).
OTEL_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "tokenfuse-under-test",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=ci,service.version=9.9",
            "LOOP_GUARD_MAX_HITS": "2", "LOOP_GUARD_NEAR_DUPLICATE": "0"}


@pytest.fixture(scope="module")
def traced(fake: FakeProvider, receiver: OtlpReceiver) -> Iterator[Stack]:
    s = Stack(fake.base_url, {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    s.add_pool("traced", "openai", f"key,label\n{POOL_SECRET},traced-0\n")
    s.start()
    yield s
    s.cleanup()


def new_key() -> str:
    key = "sk-test-" + uuid.uuid4().hex
    SECRETS.add(key)
    return key


def prefix(stack: Stack, key: str) -> str:
    return key_id(stack.secret.encode(), key)[:PREFIX_CHARS]


def span_of(receiver: OtlpReceiver, stack: Stack, key: str) -> ReceivedSpan:
    """The request span of the (one) call made with `key`, once exported."""
    wanted = prefix(stack, key)
    found: list[ReceivedSpan] = []

    def arrived() -> bool:
        span = receiver.request_span("tokenfuse.key_id_prefix", wanted)
        if span is None:
            return False
        found.append(span)
        return True

    wait_until(arrived, timeout=20, what="the request's span at the OTLP receiver")
    return found[0]


def record_of(fake: FakeProvider, key: str) -> RequestRecord:
    wait_until(lambda: any(r.finished for r in list(fake.records) if key_of(r) == key),
               what="the fake's record")
    return next(r for r in list(fake.records) if key_of(r) == key and r.finished)


def traceparent() -> tuple[str, str, str]:
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{parent}-01", trace_id, parent


def event(span: ReceivedSpan, name: str) -> Event:
    return next(e for e in span.events if e.name == name)


def test_non_streamed_call_is_a_child_of_the_clients_span(
        traced: Stack, fake: FakeProvider, receiver: OtlpReceiver) -> None:
    key = new_key()
    header, trace_id, parent = traceparent()
    client = openai_client(traced, key)
    answer = client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=20,
        messages=[{"role": "user", "content": f"hello {PROMPT_MARK}"}],
        extra_headers={"traceparent": header, "tracestate": "vendor=abc"})
    assert answer.choices[0].message.content
    span = span_of(receiver, traced, key)
    record = record_of(fake, key)
    assert record.usage is not None
    # The client's span is the parent; the upstream got tokenfuse's span as its parent.
    assert (span.trace_id, span.parent_span_id) == (trace_id, parent)
    assert record.headers["traceparent"] == f"00-{trace_id}-{span.span_id}-01"
    assert record.headers["tracestate"] == "vendor=abc"
    assert span.kind == SERVER and span.name == "chat gpt-4o-mini"
    a = span.attributes
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.max_tokens"] == 20
    assert "tokenfuse.output_cap" not in a  # the request's own cap was within the grant
    assert a["gen_ai.response.model"] == answer.model
    assert a["gen_ai.response.finish_reasons"] == [answer.choices[0].finish_reason]
    assert a["gen_ai.usage.input_tokens"] == record.usage.input_tokens
    assert a["gen_ai.usage.output_tokens"] == record.usage.output_tokens
    assert a["tokenfuse.spend_nano_usd"] == usage_cost(record.usage) > 0
    assert a["tokenfuse.reserved_nano_usd"] >= a["tokenfuse.spend_nano_usd"]
    assert a["tokenfuse.decision"] == "allowed" and a["tokenfuse.settlement"] == "usage"
    assert a["http.response.status_code"] == 200
    assert span.status_code != STATUS_ERROR
    # The standard resource variables win over tokenfuse's own values.
    assert span.resource["service.name"] == "tokenfuse-under-test"
    assert span.resource["deployment.environment.name"] == "ci"
    assert span.resource["service.version"] == "9.9"
    assert span.resource["service.instance.id"]  # one per process (the SDK's, else ours)
    reserve, settle = event(span, "tokenfuse.reserve"), event(span, "tokenfuse.settle")
    assert reserve.attributes["tokenfuse.decision"] == "allowed"
    assert reserve.attributes["tokenfuse.reserved_nano_usd"] == a["tokenfuse.reserved_nano_usd"]
    assert settle.attributes["tokenfuse.spend_nano_usd"] == a["tokenfuse.spend_nano_usd"]
    assert settle.attributes["tokenfuse.settled"] is True
    names = [e.name for e in span.events]
    assert names == ["tokenfuse.reserve", "tokenfuse.first_byte", "tokenfuse.settle"], names
    assert span.start_ns <= min(e.time_ns for e in span.events) <= span.end_ns
    assert not span.children  # one span per request


def test_streamed_call_reports_the_billed_usage(traced: Stack, fake: FakeProvider,
                                               receiver: OtlpReceiver) -> None:
    key = new_key()
    chunks = list(openai_client(traced, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=30, stream=True,
        messages=[{"role": "user", "content": f"count {PROMPT_MARK}"}]))
    finished = [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason]
    assert finished
    span = span_of(receiver, traced, key)
    record = record_of(fake, key)
    assert record.usage is not None and record.completed
    a = span.attributes
    assert span.parent_span_id == ""  # no traceparent sent: a root
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.input_tokens"] == record.usage.input_tokens
    assert a["gen_ai.usage.output_tokens"] == record.usage.output_tokens
    assert a["tokenfuse.spend_nano_usd"] == usage_cost(record.usage)
    assert a["tokenfuse.output_tokens_counted"] == record.usage.output_tokens
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < 10
    assert a["gen_ai.response.model"] == chunks[0].model
    assert a["gen_ai.response.finish_reasons"] == finished
    # Anthropic's stream names them in message_start and message_delta.
    key = new_key()
    with anthropic_client(traced, key).messages.stream(
            model="claude-haiku-4-5", max_tokens=12,
            messages=[{"role": "user", "content": f"count {PROMPT_MARK}"}]) as stream:
        message = stream.get_final_message()
    a = span_of(receiver, traced, key).attributes
    assert a["gen_ai.response.model"] == message.model
    assert a["gen_ai.response.finish_reasons"] == [message.stop_reason]
    usage = record_of(fake, key).usage
    assert usage is not None and a["tokenfuse.spend_nano_usd"] == usage_cost(usage)


def test_cache_tokens_follow_the_conventions(traced: Stack, fake: FakeProvider,
                                             receiver: OtlpReceiver) -> None:
    """Input tokens include cache reads and writes; each has its own attribute."""
    key = new_key()
    anthropic_client(traced, key).messages.create(
        model="claude-haiku-4-5", max_tokens=10,
        messages=[{"role": "user", "content": f"hi {PROMPT_MARK} " + "word " * 100}],
        extra_headers={"x-fake-cache-read": "40", "x-fake-cache-creation": "25"})
    span = span_of(receiver, traced, key)
    usage = record_of(fake, key).usage
    assert usage is not None
    a = span.attributes
    assert a["gen_ai.provider.name"] == "anthropic" and span.name == "chat claude-haiku-4-5"
    assert a["gen_ai.usage.cache_read.input_tokens"] == usage.cached_input_tokens == 40
    assert a["gen_ai.usage.cache_write.input_tokens"] == usage.cache_creation_input_tokens == 25
    assert a["gen_ai.usage.input_tokens"] == (usage.input_tokens + usage.cached_input_tokens
                                              + usage.cache_creation_input_tokens)
    assert a["tokenfuse.spend_nano_usd"] == usage_cost(usage)


def test_budget_refusal_is_an_error_with_its_window(traced: Stack, fake: FakeProvider,
                                                    receiver: OtlpReceiver) -> None:
    key = new_key()
    set_daily(traced, key, 1)  # one nano-dollar: nothing fits
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client(traced, key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=20,
            messages=[{"role": "user", "content": f"hi {PROMPT_MARK}"}])
    assert refused.value.status_code == 402
    span = span_of(receiver, traced, key)
    a = span.attributes
    assert span.status_code == STATUS_ERROR and span.status_message == "budget_exceeded"
    assert a["tokenfuse.decision"] == "refused"
    assert a["tokenfuse.refusal"] == a["error.type"] == "budget_exceeded"
    assert a["tokenfuse.window"] == "day"
    assert a["http.response.status_code"] == 402
    assert "tokenfuse.spend_nano_usd" not in a
    reserve = event(span, "tokenfuse.reserve")
    assert reserve.attributes["tokenfuse.decision"] == "refused"
    assert reserve.attributes["tokenfuse.window"] == "day"
    assert not any(key_of(r) == key for r in list(fake.records))  # never forwarded


def test_loop_refusal_names_its_reason(traced: Stack, receiver: OtlpReceiver) -> None:
    key = new_key()
    client = openai_client(traced, key)
    for _ in range(2):
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=5,
            messages=[{"role": "user", "content": f"again {PROMPT_MARK}"}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=5,
            messages=[{"role": "user", "content": f"again {PROMPT_MARK}"}])
    wanted = prefix(traced, key)

    def refused() -> list[ReceivedSpan]:
        return [s for s in receiver.spans
                if s.attributes.get("tokenfuse.key_id_prefix") == wanted
                and s.attributes.get("tokenfuse.decision") == "refused"]

    wait_until(refused, what="the loop refusal's span")
    span = refused()[0]
    assert span.status_code == STATUS_ERROR
    assert span.attributes["tokenfuse.refusal"] == "recursive_loop_detected"
    assert span.attributes["http.response.status_code"] == 429
    assert event(span, "tokenfuse.reserve").attributes["tokenfuse.refusal"] == "loop"


def test_stream_cut_is_an_event(traced: Stack, receiver: OtlpReceiver) -> None:
    key = new_key()
    set_daily(traced, key, 150 * 600)  # about 150 gpt-4o-mini output tokens
    with pytest.raises(openai.APIError):
        for _chunk in openai_client(traced, key).chat.completions.create(
                model="gpt-4o-mini", stream=True,
                messages=[{"role": "user", "content": f"a novel {PROMPT_MARK}"}],
                extra_headers={"x-fake-output-tokens": "4000",
                               "x-fake-chunk-delay-ms": "1"}):
            pass
    span = span_of(receiver, traced, key)
    cut = next(e for e in span.events if e.name == "tokenfuse.stream_cut")
    assert cut.attributes["tokenfuse.refusal"] == "budget_exceeded"
    assert cut.attributes["tokenfuse.window"] == "day"
    assert 0 < cut.attributes["tokenfuse.output_tokens_counted"] <= 150
    assert span.status_code == STATUS_ERROR
    assert span.attributes["gen_ai.response.finish_reasons"] == ["error"]
    assert span.attributes["tokenfuse.settlement"] == "counted"
    assert "gen_ai.request.max_tokens" not in span.attributes  # the client set none ...
    assert span.attributes["tokenfuse.output_cap"] > 150  # ... so the model's bound held
    assert 0 < span.attributes["tokenfuse.spend_nano_usd"] <= 150 * 600


def test_malformed_traceparent_starts_a_new_trace(traced: Stack, fake: FakeProvider,
                                                  receiver: OtlpReceiver) -> None:
    key = new_key()
    openai_client(traced, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=5,
        messages=[{"role": "user", "content": f"hi {PROMPT_MARK}"}],
        extra_headers={"traceparent": "00-not-a-trace-id-01"})
    span = span_of(receiver, traced, key)
    assert span.parent_span_id == "" and len(span.trace_id) == 32
    # The upstream gets tokenfuse's own (valid) context instead of the malformed header.
    sent = record_of(fake, key).headers["traceparent"]
    assert sent.startswith(f"00-{span.trace_id}-{span.span_id}-"), sent


@pytest.fixture(scope="module")
def vkey(traced: Stack) -> str:
    created = traced.cli("vkey", "create", "--name", "traced-app", "--pool", "traced")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    SECRETS.add(key)
    return key


def test_gateway_key_span_names_the_pool_not_the_keys(traced: Stack, fake: FakeProvider,
                                                      receiver: OtlpReceiver,
                                                      vkey: str) -> None:
    since = len(fake.records)
    openai_client(traced, vkey).chat.completions.create(
        model="gpt-4o-mini", max_tokens=5,
        messages=[{"role": "user", "content": f"pooled {PROMPT_MARK}"}])
    span = span_of(receiver, traced, vkey)
    record = next(r for r in list(fake.records)[since:] if key_of(r) == POOL_SECRET)
    assert record.usage is not None
    assert span.attributes["tokenfuse.pool"] == "traced"
    assert span.attributes["tokenfuse.pool_key_id_prefix"] == prefix(traced, POOL_SECRET)
    assert span.attributes["tokenfuse.spend_nano_usd"] == usage_cost(record.usage)


def test_no_key_or_prompt_in_any_exported_value(traced: Stack, fake: FakeProvider,
                                                receiver: OtlpReceiver, vkey: str) -> None:
    """A call of each kind (plain, streamed, refused, pooled), then every span the
    receiver holds is scanned (those of the other tests here too, when they ran first)."""
    keys = [new_key() for _ in range(3)]
    set_daily(traced, keys[2], 1)
    for key, stream in ((keys[0], False), (keys[1], True), (keys[2], False), (vkey, False)):
        try:
            answer = openai_client(traced, key).chat.completions.create(
                model="gpt-4o-mini", max_tokens=5, stream=stream,
                messages=[{"role": "user", "content": f"scan {PROMPT_MARK}"}],
                extra_headers={"traceparent": traceparent()[0]})
            if stream:
                list(answer)
        except openai.APIStatusError as refused:
            assert key == keys[2] and refused.status_code == 402
    for key in keys:
        span_of(receiver, traced, key)
    spans = receiver.spans
    texts = [v if isinstance(v, str) else json.dumps(v)
             for span in spans for v in span.values()]
    assert texts
    for secret in SECRETS | {traced.secret}:
        leaks = [t for t in texts if secret in t]
        assert not leaks, (secret[:12], leaks[:3])


def test_tracing_off_sends_nothing(fake: FakeProvider) -> None:
    """OTEL_TRACES_EXPORTER=none beside an endpoint: off. The processor's shutdown flushes
    every queued span, so after it nothing can still arrive."""
    quiet = OtlpReceiver()
    quiet.start()
    stack = Stack(fake.base_url, {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": quiet.endpoint,
                                  "OTEL_TRACES_EXPORTER": "none"})
    try:
        stack.start()
        key = new_key()
        with httpx.Client(timeout=30) as client:
            answered = client.post(
                stack.envoy.base_url + "/openai/v1/chat/completions",
                headers={"authorization": f"Bearer {key}",
                         "traceparent": traceparent()[0]},
                json={"model": "gpt-4o-mini", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "hi"}]})
        assert answered.status_code == 200
        record = record_of(fake, key)
        assert record.usage is not None
        stack.processor.stop()
        assert "traces exported" not in stack.processor.log_text()
        assert quiet.requests == 0 and quiet.spans == []
    finally:
        stack.cleanup()
        quiet.stop()


def test_each_worker_exports_its_own_spans(fake: FakeProvider,
                                          receiver: OtlpReceiver) -> None:
    """TOKENFUSE_PROCESSES=2: both workers' spans arrive, each call's once, each worker
    named in its resource (`tokenfuse.worker`, its own `service.instance.id`)."""
    stack = Stack(fake.base_url, {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                  "TOKENFUSE_PROCESSES": "2"})
    try:
        stack.start()
        keys = [new_key() for _ in range(12)]
        for key in keys:
            openai_client(stack, key).chat.completions.create(
                model="gpt-4o-mini", max_tokens=5,
                messages=[{"role": "user", "content": "hello"}])
        spans = [span_of(receiver, stack, key) for key in keys]
        assert len({s.span_id for s in spans}) == 12
        assert {s.resource["tokenfuse.worker"] for s in spans} == {0, 1}
        assert len({s.resource["service.instance.id"] for s in spans}) == 2
        for key in keys:
            wanted = prefix(stack, key)
            assert sum(1 for s in receiver.spans
                       if s.attributes.get("tokenfuse.key_id_prefix") == wanted) == 1
        # Redis gone: fail closed (503), and the span says why.
        stack.redis.stop()
        key = new_key()
        with pytest.raises(openai.InternalServerError):
            openai_client(stack, key).chat.completions.create(
                model="gpt-4o-mini", max_tokens=5,
                messages=[{"role": "user", "content": "hello"}])
        span = span_of(receiver, stack, key)
        assert span.status_code == STATUS_ERROR
        assert span.attributes["tokenfuse.decision"] == "error"
        assert span.attributes["tokenfuse.refusal"] == "state_store_unavailable"
        assert span.attributes["http.response.status_code"] == 503
    finally:
        stack.cleanup()


def test_unreachable_collector_never_holds_a_request(fake: FakeProvider) -> None:
    """Export runs on the SDK's own thread: with no collector listening, calls are
    answered and settled as usual."""
    stack = Stack(fake.base_url, {**OTEL_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT":
                                  f"http://127.0.0.1:{free_port()}",
                                  "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    try:
        stack.start()
        key = new_key()
        client = openai_client(stack, key)
        for _ in range(3):
            client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=5,
                messages=[{"role": "user", "content": f"hi {uuid.uuid4().hex}"}])
        assert requests_for(fake, key) == 3
        spent = day_window(stack, key)["spent_nano_usd"]
        assert spent == billed_for(fake, key) > 0, spent
        assert stack.processor.running()
    finally:
        stack.cleanup()


def test_tracing_off_loads_no_sdk() -> None:
    """No endpoint: the processor never loads the SDK's tracing nor the exporter (redis-py
    imports `opentelemetry.sdk.metrics` by itself when it is installed, and uses it only
    when an application initialises its observability, which tokenfuse never does)."""
    code = ("import sys, tokenfuse.server, tokenfuse.extproc.service\n"
            "from tokenfuse.config import load_settings\n"
            "from tokenfuse.tracing import start_tracing\n"
            "assert start_tracing(load_settings({}).tracing) is None\n"
            "print(sorted(m for m in sys.modules if m.startswith(\n"
            "    ('opentelemetry.sdk.trace', 'opentelemetry.exporter', 'requests'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tracing_settings() -> None:
    on = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}).tracing
    assert on.enabled and on.endpoint == "http://collector:4318/v1/traces"
    exact = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://b/x"}).tracing
    assert exact.endpoint == "https://b/x"
    assert not load_settings({}).tracing.enabled
    assert not load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                              "OTEL_SDK_DISABLED": "true"}).tracing.enabled
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
                       "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"})

