"""The start-up check that Redis will not evict tokenfuse's keys.

A budget counter or an open reservation that Redis evicts under memory pressure is spend
forgotten: the caller's next request sees an empty window. So the processor reads
`CONFIG GET maxmemory-policy` (on every master of a cluster) and refuses to start unless
it is `noeviction`, where Redis answers writes with an OOM error instead (the processor
then fails closed, 503). `TOKENFUSE_ALLOW_EVICTION=1` turns the refusal into a warning.

Managed services often rename or disable CONFIG: the policy cannot be read, which is
refused the same way (with that reason) and allowed by the same variable, once the
operator has checked the service's own setting.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from tokenfuse.state.connection import text

SAFE_POLICY = "noeviction"
ALLOW_VARIABLE = "TOKENFUSE_ALLOW_EVICTION"


class EvictionRefused(Exception):
    """Redis may evict tokenfuse's keys (or cannot say) and eviction was not allowed."""


async def policies(client: aioredis.Redis | AsyncRedisCluster) -> dict[str, str]:
    """maxmemory-policy by node ("host:port"; every master of a cluster). Raises
    redis.ResponseError when CONFIG is refused, REDIS_FAILURES when Redis is away."""
    if isinstance(client, AsyncRedisCluster):
        answers = await client.config_get("maxmemory-policy",
                                          target_nodes=AsyncRedisCluster.PRIMARIES)
        return {node: _policy(answer) for node, answer in _by_node(answers).items()}
    kwargs = client.connection_pool.connection_kwargs
    node = f"{kwargs.get('host', kwargs.get('path', 'localhost'))}:{kwargs.get('port', '')}"
    return {node.rstrip(":"): _policy(await client.config_get("maxmemory-policy"))}


def _by_node(answers: Any) -> dict[str, Any]:
    """redis-py answers a command sent to several nodes with {node name: answer}; with
    one master, the answer itself."""
    if isinstance(answers, dict) and answers and all(
            isinstance(v, dict) for v in answers.values()):
        return {text(k): v for k, v in answers.items()}
    return {"the only master": answers}


def _policy(answer: Any) -> str:
    for name, value in (answer or {}).items():
        if text(name) == "maxmemory-policy":
            return text(value)
    raise redis.ResponseError("CONFIG GET maxmemory-policy gave no value")


async def check(client: aioredis.Redis | AsyncRedisCluster, allow: bool) -> str | None:
    """None when every node says noeviction; a warning when not but `allow`; else raises
    EvictionRefused with what is wrong and the fix. Connection failures pass through."""
    try:
        found = await policies(client)
    except redis.ResponseError as exc:
        problem = (f"cannot read Redis's maxmemory-policy (CONFIG GET refused: {exc}); "
                   "managed Redis services often rename or disable CONFIG. Make sure the "
                   f"service's maxmemory-policy is {SAFE_POLICY} (an evicted budget counter "
                   f"is forgotten spend), then set {ALLOW_VARIABLE}=1 to start without "
                   "this check")
    else:
        bad = {node: policy for node, policy in found.items() if policy != SAFE_POLICY}
        if not bad:
            return None
        where = ", ".join(f"{policy!r} on {node}" for node, policy in sorted(bad.items()))
        problem = (f"Redis maxmemory-policy is {where}: Redis may evict budget counters "
                   "and reservations under memory pressure, and an evicted counter is "
                   f"forgotten spend. Fix: set maxmemory-policy {SAFE_POLICY} (redis.conf, "
                   f"or CONFIG SET maxmemory-policy {SAFE_POLICY} on every master, or your "
                   f"provider's parameter group), or set {ALLOW_VARIABLE}=1 to run anyway")
    if allow:
        return f"{problem} ({ALLOW_VARIABLE}=1: starting anyway)"
    raise EvictionRefused(problem)
