"""The check that every tokenfuse on one Redis keys its callers with the same secret.

Key ids, and so budgets, are HMACs under TOKENFUSE_SECRET: a second gateway on the same
Redis with another secret (a second `make run` state directory makes a random one) keeps
a second, independent budget per key, and a limit set through one gateway's CLI does not
bind the other. So the first processor or CLI on a Redis stores a fingerprint of its
secret (`identity.secret_fingerprint`, an HMAC: the secret cannot be recovered from it)
and every later one compares: another fingerprint refuses to start.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from tokenfuse.state.connection import text
from tokenfuse.state.keys import SECRET_CHECK_KEY


class SecretMismatch(Exception):
    """This Redis holds budgets keyed with another secret."""

    def __init__(self) -> None:
        super().__init__(
            "this Redis already holds budgets keyed with another TOKENFUSE_SECRET "
            f"({SECRET_CHECK_KEY} differs): a second secret would keep a second budget per "
            "key. Give every gateway on one Redis the same secret (TOKENFUSE_SECRET, or the "
            "same TOKENFUSE_SECRET_FILE). If you changed the secret on purpose, every "
            f"budget is forgotten anyway: `redis-cli DEL {SECRET_CHECK_KEY}`, then start "
            "again")


async def claim(client: aioredis.Redis | AsyncRedisCluster, fingerprint: str) -> None:
    """Store the fingerprint if none is there; raise SecretMismatch if another one is."""
    await client.set(SECRET_CHECK_KEY, fingerprint, nx=True)
    if text(await client.get(SECRET_CHECK_KEY) or b"") != fingerprint:
        raise SecretMismatch


def claim_sync(client: redis.Redis | RedisCluster, fingerprint: str) -> None:
    """`claim` for the CLI."""
    client.set(SECRET_CHECK_KEY, fingerprint, nx=True)
    if text(client.get(SECRET_CHECK_KEY) or b"") != fingerprint:  # type: ignore[arg-type]
        raise SecretMismatch
