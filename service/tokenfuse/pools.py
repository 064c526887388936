"""Provider key pools: secrets in processor memory only, ids and health in Redis.

An operator keeps each pool's keys in a CSV file (`key,label,weight`) where the processors
can read it: `$TOKENFUSE_POOLS_DIR/<pool>.csv` (a secret mount in production). The
processors load the secrets at start and on SIGHUP; `tokenfuse keys import` registers the
pool's key ids (keyed hashes), labels and weights in Redis, where every replica shares the
round-robin counter and each key's health. No secret is ever written anywhere by tokenfuse.

Gateway (virtual) keys `tfk-…` are bound to a pool; only their hash is stored.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from tokenfuse import metrics
from tokenfuse.identity import PREFIX_CHARS, VIRTUAL_KEY_PREFIX, key_id
from tokenfuse.redis_pipe import PipelinedRedis, Script
from tokenfuse.store import script_source

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("tokenfuse.pools")

POOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PoolError(ValueError):
    """A pool file or command tokenfuse cannot use."""


@dataclass(frozen=True)
class PoolKey:
    secret: str
    label: str
    weight: int


def parse_pool_csv(text: str) -> list[PoolKey]:
    """Rows of `key,label,weight` (label and weight optional; a header row is required)."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "key" not in [f.strip().lower() for f in reader.fieldnames]:
        raise PoolError("pool CSV needs a header row with at least a 'key' column")
    out: list[PoolKey] = []
    for number, row in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        secret = row.get("key", "")
        if not secret:
            raise PoolError(f"line {number}: empty key")
        weight_text = row.get("weight") or "1"
        if not weight_text.isdigit() or not 1 <= int(weight_text) <= 100:
            raise PoolError(f"line {number}: weight must be an integer 1..100")
        out.append(PoolKey(secret, row.get("label") or f"key-{number - 1}", int(weight_text)))
    return out


def check_pool_name(name: str) -> str:
    if not POOL_NAME.match(name):
        raise PoolError(f"pool names are 1-64 of A-Z a-z 0-9 _ . -: {name!r}")
    return name


def pool_prefix(pool: str) -> str:
    return f"tfp:{{{pool}}}"


def vkey_redis_key(vkey_id: str) -> str:
    return f"tf:vk:{vkey_id}"


class PoolSecrets:
    """Secrets of every pool file, by pool and key id, in this process's memory only."""

    def __init__(self, server_secret: bytes, directory: Path) -> None:
        self._server_secret = server_secret
        self._directory = directory
        self.by_pool: dict[str, dict[str, str]] = {}
        self._pool_of: dict[str, str] = {}
        self._sorted_ids: dict[str, list[str]] = {}

    def load(self) -> None:
        pools: dict[str, dict[str, str]] = {}
        if self._directory.is_dir():
            for path in sorted(self._directory.glob("*.csv")):
                try:
                    keys = parse_pool_csv(path.read_text())
                except (OSError, PoolError) as exc:
                    log.error("pool file %s skipped: %s", path.name, exc)
                    continue
                pools[path.stem] = {key_id(self._server_secret, k.secret): k.secret
                                    for k in keys}
        self.by_pool = pools
        self._pool_of = {kid: pool for pool, keys in pools.items() for kid in keys}
        self._sorted_ids = {pool: sorted(keys) for pool, keys in pools.items()}
        log.info("pool secrets loaded: %s", {p: len(k) for p, k in pools.items()})

    def held(self, pool: str) -> dict[str, str]:
        return self.by_pool.get(pool, {})

    def held_ids(self, pool: str) -> list[str]:
        """The pool's key ids, sorted once per load (pool_pick.lua takes them per pick)."""
        return self._sorted_ids.get(pool, [])

    def pool_of(self, kid: str) -> str | None:
        """The pool holding the key with this id, if any."""
        return self._pool_of.get(kid)


