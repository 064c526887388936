"""One pipelined Redis connection for the decision path (reserve, extend, settle).

redis-py checks a connection out of a pool for every command and writes each command on
its own. The processor makes two script calls per request from many concurrent requests,
so here they all share one connection: commands issued in the same event-loop turn leave
in one write, and the replies (Redis answers in order) resolve the callers' futures in
order. That is about a fifth of the processor's CPU per request less than redis-py's
pooled path (docs/design.md, "Throughput work"), and fewer system calls for Redis too.

Failures are those of redis-py (tokenfuse.state.connection.REDIS_FAILURES): a lost or refused
connection raises `redis.ConnectionError` for every command in flight and the next command
connects again; an error reply raises `redis.ResponseError`. Callers bound each call with
their own timeout; a reply that comes after its caller gave up is read and dropped.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
import ssl
from typing import Any

import hiredis
import redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url


class Script:
    """A Lua script called by its SHA1 (EVALSHA), loaded again by EVAL when Redis lost it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Protocol(asyncio.Protocol):
    """Feeds replies to the futures waiting for them, first come first served."""

    def __init__(self) -> None:
        self.parser = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.outbox: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        while (reply := self.parser.gets()) is not False and self.waiting:
            future = self.waiting.popleft()
            if future.done():  # its caller timed out: the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(redis.ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(redis.ConnectionError("connection to Redis lost"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append(future)
        if not self.outbox:  # the first command of this loop turn: write them all at its end
            loop.call_soon(self.flush)
        self.outbox.append(command)
        return future

    def flush(self) -> None:
        if self.transport is not None and not self.closed and self.outbox:
            self.transport.write(b"".join(self.outbox))
        self.outbox.clear()


class PipelinedRedis:
    """The decision path's Redis: `evalsha` and `execute`, over one shared connection."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        options = parse_url(url)
        self._kind = options.pop("connection_class", None)
        if self._kind not in (None, SSLConnection, UnixDomainSocketConnection):
            raise ValueError(f"unsupported Redis URL scheme: {url.split(':', 1)[0]}")
        self._options = options
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # Redis restarted or flushed its scripts: EVAL runs and caches it again.
        return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def execute(self, *command: Any) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await protocol.send(hiredis.pack_command(command))

    async def execute_asking(self, *command: Any) -> Any:
        """ASKING then `command`, adjacent on the connection (Redis Cluster's ASK
        redirect: the next command may use a slot this node is importing)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        asking = protocol.send(b"*1\r\n$6\r\nASKING\r\n")
        reply = protocol.send(hiredis.pack_command(command))
        await asking
        return await reply

    def with_address(self, host: str, port: int) -> PipelinedRedis:
        """The same options (credentials, TLS) for another node of a cluster."""
        other = copy.copy(self)
        other._options = {**self._options, "host": host, "port": port}
        other._protocol, other._connecting = None, None  # a connection of its own
        return other

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:  # one connection attempt for all waiting callers
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            try:
                async with asyncio.timeout(self._connect_timeout):
                    protocol = await self._open()
            except (OSError, TimeoutError) as exc:
                raise redis.ConnectionError(f"cannot connect to Redis: {exc!r}") from exc
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._handshake(protocol)
            except BaseException:
                if protocol.transport is not None:
                    protocol.transport.close()
                raise
            self._protocol = protocol
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._kind is UnixDomainSocketConnection:
            _, protocol = await loop.create_unix_connection(_Protocol, self._options["path"])
        else:
            tls = ssl.create_default_context() if self._kind is SSLConnection else None
            _, protocol = await loop.create_connection(
                _Protocol, self._options.get("host", "localhost"),
                self._options.get("port", 6379), ssl=tls)
        return protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        password = self._options.get("password")
        if password is not None:
            username = self._options.get("username")
            credentials = (username, password) if username else (password,)
            await protocol.send(hiredis.pack_command(("AUTH", *credentials)))
        db = int(self._options.get("db") or 0)
        if db:
            await protocol.send(hiredis.pack_command(("SELECT", db)))

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
