"""Fail-closed: Redis down or slow, processor killed or stalled → 503 JSON, nothing
forwarded; and recovery without restarting anything else. Uses its own stack."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import openai
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import openai_client
from tests.support.billing import requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until


@pytest.fixture(scope="module")
def own_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url).start()
    yield s
    s.cleanup()


def _ask(stack: Stack, key: str) -> openai.types.chat.ChatCompletion:
    return openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "ping"}])


def _refused_503(stack: Stack, key: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as raised:
        _ask(stack, key)
    error = raised.value
    assert error.status_code == 503
    assert error.response.headers.get("retry-after")
    assert error.response.headers["content-type"].startswith("application/json")
    return error


def test_redis_down_then_back(own_stack: Stack, fake: FakeProvider, api_key: str) -> None:
    assert _ask(own_stack, api_key).usage is not None
    own_stack.redis.stop()
    before = requests_for(fake, api_key)
    for _ in range(3):
        error = _refused_503(own_stack, api_key)
        assert error.response.json()["error"]["code"] == "state_store_unavailable"
    assert requests_for(fake, api_key) == before
    own_stack.redis.start()  # same port, empty state; processor and envoy untouched
    assert _ask(own_stack, api_key).usage is not None
    assert requests_for(fake, api_key) == before + 1
    assert "tokenfuse_redis_errors_total" in own_stack.processor.metrics()


def test_redis_slower_than_the_bound(own_stack: Stack, fake: FakeProvider,
                                     api_key: str) -> None:
    client = own_stack.redis.client()
    before = requests_for(fake, api_key)
    # Block Redis for 2 s (> TOKENFUSE_REDIS_TIMEOUT_MS=250) while a request arrives.
    blocker = threading.Thread(target=lambda: client.execute_command("DEBUG", "SLEEP", "2"))
    blocker.start()
    wait_until(lambda: not _answers_quickly(own_stack), what="redis to be blocked")
    try:
        error = _refused_503(own_stack, api_key)
        assert error.response.json()["error"]["code"] == "state_store_unavailable"
    finally:
        blocker.join()
    assert requests_for(fake, api_key) == before
    assert _ask(own_stack, api_key).usage is not None


def _answers_quickly(stack: Stack) -> bool:
    try:
        return bool(redis.Redis(port=stack.redis.port, socket_timeout=0.05,
                                retry=Retry(NoBackoff(), 0)).ping())
    except redis.RedisError:
        return False


def test_processor_killed_then_back(own_stack: Stack, fake: FakeProvider, api_key: str) -> None:
    assert _ask(own_stack, api_key).usage is not None
    own_stack.processor.kill()
    before = requests_for(fake, api_key)
    error = _refused_503(own_stack, api_key)
    body = error.response.json()
    assert body["error"]["code"] == "processor_unavailable"
    assert "nothing was forwarded" in body["error"]["message"]
    assert requests_for(fake, api_key) == before
    own_stack.processor.start()
    assert _ask(own_stack, api_key).usage is not None
    assert requests_for(fake, api_key) == before + 1


def test_processor_stalled_times_out_closed(own_stack: Stack, fake: FakeProvider,
                                            api_key: str) -> None:
    before = requests_for(fake, api_key)
    proc = own_stack.processor.proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        error = _refused_503(own_stack, api_key)
        assert error.response.json()["error"]["code"] == "processor_unavailable"
    finally:
        proc.send_signal(signal.SIGCONT)
    assert requests_for(fake, api_key) == before
    assert _ask(own_stack, api_key).usage is not None
