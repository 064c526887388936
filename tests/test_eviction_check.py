"""The processor refuses to start on a Redis that may evict its keys (maxmemory-policy not
noeviction), unless TOKENFUSE_ALLOW_EVICTION=1 (then it warns); a Redis whose CONFIG is
renamed away (managed services) is refused the same way, with that reason."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_provider import FakeProvider
from tests.support.harness import RedisServer, ServiceFailed, Stack, wait_until
from tokenfuse.state import eviction
from tokenfuse.state.connection import async_client


class ConfiguredRedis(RedisServer):
    """The harness's redis-server with extra options."""

    def __init__(self, workdir: Path, *options: str) -> None:
        super().__init__(workdir)
        self.options = list(options)

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.workdir), *self.options])
        wait_until(self._ready, what="redis-server")


@pytest.fixture
def lru_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url)
    lru = ConfiguredRedis(s.workdir, "--maxmemory-policy", "allkeys-lru")
    assert s.redis is not None
    lru.port, lru.url = s.redis.port, s.redis.url  # the stack's REDIS_URL
    s.redis = lru
    yield s
    s.cleanup()


def test_the_harness_redis_is_noeviction(redis_server: RedisServer) -> None:
    assert redis_server.client().config_get("maxmemory-policy") == {
        "maxmemory-policy": "noeviction"}


def test_an_evicting_redis_is_refused_at_start(lru_stack: Stack) -> None:
    lru_stack.redis.start()
    with pytest.raises(ServiceFailed):
        lru_stack.processor.start()
    assert lru_stack.processor.proc is not None
    assert lru_stack.processor.proc.returncode == 2
    log = lru_stack.processor.log_text()
    assert (f"Redis maxmemory-policy is 'allkeys-lru' on 127.0.0.1:{lru_stack.redis.port}"
            in log)
    assert "set maxmemory-policy noeviction" in log
    assert "TOKENFUSE_ALLOW_EVICTION=1" in log
    assert not lru_stack.processor.socket.exists()  # it never listened


def test_allowed_eviction_starts_with_a_warning(lru_stack: Stack) -> None:
    lru_stack.env["TOKENFUSE_ALLOW_EVICTION"] = "1"
    lru_stack.start()
    log = lru_stack.processor.log_text()
    assert "WARNING" in log and "'allkeys-lru'" in log and "starting anyway" in log
    assert lru_stack.processor.running()


def test_a_redis_that_answers_late_is_checked_then(lru_stack: Stack) -> None:
    """Redis down at start: the processor starts (failing closed) and checks once Redis
    answers; an evicting policy then stops it with the same error."""
    lru_stack.processor.start()
    assert "checked when it does" in lru_stack.processor.log_text()
    lru_stack.redis.start()
    wait_until(lambda: not lru_stack.processor.running(), timeout=20,
               what="the processor to stop on the evicting Redis")
    assert lru_stack.processor.proc is not None
    assert lru_stack.processor.proc.returncode == 2
    assert "'allkeys-lru'" in lru_stack.processor.log_text()


def test_config_renamed_away_is_refused_unless_allowed(tmp_path: Path) -> None:
    server = ConfiguredRedis(tmp_path, "--rename-command", "CONFIG", "")
    server.start()

    async def check(allow: bool) -> str | None:
        client = async_client(server.url, 1.0)
        try:
            return await eviction.check(client, allow)
        finally:
            await client.aclose()

    try:
        with pytest.raises(eviction.EvictionRefused) as refused:
            asyncio.run(check(False))
        assert "cannot read Redis's maxmemory-policy" in str(refused.value)
        assert "TOKENFUSE_ALLOW_EVICTION=1" in str(refused.value)
        warning = asyncio.run(check(True))
        assert warning is not None and "starting anyway" in warning
    finally:
        server.stop()
