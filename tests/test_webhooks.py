"""Signed webhooks: payload and signature at a real local receiver; a dead or slow
receiver never affects requests nor the other receivers; redirects are never followed;
SSRF checks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from tests.conftest import openai_client
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, free_port, wait_until
from tokenfuse.events.webhooks import (
    PublicOnlyResolver,
    WebhookConfigError,
    WebhookSink,
    validate_urls,
)
from tokenfuse.identity import PREFIX_CHARS, key_id
from tokenfuse.metrics import REGISTRY

SECRET = "whsec-test-secret"


class Receiver:
    """A webhook endpoint on loopback recording what it gets."""

    def __init__(self, hold: threading.Event | None = None, status: int = 204,
                 location: str | None = None) -> None:
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.methods: list[str] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if hold is not None:
                    hold.wait(30)  # a receiver that hangs until the test lets it go
                with receiver.cond:
                    receiver.methods.append(self.command)
                    if body:
                        receiver.events.append(
                            ({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.cond.notify_all()
                self.send_response(status)
                if location is not None:
                    self.send_header("location", location)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST  # a followed 302/303 arrives as a GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, event: str) -> list[dict]:
        with self.cond:
            return [json.loads(b) for _, b in self.events if json.loads(b)["event"] == event]

    def wait_for(self, event: str, count: int = 1) -> list[dict]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.of(event)) >= count, timeout=20)
        found = self.of(event)
        assert len(found) >= count, f"expected {count} {event} events, got {len(found)}"
        return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def hooked(fake: FakeProvider, receiver: Receiver) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_WEBHOOK_URLS": receiver.url,
                              "TOKENFUSE_WEBHOOK_SECRET": SECRET,
                              "TOKENFUSE_WEBHOOK_ALLOW_PRIVATE": "1"}).start()
    yield s
    s.cleanup()


def ask(stack: Stack, key: str, content: str, max_tokens: int = 3) -> None:
    openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=max_tokens,
        messages=[{"role": "user", "content": content}])


def _loop(stack: Stack, key: str) -> None:
    for _ in range(5):
        ask(stack, key, "loop me")
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            ask(stack, key, "loop me")


def test_loop_detected_is_signed_and_complete(hooked: Stack, receiver: Receiver,
                                              api_key: str) -> None:
    _loop(hooked, api_key)
    prefix = key_id(hooked.secret.encode(), api_key)[:PREFIX_CHARS]
    wait_until(lambda: any(e["key_id_prefix"] == prefix for e in receiver.of("loop.detected")),
               what="loop.detected webhook")
    headers, body = next((h, b) for h, b in list(receiver.events)
                         if json.loads(b)["key_id_prefix"] == prefix)
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-tokenfuse-signature"] == expected
    assert headers["x-tokenfuse-event"] == "loop.detected"
    payload = json.loads(body)
    assert set(payload) == {"event", "timestamp", "request_id", "key_id_prefix", "provider",
                            "data"}
    assert payload["provider"] == "openai"
    assert payload["timestamp"].endswith("Z") and payload["request_id"]
    data = payload["data"]
    assert data["hit_count"] == 6 and data["cooldown_seconds"] == 30
    assert data["model"] == "gpt-4o-mini" and re.fullmatch(r"[0-9a-f]{12}\.\.\.",
                                                            data["fingerprint"])
    assert api_key not in body.decode()
    # The 7th refusal (same block, in cooldown) sent no second event.
    assert sum(e["key_id_prefix"] == prefix for e in receiver.of("loop.detected")) == 1


def test_near_duplicate_loop_detected_once_per_block(hooked: Stack, receiver: Receiver,
                                                    api_key: str) -> None:
    client = openai_client(hooked, api_key)

    def attempt(n: int) -> None:  # a stuck agent: new attempt number, the same answer
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=3, extra_headers={"x-fake-answer-seed": "same"},
            messages=[{"role": "user", "content": f"poll job (attempt {n})"}])

    for n in range(5):
        attempt(n)
    for n in range(5, 7):
        with pytest.raises(openai.RateLimitError):
            attempt(n)
    prefix = key_id(hooked.secret.encode(), api_key)[:PREFIX_CHARS]
    wait_until(lambda: any(e["key_id_prefix"] == prefix for e in receiver.of("loop.detected")),
               what="loop.detected webhook")
    events = [e for e in receiver.of("loop.detected") if e["key_id_prefix"] == prefix]
    assert len(events) == 1
    data = events[0]["data"]
    assert (data["kind"], data["hit_count"], data["cooldown_seconds"]) == (
        "near_duplicate_loop", 6, 60)


def test_budget_threshold_and_exceeded_once_per_window(hooked: Stack, receiver: Receiver,
                                                       api_key: str) -> None:
    prefix = key_id(hooked.secret.encode(), api_key)[:PREFIX_CHARS]
    hooked.cli("budget", "set", "--key", api_key, "--daily", "0.00002")  # 20,000 nano-USD
    ask(hooked, api_key, "first", max_tokens=28)  # reserves ~18,000: crosses 80 %
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            ask(hooked, api_key, "more please", max_tokens=28)

    def mine(event: str) -> list[dict]:
        return [e for e in receiver.of(event) if e["key_id_prefix"] == prefix]

    wait_until(lambda: mine("budget.threshold") and mine("budget.exceeded"),
               what="budget webhooks")
    assert {e["data"]["window"] for e in mine("budget.threshold")} == {"day"}
    exceeded = mine("budget.exceeded")[0]["data"]
    assert exceeded["window"] == "day" and exceeded["limit_nano_usd"] == 20_000
    _loop(hooked, api_key + "-barrier")  # a later event, as a barrier
    barrier = key_id(hooked.secret.encode(), api_key + "-barrier")[:PREFIX_CHARS]
    wait_until(lambda: any(e["key_id_prefix"] == barrier for e in receiver.of("loop.detected")),
               what="barrier event")
    assert len(mine("budget.exceeded")) == 1 and len(mine("budget.threshold")) == 1


def test_dead_and_slow_receivers_never_affect_requests(fake: FakeProvider,
                                                       api_key: str) -> None:
    release = threading.Event()
    slow = Receiver(hold=release)
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    s = Stack(fake.base_url, {"TOKENFUSE_WEBHOOK_URLS": f"{dead},{slow.url}",
                              "TOKENFUSE_WEBHOOK_SECRET": SECRET,
                              "TOKENFUSE_WEBHOOK_ALLOW_PRIVATE": "1",
                              "TOKENFUSE_WEBHOOK_QUEUE_SIZE": "1",
                              "TOKENFUSE_WEBHOOK_MAX_ATTEMPTS": "2"}).start()
    try:
        # Eight loop blocks on eight keys: eight events, while the receiver hangs. Its four
        # workers can each hold one event and its queue one more: the rest must be dropped.
        for i in range(8):
            _loop(s, f"{api_key}-{i}")
        assert openai_client(s, api_key).models.list().data  # traffic still flows
        wait_until(lambda: 'outcome="failed"' in s.processor.metrics(),
                   what="failed deliveries to be counted")
        metrics = s.processor.metrics()
        assert re.search(r'tokenfuse_webhooks_total\{event="loop.detected",'
                         r'outcome="dropped_queue_full"\} [1-9]', metrics)
    finally:
        release.set()
        s.cleanup()
        slow.server.shutdown()


def outcome(event: str, name: str) -> float:
    """tokenfuse_webhooks_total{event, outcome} in this process (the sinks below run here)."""
    return REGISTRY.get_sample_value("tokenfuse_webhooks_total",
                                     {"event": event, "outcome": name}) or 0.0


class Running:
    """A WebhookSink delivering on its own event loop in a thread, so the test can poll
    the receivers and metrics from its own thread with `wait_until`."""

    def __init__(self, sink: WebhookSink) -> None:
        self.sink = sink
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(sink.run())
            started.set()
            with suppress(asyncio.CancelledError):
                self.loop.run_until_complete(self.task)
            self.loop.close()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert started.wait(5)

    def emit(self, event: str, count: int = 1, first: int = 0) -> None:
        def put() -> None:
            for i in range(first, first + count):
                self.sink.emit(event, f"req-{i}", "abcd1234", {"i": i})

        self.loop.call_soon_threadsafe(put)

    def stop(self) -> None:
        assert self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)


@contextmanager
def running(urls: list[str], timeout_s: float, max_attempts: int, queue_size: int = 1000,
            workers: int = 4) -> Iterator[Running]:
    r = Running(WebhookSink(urls, SECRET.encode(), queue_size=queue_size, allow_private=True,
                            timeout_s=timeout_s, max_attempts=max_attempts, workers=workers))
    try:
        yield r
    finally:
        r.stop()


@contextmanager
def hanging_receiver() -> Iterator[str]:
    """A webhook URL whose server accepts every connection and never answers."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize("status", [302, 307])
