"""What readiness (`/readyz`, tokenfuse.health) asks Redis: that it answers a PING, and
that the decision path's Lua scripts are loaded. Scripts Redis lost (a restart without
persistence, SCRIPT FLUSH) are loaded again here, so a ready processor's first EVALSHA
does not pay for an EVAL."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from tokenfuse.state import scripts
from tokenfuse.state.connection import REDIS_FAILURES

log = logging.getLogger("tokenfuse")

#: The scripts the processor calls by SHA (EVALSHA) on its decision path.
DECISION_SCRIPTS = ("reserve", "settle", "extend", "pool_pick", "pool_report")
OK = "ok"


async def store_checks(client: aioredis.Redis, timeout_s: float) -> dict[str, str]:
    """{"redis": ..., "scripts": ...}: "ok", or what is wrong (never a URL or password)."""
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    except REDIS_FAILURES as exc:
        return {"redis": f"unreachable ({type(exc).__name__})", "scripts": "unknown"}
    wanted = [scripts.load(name) for name in DECISION_SCRIPTS]
    try:
        async with asyncio.timeout(timeout_s):
            present = await client.script_exists(*(script.sha for script in wanted))
            missing = [s for s, there in zip(wanted, present, strict=True) if not there]
            for script in missing:
                await client.script_load(script.source)
    except REDIS_FAILURES as exc:
        return {"redis": OK, "scripts": f"not loaded ({type(exc).__name__})"}
    if missing:
        log.info("readiness: loaded %d Lua script(s) Redis did not have: %s", len(missing),
                 ", ".join(s.name for s in missing))
    return {"redis": OK, "scripts": OK}