# A cheap, free request per provider that proves a key works.
PROVIDER_PROBES = {
    "openai": ("/v1/models", lambda key: {"authorization": f"Bearer {key}"}),
    "anthropic": ("/v1/models", lambda key: {"x-api-key": key,
                                             "anthropic-version": "2023-06-01"}),
}


class PoolStore:
    """Processor side: pick a key, report an outcome. One Lua call each, on the decisions'
    pipelined connection; probes and gateway-key lookups use redis-py."""

    def __init__(self, client: aioredis.Redis, decisions: PipelinedRedis,
                 base_cooldown_ms: int, max_cooldown_ms: int) -> None:
        self._redis = client
        self._decisions = decisions
        self._pick = Script(script_source("pool_pick"))
        self._report = Script(script_source("pool_report"))
        self._base = base_cooldown_ms
        self._cap = max_cooldown_ms

    async def pick(self, pool: str, held_ids: list[str]) -> tuple[str | None, int]:
        """(key id, 0) or (None, ms until the earliest recovery, -1 if unknown)."""
        prefix = pool_prefix(pool)
        result = await self._decisions.evalsha(self._pick,
                                               keys=[f"{prefix}:keys", f"{prefix}:rr"],
                                               args=[",".join(held_ids)])
        if int(result[0]) == 1:
            value = result[1]
            return (value.decode() if isinstance(value, bytes) else value), 0
        return None, int(result[1])

    async def report(self, pool: str, key: str, status: int, retry_after_ms: int = -1,
                     tokens: int = 0, spend_nano: int = 0, error: str = "") -> str:
        """Record an outcome; returns the key's state after it."""
        result = await self._decisions.evalsha(
            self._report, keys=[f"{pool_prefix(pool)}:h:{key}"],
            args=[status, retry_after_ms, self._base, self._cap, tokens, spend_nano,
                  error[:200]])
        state = result[0]
        return state.decode() if isinstance(state, bytes) else str(state)

    async def probe_candidates(self, pool: str, held_ids: list[str],
                               lock_ms: int) -> tuple[str | None, list[str]]:
        """(provider, keys due for a probe that this replica won the lock for)."""
        prefix = pool_prefix(pool)
        provider = await self._redis.hget(f"{prefix}:meta", "provider")
        now_ms = int(time.time() * 1000)
        due = []
        for kid in held_ids:
            state, until = await self._redis.hmget(f"{prefix}:h:{kid}", "state", "until")
            state = (state or b"closed").decode()
            if state == "closed" or (state != "disabled" and int(until or 0) > now_ms):
                continue
            if await self._redis.set(f"{prefix}:probe:{kid}", 1, nx=True, px=lock_ms):
                due.append(kid)
        return (provider.decode() if provider else None), due

    async def virtual_key_pool(self, vkey_id: str) -> str | None:
        pool = await self._redis.hget(vkey_redis_key(vkey_id), "pool")
        return pool.decode() if isinstance(pool, bytes) else pool


