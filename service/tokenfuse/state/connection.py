"""Redis clients: how tokenfuse connects, and what a Redis call can fail with.

Every constructor takes `cluster`: True (TOKENFUSE_REDIS_MODE=cluster) gives redis-py's
cluster clients and the slot-routed decision connection, the URL naming one seed node."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from tokenfuse.state.cluster_pipe import ClusterPipelinedRedis
from tokenfuse.state.redis_pipe import PipelinedRedis

#: What a Redis call can fail with (errors, connection loss, our own time bound; redis-py's
#: cluster errors that are not RedisErrors: no reachable node, a slot no node serves).
REDIS_FAILURES = (redis.RedisError, OSError, asyncio.TimeoutError, RedisClusterException)
#: The operators' synchronous client (a RedisCluster on a cluster), for type hints outside
#: state/ (which never imports redis itself).
SyncRedis = redis.Redis


def async_client(url: str, timeout_s: float, cluster: bool = False) -> aioredis.Redis:
    """redis-py for the processor's cold paths (reaper, probes, gateway-key lookups)."""
    if cluster:
        # Same command surface; SCAN (scan_iter) walks every master.
        return AsyncRedisCluster.from_url(  # type: ignore[return-value]
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            max_connections=64)
    # A blocking pool: under a flood, callers queue for a connection (bounded by the
    # decision timeout) instead of failing with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s)
    # One immediate retry replaces a pooled connection that died with a Redis restart;
    # no backoff: the decision is bounded by TOKENFUSE_REDIS_TIMEOUT_MS anyway.
    return aioredis.Redis(connection_pool=pool, retry=AsyncRetry(NoBackoff(), 1))


def decisions_client(url: str, timeout_s: float,
                     cluster: bool = False) -> PipelinedRedis | ClusterPipelinedRedis:
    """The decision path's one pipelined connection (reserve, extend, settle, pool); on a
    cluster one per master, routed by slot."""
    if cluster:
        return ClusterPipelinedRedis(url, timeout_s)
    return PipelinedRedis(url, timeout_s)


def sync_client(url: str, cluster: bool = False) -> redis.Redis:
    """redis-py for operators (CLI, admin)."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=5)  # type: ignore[return-value]
    return redis.Redis.from_url(url, socket_timeout=5)


def subscriber_client(url: str) -> aioredis.Redis:
    """A connection for the control channel's subscription."""
    return aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_keepalive=True)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