def test_redirects_are_never_followed(status: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenfuse.webhooks")
    inside = Receiver()  # stands for 127.0.0.1 behind a public receiver
    redirector = Receiver(status=status, location=f"{inside.url}?token=s3cret-{status}")
    event = f"test.redirect.{status}"
    try:
        with running([redirector.url], max_attempts=3, timeout_s=5.0) as sink:
            sink.emit(event)
            wait_until(lambda: outcome(event, "redirect_refused") == 1,
                       what="the redirect to be refused")
            # A barrier: a later event through the same queue has been handled too.
            sink.emit(event, first=1)
            wait_until(lambda: outcome(event, "redirect_refused") == 2, what="barrier")
        assert inside.methods == []  # the signed POST never reached the location
        assert redirector.methods == ["POST", "POST"]  # one attempt each: not retried
        assert outcome(event, "delivered") == 0 and outcome(event, "failed") == 0
        refused = [r.getMessage() for r in caplog.records if "redirect" in r.getMessage()]
        assert refused and f"HTTP {status}" in refused[0] and "127.0.0.1" in refused[0]
        assert f"s3cret-{status}" not in caplog.text and "/hook" not in caplog.text
    finally:
        inside.server.shutdown()
        redirector.server.shutdown()


def test_hanging_receiver_does_not_starve_the_others() -> None:
    healthy = Receiver()
    event = "test.starve"
    try:
        with hanging_receiver() as hung, running([hung, healthy.url], timeout_s=5.0,
                                                 max_attempts=2, queue_size=100) as sink:
            sink.emit(event, count=40)
            # Well inside the hung receiver's first 5 s timeout: before the fix, every
            # event waited for it (timeout, backoff, timeout) before the healthy one.
            wait_until(lambda: len(healthy.of(event)) == 40, timeout=4.0,
                       what="all 40 events at the healthy receiver")
            assert outcome(event, "delivered") == 40
            assert outcome(event, "failed") == 0  # the hung one has not even timed out
        assert sorted(e["data"]["i"] for e in healthy.of(event)) == list(range(40))
    finally:
        healthy.server.shutdown()


def test_each_receiver_queue_fills_and_drops_on_its_own() -> None:
    healthy = Receiver()
    event = "test.queues"
    try:
        with hanging_receiver() as hung, running([hung, healthy.url], timeout_s=30.0,
                                                 max_attempts=1, queue_size=2,
                                                 workers=1) as sink:
            for i in range(10):
                sink.emit(event, first=i)
                wait_until(lambda n=i + 1: len(healthy.of(event)) == n,
                           what=f"event {i} at the healthy receiver")
            # The hung receiver's worker holds event 0, its queue 1 and 2: 3..9 dropped.
            assert outcome(event, "dropped_queue_full") == 7
            assert outcome(event, "delivered") == 10
    finally:
        healthy.server.shutdown()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://10.1.2.3/x", "http://192.168.0.5/x",
    "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://0.0.0.0/x",
    "ftp://example.com/x", "http://user:pw@example.com/x",
])
def test_ssrf_targets_refused(url: str) -> None:
    with pytest.raises(WebhookConfigError):
        validate_urls([url], allow_private=False)


def test_public_targets_and_explicit_private_allowed() -> None:
    assert validate_urls(["https://hooks.example.com/x", "http://8.8.8.8/x"], False)
    assert validate_urls(["http://127.0.0.1:9/x"], allow_private=True)


def test_resolver_refuses_names_that_resolve_inside() -> None:
    async def resolve() -> None:
        resolver = PublicOnlyResolver()
        try:
            await resolver.resolve("localhost", 80)
        finally:
            await resolver.close()

    with pytest.raises(OSError, match="no public address"):
        asyncio.run(resolve())


def test_webhook_urls_require_a_secret(fake: FakeProvider, monkeypatch) -> None:
    from tokenfuse.config import ConfigError, load_settings

    monkeypatch.setenv("TOKENFUSE_WEBHOOK_URLS", "https://hooks.example.com/x")
    monkeypatch.delenv("TOKENFUSE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ConfigError, match="SECRET"):
        load_settings()
