"""Key pools in Redis: members, round-robin counter and health shared by every replica;
gateway keys. No secret is ever written here (secrets: `tokenfuse.pools.secrets`)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from tokenfuse.identity import VIRTUAL_KEY_PREFIX, key_id
from tokenfuse.pools.secrets import PoolError, PoolKey, check_pool_name
from tokenfuse.providers import PROVIDERS
from tokenfuse.state import scripts
from tokenfuse.state.cluster_pipe import ClusterPipelinedRedis
from tokenfuse.state.connection import text
from tokenfuse.state.keys import (
    POOLS_PATTERN,
    VKEY_PATTERN,
    pool_key,
    pool_of_keys_key,
    pool_prefix,
    vkey_key,
    vkey_of_key,
)
from tokenfuse.state.redis_pipe import PipelinedRedis


class PoolStore:
    """Processor side: pick a key, report an outcome. One Lua call each, on the decisions'
    pipelined connection; probes and gateway-key lookups use redis-py."""

    def __init__(self, client: aioredis.Redis, decisions: PipelinedRedis | ClusterPipelinedRedis,
                 base_cooldown_ms: int, max_cooldown_ms: int) -> None:
        self._redis = client
        self._decisions = decisions
        self._pick = scripts.load("pool_pick")
        self._report = scripts.load("pool_report")
        self._base = base_cooldown_ms
        self._cap = max_cooldown_ms

    async def pick(self, pool: str, held_ids: list[str]) -> tuple[str | None, int]:
        """(key id, 0) or (None, ms until the earliest recovery, -1 if unknown)."""
        keys, args = self._pick.bind(
            {"keys": pool_key(pool, "keys"), "round_robin": pool_key(pool, "round_robin")},
            {"prefix": pool_prefix(pool), "held": ",".join(held_ids)})
        result = await self._decisions.evalsha(self._pick, keys, args)
        if int(result[0]) == 1:
            return text(result[1]), 0
        return None, int(result[1])

    async def report(self, pool: str, key: str, status: int, retry_after_ms: int = -1,
                     tokens: int = 0, spend_nano: int = 0, error: str = "") -> str:
        """Record an outcome; returns the key's state after it."""
        return (await self.report_change(pool, key, status, retry_after_ms, tokens,
                                         spend_nano, error))[1]

    async def report_change(self, pool: str, key: str, status: int, retry_after_ms: int = -1,
                            tokens: int = 0, spend_nano: int = 0,
                            error: str = "") -> tuple[str, str]:
        """Record an outcome; returns the key's state (before, after)."""
        keys, args = self._report.bind(
            {"health": pool_key(pool, "health", key)},
            {"status": status, "retry_after_ms": retry_after_ms, "base_cooldown_ms": self._base,
             "max_cooldown_ms": self._cap, "tokens": tokens, "spend": spend_nano,
             "error": error[:200]})
        result = await self._decisions.evalsha(self._report, keys, args)
        return text(result[2]), text(result[0])

    async def probe_candidates(self, pool: str, held_ids: list[str],
                               lock_ms: int) -> tuple[str | None, list[str]]:
        """(provider, keys due for a probe that this replica won the lock for)."""
        provider = await self._redis.hget(pool_key(pool, "meta"), "provider")
        now_ms = int(time.time() * 1000)
        due = []
        for kid in held_ids:
            state, until = await self._redis.hmget(pool_key(pool, "health", kid), "state",
                                                   "until")
            state = (state or b"closed").decode()
            if state == "closed" or (state != "disabled" and int(until or 0) > now_ms):
                continue
            if await self._redis.set(pool_key(pool, "probe_lock", kid), 1, nx=True,
                                     px=lock_ms):
                due.append(kid)
        return (provider.decode() if provider else None), due

    async def virtual_key_pool(self, vkey_id: str) -> tuple[str, str] | None:
        """(pool, the provider its keys are for) of a gateway key, or None."""
        pool = await self._redis.hget(vkey_key(vkey_id), "pool")
        if pool is None:
            return None
        name = pool.decode() if isinstance(pool, bytes) else pool
        provider = await self._redis.hget(pool_key(name, "meta"), "provider")
        return name, provider.decode() if isinstance(provider, bytes) else (provider or "")


