"""Health probes and the SIGTERM drain, through the real stack (Envoy, processor, Redis).

/healthz is the processor's event loop answering; /readyz is Redis, the Lua scripts, the
price table and not draining. SIGTERM: new requests get 503 `draining` with retry-after
(never forwarded), readiness turns 503 at once, in-flight streams finish and settle to
the provider's bill, and the processor exits when they are done, or at
TOKENFUSE_DRAIN_TIMEOUT_SECONDS with the streams still open cut and settled.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import openai_client
from tests.support.billing import billed_for, billed_total_for, day_window, requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Processor, Stack, wait_until
from tokenfuse.identity import key_id
from tokenfuse.state import scripts
from tokenfuse.state.keys import reservations_key
from tokenfuse.state.readiness import DECISION_SCRIPTS


def probe(stack: Stack, what: str) -> tuple[int, dict[str, Any]]:
    """GET /healthz or /readyz on the metrics port: (status, JSON body)."""
    url = f"http://127.0.0.1:{stack.processor.metrics_port}/{what}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def ready(stack: Stack) -> bool:
    return probe(stack, "readyz")[0] == 200


def post_chat(stack: Stack, key: str, provider: str = "openai"
              ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A plain chat call (OpenAI's or Anthropic's), as raw HTTP: (status, headers, body)."""
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 8,
                            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    path = "/openai/v1/chat/completions"
    if provider == "anthropic":
        body["model"], path = "claude-haiku-4-5", "/anthropic/v1/messages"
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01",
                   "content-type": "application/json"}
    request = urllib.request.Request(stack.envoy.base_url + path, method="POST",
                                     data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, json.loads(err.read())


class SlowStream:
    """A streamed chat completion read in a thread: `started` once the first token is
    in, then `result` ("completed" or the exception's name) and the text."""

    def __init__(self, stack: Stack, key: str, tokens: int, delay_ms: int) -> None:
        self.started, self.done = threading.Event(), threading.Event()
        self.result = ""
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.ended_at = 0.0
        self._args = (stack, key, tokens, delay_ms)
        self._thread = threading.Thread(target=self._consume, daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        stack, key, tokens, delay_ms = self._args
        try:
            for chunk in openai_client(stack, key).chat.completions.create(
                    model="gpt-4o-mini", stream=True, max_tokens=tokens,
                    stream_options={"include_usage": True},
                    extra_headers={"x-fake-chunk-delay-ms": str(delay_ms),
                                   "x-fake-output-tokens": str(tokens)},
                    messages=[{"role": "user", "content": "take your time"}]):
                for choice in chunk.choices:
                    self.text.append(choice.delta.content or "")
                    self.finish_reason = choice.finish_reason or self.finish_reason
                    self.started.set()
            self.result = "completed"
        except Exception as exc:  # the stream breaks when it is cut
            self.result = type(exc).__name__
        finally:
            self.ended_at = time.monotonic()
            self.started.set()
            self.done.set()


@pytest.fixture(scope="module")
def shared_stack(fake: FakeProvider) -> Iterator[Stack]:
    stack = Stack(fake.base_url).start()
    yield stack
    stack.cleanup()


@pytest.fixture
def drain_stack(request: pytest.FixtureRequest, fake: FakeProvider,
                shared_stack: Stack) -> Iterator[Stack]:
    """A processor of the test's own (`request.param`: its env), started afresh when the
    previous test stopped it; TOKENFUSE_PROCESSES (Envoy's endpoints) gets a whole stack."""
    extra = getattr(request, "param", {})
    if "TOKENFUSE_PROCESSES" in extra:
        stack = Stack(fake.base_url, extra).start()
        yield stack
        stack.cleanup()
        return
    stack = shared_stack
    env = {**stack.env, **extra}
    if not stack.processor.running() or stack.processor.env != env:
        stack.processor.stop()
        stack.processor.log_path.write_bytes(b"")  # the log of this test's processor only
        stack.processor = Processor(stack.workdir, env)
        stack.processor.start()
    else:
        stack.processor.log_path.write_bytes(b"")
    yield stack


def sigterm(stack: Stack) -> float:
    assert stack.processor.proc is not None
    stack.processor.proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def exited_at(stack: Stack, timeout: float) -> float:
    proc = stack.processor.proc
    assert proc is not None
    proc.wait(timeout=timeout)
    return time.monotonic()


def test_probes_follow_redis(drain_stack: Stack) -> None:
    stack = drain_stack
    assert probe(stack, "healthz") == (200, {"status": "alive",
                                             "checks": {"event_loop": "ok"}})
    status, doc = probe(stack, "readyz")
    assert (status, doc) == (200, {"status": "ready", "checks": {
        "redis": "ok", "scripts": "ok", "prices": "ok", "drain": "ok"}})
    # Readiness loaded the decision scripts (Redis had none before the first request).
    shas = [scripts.load(name).sha for name in DECISION_SCRIPTS]
    assert all(stack.redis.client().script_exists(*shas))

    # A Redis that does not answer: not ready within the Redis timeout (250 ms).
    assert stack.redis.proc is not None
    stack.redis.proc.send_signal(signal.SIGSTOP)
    try:
        asked = time.monotonic()
        status, doc = probe(stack, "readyz")
        took = time.monotonic() - asked
    finally:
        stack.redis.proc.send_signal(signal.SIGCONT)
    assert status == 503 and doc["checks"]["redis"] == "unreachable (TimeoutError)"
    print(f"readiness answered 503 {took:.3f} s after the probe with Redis stopped")
    assert took < 1.5, took
    wait_until(lambda: ready(stack), what="readiness once Redis answers again")

    stack.redis.stop()
    status, doc = probe(stack, "readyz")
    assert status == 503 and doc["failed"] == ["redis", "scripts"]
    assert doc["checks"]["redis"].startswith("unreachable")
    assert doc["checks"]["prices"] == "ok" and doc["checks"]["drain"] == "ok"
    assert probe(stack, "healthz")[0] == 200  # alive: a restart would not bring Redis back

    stack.redis.start()  # same port, empty: the scripts are gone
    assert not any(stack.redis.client().script_exists(*shas))
    wait_until(lambda: ready(stack), what="readiness after Redis is back")
    assert all(stack.redis.client().script_exists(*shas))


def test_sigterm_lets_the_stream_finish_and_refuses_new_requests(
        drain_stack: Stack, fake: FakeProvider, api_key: str) -> None:
    stack = drain_stack
    assert ready(stack)
    # 250 tokens at 20 ms each: 5 s of stream after the first token, for the probes and
    # a refused request to happen while it runs.
    stream = SlowStream(stack, api_key, tokens=250, delay_ms=20)
    assert stream.started.wait(20) and not stream.done.is_set()
    signalled = sigterm(stack)

    wait_until(lambda: not ready(stack), timeout=5, what="readiness to turn 503")
    status, doc = probe(stack, "readyz")
    assert doc["failed"] == ["drain"] and doc["checks"]["drain"] == "draining"
    assert probe(stack, "healthz")[0] == 200  # draining is not dead

    newcomer = "sk-test-new-" + api_key[-12:]
    status, headers, body = post_chat(stack, newcomer)
    assert status == 503 and headers["retry-after"] == "1"
    assert body["error"]["code"] == "draining" and body["error"]["type"]  # OpenAI's shape
    status, headers, body = post_chat(stack, newcomer, "anthropic")
    assert (status, headers["retry-after"]) == (503, "1")
    assert body["type"] == "error" and body["error"]["code"] == "draining"  # Anthropic's
    assert requests_for(fake, newcomer) == 0 and fake.in_flight(newcomer) == 0
    assert not stream.done.is_set()  # the refusal came while the stream still ran

    assert stream.done.wait(30)
    assert stream.result == "completed" and stream.finish_reason == "length"
    assert len([t for t in stream.text if t]) == 250
    ended = exited_at(stack, timeout=10)
    assert stack.processor.proc is not None and stack.processor.proc.returncode == 0
    print(f"stream ended {stream.ended_at - signalled:.2f} s after SIGTERM; processor "
          f"exited {ended - stream.ended_at:.2f} s after the stream ended")
    assert ended - stream.ended_at < 10  # not the 30 s bound: nothing was left open
    fake.wait_idle(api_key)
    day = day_window(stack, api_key)
    assert day["spent_nano_usd"] == billed_for(fake, api_key) > 0
    assert day["reserved_nano_usd"] == 0
    assert "drained in" in stack.processor.log_text()


@pytest.mark.parametrize("drain_stack", [{"TOKENFUSE_DRAIN_TIMEOUT_SECONDS": "2"}],
                         indirect=True)
def test_a_stream_that_outlives_the_bound_is_cut_and_settled(
        drain_stack: Stack, fake: FakeProvider, api_key: str) -> None:
    stack = drain_stack
    # 600 tokens at 50 ms each: half a minute, far past the 2 s bound.
    stream = SlowStream(stack, api_key, tokens=600, delay_ms=50)
    assert stream.started.wait(20)
    signalled = sigterm(stack)
    ended = exited_at(stack, timeout=15)
    print(f"processor exited {ended - signalled:.2f} s after SIGTERM (bound 2 s)")
    assert 2 <= ended - signalled < 2 + 6  # the bound, then the cut streams settle
    assert stream.done.wait(10) and stream.result != "completed"
    assert "bound reached with 1 stream(s) still open" in stack.processor.log_text()
    assert fake.wait_idle(api_key)
    # Settled at the cut (what was counted plus the grace), not left for the reaper.
    caller = key_id(stack.secret.encode(), api_key)
    assert stack.redis.client().hlen(reservations_key(caller)) == 0
    day = day_window(stack, api_key)
    assert day["reserved_nano_usd"] == 0
    assert 0 < billed_total_for(fake, api_key) <= day["spent_nano_usd"]


@pytest.mark.parametrize("drain_stack", [{"TOKENFUSE_PROCESSES": "2"}], indirect=True)
def test_supervisor_probes_and_drains_every_worker(
        drain_stack: Stack, fake: FakeProvider, api_key: str) -> None:
    stack = drain_stack
    wait_until(lambda: ready(stack), what="both workers ready")
    status, doc = probe(stack, "readyz")
    assert status == 200 and len(doc["processes"]) == 2
    assert all(p == {"redis": "ok", "scripts": "ok", "prices": "ok", "drain": "ok"}
               for p in doc["processes"])
    assert probe(stack, "healthz")[0] == 200
    # A worker whose event loop does not answer fails both probes, named.
    assert stack.processor.proc is not None
    stuck = worker_pids(stack.processor.proc.pid)[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        status, doc = probe(stack, "healthz")
        assert status == 503 and doc["failed"] == ["event_loop"]
        assert doc["checks"]["event_loop"].startswith("process 1: no answer in 1 s")
        assert probe(stack, "readyz")[1]["failed"] == ["processor"]
    finally:
        os.kill(stuck, signal.SIGCONT)
    wait_until(lambda: probe(stack, "healthz")[0] == 200 and ready(stack),
               what="the worker to answer again")
    # Streams on both workers: Envoy balances its ext_proc streams over both sockets.
    streams = [SlowStream(stack, f"{api_key}-{i}", tokens=80, delay_ms=20) for i in range(4)]
    assert all(s.started.wait(20) for s in streams)
    deciding = {line.split()[2] for line in stack.processor.log_text().splitlines()
                if "tokenfuse.processor reserved" in line}  # the pid field of the log
    assert len(deciding) == 2  # round robin: streams on each worker
    sigterm(stack)
    wait_until(lambda: not ready(stack), timeout=5, what="readiness to turn 503")
    status, headers, body = post_chat(stack, api_key + "-new")
    assert (status, headers["retry-after"], body["error"]["code"]) == (503, "1", "draining")
    assert requests_for(fake, api_key + "-new") == 0
    for i, stream in enumerate(streams):
        assert stream.done.wait(30) and stream.result == "completed"
        fake.wait_idle(f"{api_key}-{i}")
        day = day_window(stack, f"{api_key}-{i}")
        assert day["spent_nano_usd"] == billed_for(fake, f"{api_key}-{i}") > 0
        assert day["reserved_nano_usd"] == 0
    exited_at(stack, timeout=10)
    assert stack.processor.proc is not None and stack.processor.proc.returncode == 0


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes, in the order of their --worker index."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker" in argv and argv[argv.index(b"--worker") + 2:][:1] == [
                str(supervisor).encode()]:
            found[int(argv[argv.index(b"--worker") + 1])] = int(entry.name)
    return [found[i] for i in sorted(found)]


def test_a_second_sigterm_ends_the_drain_at_once(drain_stack: Stack, api_key: str) -> None:
    stack = drain_stack
    stream = SlowStream(stack, api_key, tokens=600, delay_ms=50)
    assert stream.started.wait(20)
    sigterm(stack)
    wait_until(lambda: not ready(stack), timeout=5, what="readiness to turn 503")
    again = sigterm(stack)
    ended = exited_at(stack, timeout=10)
    print(f"processor exited {ended - again:.2f} s after the second SIGTERM")
    assert ended - again < 5  # not the 30 s bound
    assert stream.done.wait(10) and stream.result != "completed"
    assert "drain interrupted with 1 stream(s) still open" in stack.processor.log_text()
    caller = key_id(stack.secret.encode(), api_key)
    assert stack.redis.client().hlen(reservations_key(caller)) == 0
