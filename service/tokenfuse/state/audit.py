"""The audit trail: every operator action (who, what, when, before/after) as one entry of a
capped Redis stream, newest read first."""

from __future__ import annotations

import json
from typing import Any

import redis

from tokenfuse.state.connection import text
from tokenfuse.state.keys import AUDIT_STREAM


def record(client: redis.Redis, max_entries: int, *, actor: str, role: str, action: str,
           target: str, before: dict[str, Any] | None, after: dict[str, Any] | None,
           at_ms: int) -> str:
    """Append one entry; returns its stream id."""
    entry = {"at_ms": at_ms, "actor": actor, "role": role, "action": action,
             "target": target, "before": json.dumps(before, sort_keys=True),
             "after": json.dumps(after, sort_keys=True)}
    return text(client.xadd(AUDIT_STREAM, entry, maxlen=max_entries, approximate=True))


def read(client: redis.Redis, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` entries, newest first."""
    rows = []
    for entry_id, fields in client.xrevrange(AUDIT_STREAM, count=limit):
        f = {text(k): text(v) for k, v in fields.items()}
        rows.append({"id": text(entry_id), "at_ms": int(f.get("at_ms") or 0),
                     "actor": f.get("actor", ""), "role": f.get("role", ""),
                     "action": f.get("action", ""), "target": f.get("target", ""),
                     "before": json.loads(f.get("before") or "null"),
                     "after": json.loads(f.get("after") or "null")})
    return rows