class PoolAdmin:
    """Operator side (CLI): import, list, enable/disable, virtual keys."""

    def __init__(self, client: redis.Redis, server_secret: bytes) -> None:
        self._redis = client
        self._secret = server_secret

    def import_keys(self, pool: str, keys: list[PoolKey], provider: str) -> list[str]:
        check_pool_name(pool)
        if provider not in PROVIDERS:
            raise PoolError(f"provider must be one of {sorted(PROVIDERS)}")
        self._redis.hset(pool_key(pool, "meta"), "provider", provider)
        ids = [key_id(self._secret, k.secret) for k in keys]
        existing = {k.decode(): v.decode() for k, v in
                    self._redis.hgetall(pool_key(pool, "keys")).items()}
        mapping = {}
        for kid, k in zip(ids, keys, strict=True):
            enabled = existing.get(kid, "1|1|").split("|")[1]
            mapping[kid] = f"{k.weight}|{enabled}|{k.label}"
        self._redis.hset(pool_key(pool, "keys"), mapping=mapping)
        return ids

    def pools(self) -> list[str]:
        return sorted({pool_of_keys_key(name.decode())
                       for name in self._redis.scan_iter(POOLS_PATTERN)})

    def list_keys(self, pool: str) -> list[dict[str, Any]]:
        rows = []
        for kid, meta in sorted(self._redis.hgetall(pool_key(pool, "keys")).items()):
            weight, enabled, label = meta.decode().split("|", 2)
            health = {k.decode(): v.decode() for k, v in
                      self._redis.hgetall(pool_key(pool, "health", kid.decode())).items()}
            statuses = {k[7:]: int(v) for k, v in health.items() if k.startswith("status_")}
            errors = {s: n for s, n in statuses.items() if not s.startswith("2")}
            rows.append({
                "pool": pool, "id": kid.decode(), "label": label, "weight": int(weight),
                "enabled": enabled == "1", "state": health.get("state", "closed"),
                "cooldown_until_ms": int(health.get("until", 0)) or None,
                "last_error": health.get("last_error") or None,
                "requests": int(health.get("requests", 0)), "errors_by_status": errors,
                "tokens": int(health.get("tokens", 0)),
                "spend_nano_usd": int(health.get("spend", 0)),
            })
        return rows

    def set_enabled(self, pool: str, id_or_label: str, enabled: bool) -> str:
        members = pool_key(pool, "keys")
        for kid, meta in self._redis.hgetall(members).items():
            weight, _, label = meta.decode().split("|", 2)
            if id_or_label in (kid.decode(), label):
                self._redis.hset(members, kid, f"{weight}|{int(enabled)}|{label}")
                if enabled:  # an operator's word closes the breaker
                    self._redis.hset(pool_key(pool, "health", kid.decode()),
                                     mapping={"state": "closed", "until": 0, "failures": 0})
                return kid.decode()
        raise PoolError(f"no key {id_or_label!r} in pool {pool!r}")

    def provider(self, pool: str) -> str:
        return text(self._redis.hget(pool_key(pool, "meta"), "provider") or b"")

    def create_virtual_key(self, name: str, pool: str) -> tuple[str, str]:
        """(the gateway key, shown once; its id, under which its hash is stored)."""
        check_pool_name(pool)
        if not self._redis.exists(pool_key(pool, "keys")):
            raise PoolError(f"pool {pool!r} has no keys: import some first")
        vkey = VIRTUAL_KEY_PREFIX + secrets.token_urlsafe(32)
        vid = key_id(self._secret, vkey)
        self._redis.hset(vkey_key(vid), mapping={
            "name": name, "pool": pool, "created_ms": int(time.time() * 1000)})
        return vkey, vid

    def virtual_keys(self) -> list[dict[str, Any]]:
        rows = []
        for key in self._redis.scan_iter(match=VKEY_PATTERN, count=1000):
            fields = {text(k): text(v) for k, v in self._redis.hgetall(key).items()}
            if fields.get("pool"):
                rows.append({"id": vkey_of_key(text(key)), "name": fields.get("name", ""),
                             "pool": fields["pool"],
                             "created_ms": int(fields.get("created_ms") or 0)})
        return sorted(rows, key=lambda r: (r["created_ms"], r["name"]))

    def revoke_virtual_key(self, vid: str) -> dict[str, Any] | None:
        """Delete a gateway key (its next request is the caller's own key again: refused
        by the provider); the row it had, or None."""
        row = next((r for r in self.virtual_keys() if r["id"] == vid), None)
        if row is not None:
            self._redis.delete(vkey_key(vid))
        return row
