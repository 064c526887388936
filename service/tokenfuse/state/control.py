"""Operator changes that must reach in-flight streams: kill switch, budget changes.

The CLI writes the change to Redis and publishes the caller's key id on one channel.
Every processor subscribes and bumps a per-caller version; a stream whose caller's
version moved re-checks its budget at its next chunk (and ends if it is killed or over).
A message lost while a processor is disconnected only delays the check to the stream's
next reservation extension.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import redis

from tokenfuse.state.connection import subscriber_client
from tokenfuse.state.keys import CONTROL_CHANNEL

RECONNECT_SECONDS = 1.0

log = logging.getLogger("tokenfuse.control")


def announce(client: redis.Redis, caller: str) -> None:
    """Tell every processor that the caller's limits or kill flag changed."""
    client.publish(CONTROL_CHANNEL, caller)


class ControlWatcher:
    def __init__(self, url: str) -> None:
        self._url = url
        self._versions: defaultdict[str, int] = defaultdict(int)

    def version(self, caller: str) -> int:
        return self._versions.get(caller, 0)

    async def run(self) -> None:
        """Subscribe forever, reconnecting after Redis failures."""
        while True:
            client = subscriber_client(self._url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CONTROL_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            caller = data.decode() if isinstance(data, bytes) else str(data)
                            self._versions[caller] += 1
            except (redis.RedisError, OSError) as exc:
                log.warning("control channel lost (%s); resubscribing", type(exc).__name__)
            finally:
                await client.aclose()
            await asyncio.sleep(RECONNECT_SECONDS)
