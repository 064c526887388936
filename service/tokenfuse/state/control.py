"""Operator changes that must reach in-flight streams: kill switch, budget changes.

The CLI writes the change to Redis and publishes the caller's key id on one channel.
Every processor subscribes and bumps a per-caller version; a stream whose caller's
version moved re-checks its budget at its next chunk (and ends if it is killed or over).
A message lost while a processor is disconnected only delays the check to the stream's
next reservation extension.

On a Redis Cluster a PUBLISH reaches every node, so the watcher subscribes on one node
(the seed first) and learns the others from `CLUSTER SLOTS`; when its node is lost it
subscribes on the next one it knows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from urllib.parse import urlsplit, urlunsplit

import redis

from tokenfuse.state.connection import subscriber_client, text
from tokenfuse.state.keys import CONTROL_CHANNEL

RECONNECT_SECONDS = 1.0

log = logging.getLogger("tokenfuse.control")


def announce(client: redis.Redis, caller: str) -> None:
    """Tell every processor that the caller's limits or kill flag changed."""
    client.publish(CONTROL_CHANNEL, caller)


class ControlWatcher:
    def __init__(self, url: str, cluster: bool = False) -> None:
        self._url = url
        self._versions: defaultdict[str, int] = defaultdict(int)
        self._cluster = cluster
        self._nodes = [url]  # cluster: every node's URL learnt so far, seed first
        self._turn = 0

    def version(self, caller: str) -> int:
        return self._versions.get(caller, 0)

    async def run(self) -> None:
        """Subscribe forever, reconnecting after Redis failures."""
        while True:
            url = self._nodes[self._turn % len(self._nodes)]
            client = subscriber_client(url)
            try:
                if self._cluster:
                    self._learn(await client.execute_command("CLUSTER", "SLOTS"))
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CONTROL_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            caller = data.decode() if isinstance(data, bytes) else str(data)
                            self._versions[caller] += 1
            except (redis.RedisError, OSError) as exc:
                log.warning("control channel lost (%s); resubscribing", type(exc).__name__)
                self._turn += 1  # on a cluster: the next node (one node: the same)
            finally:
                await client.aclose()
            await asyncio.sleep(RECONNECT_SECONDS)

    def _learn(self, layout: list) -> None:
        """Every node of a CLUSTER SLOTS answer, as a URL with the seed's credentials."""
        for _start, _end, *nodes in layout:
            for node in nodes:
                url = _node_url(self._url, text(node[0]), int(node[1]))
                if url not in self._nodes:
                    self._nodes.append(url)


def _node_url(seed_url: str, host: str, port: int) -> str:
    """The seed's URL with another host and port (scheme, credentials and db kept)."""
    parts = urlsplit(seed_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))