class PoolAdmin:
    """Operator side (CLI): import, list, enable/disable, virtual keys."""

    def __init__(self, client: redis.Redis, server_secret: bytes) -> None:
        self._redis = client
        self._secret = server_secret

    def import_keys(self, pool: str, keys: list[PoolKey], provider: str) -> list[str]:
        check_pool_name(pool)
        if provider not in PROVIDER_PROBES:
            raise PoolError(f"provider must be one of {sorted(PROVIDER_PROBES)}")
        prefix = pool_prefix(pool)
        self._redis.hset(f"{prefix}:meta", "provider", provider)
        ids = [key_id(self._secret, k.secret) for k in keys]
        existing = {k.decode(): v.decode() for k, v in
                    self._redis.hgetall(f"{prefix}:keys").items()}
        mapping = {}
        for kid, k in zip(ids, keys, strict=True):
            enabled = existing.get(kid, "1|1|").split("|")[1]
            mapping[kid] = f"{k.weight}|{enabled}|{k.label}"
        self._redis.hset(f"{prefix}:keys", mapping=mapping)
        return ids

    def pools(self) -> list[str]:
        found = set()
        for name in self._redis.scan_iter("tfp:{*}:keys"):
            text = name.decode()
            found.add(text[text.index("{") + 1 : text.index("}")])
        return sorted(found)

    def list_keys(self, pool: str) -> list[dict[str, Any]]:
        prefix = pool_prefix(pool)
        rows = []
        for kid, meta in sorted(self._redis.hgetall(f"{prefix}:keys").items()):
            weight, enabled, label = meta.decode().split("|", 2)
            health = {k.decode(): v.decode() for k, v in
                      self._redis.hgetall(f"{prefix}:h:{kid.decode()}").items()}
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
        prefix = pool_prefix(pool)
        for kid, meta in self._redis.hgetall(f"{prefix}:keys").items():
            weight, _, label = meta.decode().split("|", 2)
            if id_or_label in (kid.decode(), label):
                self._redis.hset(f"{prefix}:keys", kid, f"{weight}|{int(enabled)}|{label}")
                if enabled:  # an operator's word closes the breaker
                    self._redis.hset(f"{prefix}:h:{kid.decode()}",
                                     mapping={"state": "closed", "until": 0, "failures": 0})
                return kid.decode()
        raise PoolError(f"no key {id_or_label!r} in pool {pool!r}")

    def create_virtual_key(self, name: str, pool: str) -> str:
        check_pool_name(pool)
        if not self._redis.exists(f"{pool_prefix(pool)}:keys"):
            raise PoolError(f"pool {pool!r} has no keys: import some first")
        vkey = VIRTUAL_KEY_PREFIX + secrets.token_urlsafe(32)
        self._redis.hset(vkey_redis_key(key_id(self._secret, vkey)),
                         mapping={"name": name, "pool": pool})
        return vkey


async def probe_forever(store: PoolStore, pool_secrets: PoolSecrets,
                        upstreams: dict[str, str], interval_s: float) -> None:
    """Bring keys back: probe each open (cooled-down) or disabled key with a free request;
    success closes it, failure keeps it out. One replica probes a key at a time."""
    session: aiohttp.ClientSession | None = None
    try:
        while True:
            await asyncio.sleep(interval_s)
            if not pool_secrets.by_pool:
                continue
            if session is None:  # aiohttp (~10 MB) only once there are pools to probe
                import aiohttp

                session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            await _probe_pools(store, pool_secrets, upstreams, interval_s, session)
    finally:
        if session is not None:
            await session.close()


async def _probe_pools(store: PoolStore, pool_secrets: PoolSecrets, upstreams: dict[str, str],
                       interval_s: float, session: aiohttp.ClientSession) -> None:
    import aiohttp

    for pool, held in list(pool_secrets.by_pool.items()):
        try:
            provider, due = await store.probe_candidates(
                pool, pool_secrets.held_ids(pool), int(interval_s * 1000))
        except (redis.RedisError, OSError) as exc:
            log.warning("probe: redis unavailable: %s", type(exc).__name__)
            return
        if provider not in PROVIDER_PROBES:
            continue
        path, auth = PROVIDER_PROBES[provider]
        url = upstreams[provider].rstrip("/") + path
        for kid in due:
            try:
                async with session.get(url, headers=auth(held[kid])) as response:
                    status = response.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("probe of %s/%s failed: %s", pool, kid[:8], type(exc).__name__)
                continue
            metrics.POOL_PROBES.labels(pool, str(status)).inc()
            try:
                state = await store.report(pool, kid, status, -1, 0, 0,
                                           f"probe HTTP {status}")
            except (redis.RedisError, OSError):
                break
            metrics.set_pool_key_state(pool, kid[:PREFIX_CHARS], state)
            log.info("probe of %s/%s: HTTP %d", pool, kid[:8], status)
