"""Shared fixtures: one fake provider and one full stack (redis + processor + envoy) per
session; tests isolate themselves by using a fresh API key each (budgets are per key)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.support.fake_provider import FakeProvider
from tests.support.harness import RedisServer, Stack
from tests.support.leaks import assert_no_key_leaked, keys_sent
from tests.support.otlp_receiver import OtlpReceiver


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    provider = FakeProvider()
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture(scope="session")
def stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url).start()
    try:
        yield s
        if s.processor.running() and s.redis.running():  # (a test may have stopped one)
            assert_no_key_leaked(s, keys_sent(fake), after_traffic=False)
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    """A local OTLP/HTTP collector (tests/support/otlp_receiver.py) for a module's stacks."""
    r = OtlpReceiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api_key() -> str:
    """A fresh caller key per test: its budget counters start at zero."""
    return "sk-test-" + uuid.uuid4().hex


def openai_client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.envoy.base_url + "/openai/v1", api_key=key,
                         max_retries=0, timeout=30)


def anthropic_client(stack: Stack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.envoy.base_url + "/anthropic", api_key=key,
                               max_retries=0, timeout=30)
