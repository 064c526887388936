"""The decision path's Redis on a Redis Cluster: one pipelined connection per master.

`ClusterPipelinedRedis` has `PipelinedRedis`'s interface (`evalsha`, `execute`, `close`)
and routes each command by the slot of its first key (CRC16 of the hash tag, redis-py's
`key_slot`): every tokenfuse script's keys share one tag (`state/keys.py`), so one slot
and one master answers it, over that master's `PipelinedRedis`.

The slot map comes from `CLUSTER SLOTS` of the seed node (`REDIS_URL`), or of any node
learnt before when the seed does not answer. Redirects:

- `MOVED <slot> <host:port>`: the slot has a new owner. The slot is pointed there at
  once, the command retried there, and the whole map re-read before the next command.
- `ASK <slot> <host:port>`: the slot is being migrated and this key already left: the
  command is sent once to that node after `ASKING`; the map does not change.
- `TRYAGAIN` (a multi-key script during a migration): retried after a short pause.
- A call its caller gave up on (the caller's timeout cancels it) also re-reads the map:
  a master whose host died without closing the connection never answers.

At most `MAX_REDIRECTS` per command, then the last error is raised. `NOSCRIPT` → `EVAL`
on the node that said it. A node that cannot be reached or whose connection is lost
raises `redis.ConnectionError` to the callers it was serving (the processor answers 503:
fail closed), and the map is re-read (at most every `REFRESH_INTERVAL_S`), so traffic
follows a failover to the promoted replica without a restart. Once a map is known it is
re-read in the background, beside the traffic: asking a dead seed first must not delay
the decisions of callers on the live masters. `CLUSTERDOWN` is raised as is, and also
re-reads the map.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from tokenfuse.state.redis_pipe import PipelinedRedis, Script

MAX_REDIRECTS = 5
REFRESH_INTERVAL_S = 0.1  # at most this often while the map is stale (a dead node)
TRYAGAIN_PAUSE_S = 0.02

Address = tuple[str, int]


def _encoded(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


def _redirect(message: str) -> tuple[str, int, Address] | None:
    """("MOVED" | "ASK", slot, node) of a redirect error, else None."""
    kind, _, rest = message.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, node = rest.partition(" ")
    host, _, port = node.rpartition(":")
    return kind, int(slot), (host, int(port))


class ClusterPipelinedRedis:
    """`PipelinedRedis` over a Redis Cluster: routed by slot, following MOVED and ASK."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self._seed = PipelinedRedis(url, connect_timeout)
        if self._seed._kind is not None and "host" not in self._seed._options:
            raise ValueError("Redis Cluster needs a TCP REDIS_URL (a seed node's host:port)")
        self._seed_address: Address = (self._seed._options.get("host", "localhost"),
                                       int(self._seed._options.get("port", 6379)))
        self._nodes: dict[Address, PipelinedRedis] = {self._seed_address: self._seed}
        self._known: list[Address] = [self._seed_address]  # every node seen, for refreshes
        self._slots: list[PipelinedRedis | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._stale = True
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Lock | None = None
        self._refresh_task: asyncio.Future[None] | None = None
        self._mapped = False  # a slot map was read at least once

    # -- the decision path ------------------------------------------------------------

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        slot = key_slot(_encoded(keys[0])) if keys else None
        try:
            return await self._routed(slot, ("EVALSHA", script.sha, len(keys), *keys, *args))
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._routed(slot, ("EVAL", script.source, len(keys), *keys, *args))

    async def execute(self, *command: Any) -> Any:
        """A command whose first argument is its key (GET, HSET, ...), or a keyless one
        (PING, ECHO: any master answers)."""
        slot = key_slot(_encoded(command[1])) if len(command) > 1 else None
        return await self._routed(slot, command)

    async def _routed(self, slot: int | None, command: tuple[Any, ...]) -> Any:
        if self._stale:
            if self._mapped:  # refresh beside the traffic: a dead node must not stall
                self._refresh_soon()  # the callers of the live ones
            else:
                await self._refresh()
        node = self._node_for(slot)
        asking = False
        for _ in range(MAX_REDIRECTS):
            try:
                if asking:
                    return await node.execute_asking(*command)
                return await node.execute(*command)
            except redis.ConnectionError:
                self._stale = True  # a node died: learn the new owner before the next call
                raise
            except asyncio.CancelledError:
                # The caller's time bound: a host that died without closing the connection
                # never answers, so re-read the map (its replica may own the slot by now).
                self._stale = True
                raise
            except redis.ResponseError as exc:
                message = str(exc)
                if message.startswith("TRYAGAIN"):
                    await asyncio.sleep(TRYAGAIN_PAUSE_S)
                    node, asking = self._node_for(slot), False
                    continue
                if message.startswith("CLUSTERDOWN"):
                    self._stale = True
                    raise
                redirect = _redirect(message)
                if redirect is None:
                    raise
                kind, moved_slot, address = redirect
                node = self._node_at(address)
                asking = kind == "ASK"
                if not asking:
                    self._slots[moved_slot] = node
                    self._stale = True
                    self._refreshed_at = 0.0  # a MOVED is news: re-read the map at once
        raise redis.ResponseError(f"too many cluster redirects for slot {slot}")

    def _node_for(self, slot: int | None) -> PipelinedRedis:
        node = self._slots[slot] if slot is not None else None
        if node is None:  # keyless, or a slot no master serves (a redirect will tell)
            masters = [n for n in set(self._slots) if n is not None]
            node = random.choice(masters) if masters else self._seed
        return node

    def _node_at(self, address: Address) -> PipelinedRedis:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = self._seed.with_address(*address)
            if address not in self._known:
                self._known.append(address)
        return node

    # -- the slot map -----------------------------------------------------------------

    def _refresh_soon(self) -> None:
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.ensure_future(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):  # none answered: next call
            await self._refresh()

    async def _refresh(self) -> None:
        """Re-read the slot map from the seed, else from any node known to us. If none
        answers, raise the seed's error (callers fail closed)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            if not self._stale or time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_S:
                return
            self._refreshed_at = time.monotonic()
            failure: Exception | None = None
            for address in list(self._known):
                try:
                    layout = await self._node_at(address).execute("CLUSTER", "SLOTS")
                except (redis.RedisError, OSError) as exc:
                    failure = failure or exc
                    continue
                if layout:
                    self._apply(layout)
                    self._stale = False
                    return
            if failure is not None:
                raise redis.ConnectionError(
                    f"no Redis Cluster node answers CLUSTER SLOTS ({failure!r})")

    def _apply(self, layout: list[Any]) -> None:
        slots: list[PipelinedRedis | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for start, end, master, *replicas in layout:
            node = self._node_at(self._address_of(master))
            slots[int(start):int(end) + 1] = [node] * (int(end) - int(start) + 1)
            for replica in replicas:  # not used for commands: places to ask for the map
                self._node_at(self._address_of(replica))
        self._slots = slots
        self._mapped = True

    def _address_of(self, entry: list[Any]) -> Address:
        host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
        return (host or self._seed_address[0]), int(entry[1])

    def masters(self) -> set[Address]:
        """The masters of the current map (for tests and status)."""
        return {address for address, node in self._nodes.items() if node in self._slots}

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        for node in self._nodes.values():
            await node.close()
