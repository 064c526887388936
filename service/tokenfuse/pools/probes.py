"""Health probes: bring cooled-down and disabled pool keys back with a free request."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tokenfuse import metrics
from tokenfuse.identity import PREFIX_CHARS
from tokenfuse.pools.secrets import PoolSecrets
from tokenfuse.providers import PROVIDERS
from tokenfuse.state.connection import REDIS_FAILURES
from tokenfuse.state.event_log import EventLog
from tokenfuse.state.pools import PoolStore

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("tokenfuse.pools")


async def probe_forever(store: PoolStore, pool_secrets: PoolSecrets,
                        upstreams: dict[str, str], interval_s: float,
                        events: EventLog | None = None) -> None:
    """Bring keys back: probe each open (cooled-down) or disabled key with a free request;
    success closes it, failure keeps it out. One replica probes a key at a time. A state
    change goes to the events feed."""
    session: aiohttp.ClientSession | None = None
    try:
        while True:
            await asyncio.sleep(interval_s)
            if not pool_secrets.by_pool:
                continue
            if session is None:  # aiohttp (~10 MB) only once there are pools to probe
                import aiohttp

                session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
            await _probe_pools(store, pool_secrets, upstreams, interval_s, session, events)
    finally:
        if session is not None:
            await session.close()


async def _probe_pools(store: PoolStore, pool_secrets: PoolSecrets, upstreams: dict[str, str],
                       interval_s: float, session: aiohttp.ClientSession,
                       events: EventLog | None = None) -> None:
    import aiohttp

    for pool, held in list(pool_secrets.by_pool.items()):
        try:
            provider, due = await store.probe_candidates(
                pool, pool_secrets.held_ids(pool), int(interval_s * 1000))
        except REDIS_FAILURES as exc:
            log.warning("probe: redis unavailable: %s", type(exc).__name__)
            return
        if provider not in PROVIDERS or not upstreams.get(provider):
            continue  # a pool of a provider that is not routed (any more): nothing to probe
        for kid in due:
            path, headers = PROVIDERS[provider].probe(held[kid])
            url = upstreams[provider].rstrip("/") + path
            if PROVIDERS[provider].is_signing_secret(held[kid]):
                parts = urlsplit(url)  # signed for the URL it goes to (AWS SigV4)
                target = parts.path + (f"?{parts.query}" if parts.query else "")
                signed, _ = PROVIDERS[provider].pooled_signature(held[kid], {
                    ":method": "GET", ":authority": parts.netloc, ":path": target}, b"")
                headers = {**headers, **dict(signed)}
            try:
                async with session.get(url, headers=headers) as response:
                    status = response.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("probe of %s/%s failed: %s", pool, kid[:8], type(exc).__name__)
                continue
            metrics.POOL_PROBES.labels(pool, str(status)).inc()
            try:
                before, state = await store.report_change(pool, kid, status, -1, 0, 0,
                                                          f"probe HTTP {status}")
            except REDIS_FAILURES:
                break
            metrics.set_pool_key_state(pool, kid[:PREFIX_CHARS], state)
            if events is not None and before != state:
                events.record("pool_key.state", "", {
                    "pool_key": kid[:PREFIX_CHARS], "state": state, "before": before,
                    "status": status, "probe": True}, provider, "", pool)
            log.info("probe of %s/%s: HTTP %d", pool, kid[:8], status)
