"""The pipelined decision connection against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis

from tests.support.harness import RedisServer
from tokenfuse.state.redis_pipe import PipelinedRedis, Script


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_each_get_their_own_reply(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        pipe = PipelinedRedis(redis_server.url, 1.0)
        replies = await asyncio.gather(*(pipe.execute("ECHO", f"caller-{i}")
                                         for i in range(500)))
        assert replies == [f"caller-{i}".encode() for i in range(500)]
        await pipe.close()

    run(scenario())


def test_one_write_per_loop_turn(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        pipe = PipelinedRedis(redis_server.url, 1.0)
        assert await pipe.execute("PING") == b"PONG"  # connected
        protocol = pipe._protocol
        assert protocol is not None and protocol.transport is not None
        writes: list[bytes] = []
        real_write = protocol.transport.write
        protocol.transport = _Spy(protocol.transport, writes, real_write)
        assert await asyncio.gather(*(pipe.execute("INCR", "n") for _ in range(100))) == list(
            range(1, 101))
        assert len(writes) == 1 and writes[0].count(b"INCR") == 100
        await pipe.close()

    run(scenario())


class _Spy:
    """A transport that records what is written through it."""

    def __init__(self, inner, writes: list[bytes], write) -> None:
        self._inner, self._writes, self._write = inner, writes, write

    def write(self, data: bytes) -> None:
        self._writes.append(data)
        self._write(data)

    def close(self) -> None:
        self._inner.close()


def test_scripts_survive_a_script_flush(redis_server: RedisServer) -> None:
    script = Script("return {redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[2]}")

    async def scenario() -> None:
        pipe = PipelinedRedis(redis_server.url, 1.0)
        assert await pipe.evalsha(script, ["k"], [5, "a"]) == [5, b"a"]
        redis_server.client().script_flush()  # what a Redis restart does to the cache
        assert await pipe.evalsha(script, ["k"], [2, "b"]) == [7, b"b"]  # EVAL, cached again
        assert redis_server.client().script_exists(script.sha) == [True]
        await pipe.close()

    run(scenario())


def test_error_replies_raise_and_the_connection_goes_on(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        pipe = PipelinedRedis(redis_server.url, 1.0)
        with pytest.raises(redis.ResponseError, match="ERR"):
            await pipe.evalsha(Script("return redis.call('NOPE')"), [], [])
        assert await pipe.execute("ECHO", "after") == b"after"
        await pipe.close()

    run(scenario())


def test_a_late_reply_goes_to_nobody(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        pipe = PipelinedRedis(redis_server.url, 1.0)
        sleeping = asyncio.ensure_future(pipe.execute("DEBUG", "SLEEP", "0.3"))
        with pytest.raises(TimeoutError):  # queued behind the sleep on the same connection
            async with asyncio.timeout(0.05):
                await pipe.execute("ECHO", "too late")
        assert await sleeping == b"OK"
        # The reply to "too late" has arrived and was dropped; this caller gets its own.
        assert await pipe.execute("ECHO", "mine") == b"mine"
        await pipe.close()

    run(scenario())


def test_connection_lost_then_back(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        pipe = PipelinedRedis(redis_server.url, 1.0)
        assert await pipe.execute("SET", "k", "v") == b"OK"
        redis_server.stop()
        with pytest.raises(redis.ConnectionError):
            await pipe.execute("GET", "k")
        with pytest.raises(redis.ConnectionError):
            await pipe.execute("GET", "k")  # refused: still down
        redis_server.start()
        assert await pipe.execute("SET", "k", "w") == b"OK"  # connects again
        await pipe.close()

    run(scenario())


def test_password_and_database_from_the_url(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.config_set("requirepass", "s3cret")
    try:
        async def scenario() -> None:
            url = f"redis://:s3cret@127.0.0.1:{redis_server.port}/3"
            pipe = PipelinedRedis(url, 1.0)
            assert await pipe.execute("SET", "where", "db3") == b"OK"
            await pipe.close()
            wrong = PipelinedRedis(f"redis://:nope@127.0.0.1:{redis_server.port}/0", 1.0)
            with pytest.raises(redis.ResponseError):
                await wrong.execute("PING")
            await wrong.close()

        run(scenario())
        authed = redis.Redis(port=redis_server.port, password="s3cret", db=3)
        assert authed.get("where") == b"db3"
        assert redis.Redis(port=redis_server.port, password="s3cret", db=0).get("where") is None
    finally:
        redis.Redis(port=redis_server.port, password="s3cret").config_set("requirepass", "")


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(ValueError):
        PipelinedRedis("http://127.0.0.1:6379/0", 1.0)
