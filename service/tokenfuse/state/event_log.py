"""PLACEHOLDER until the analytics branch lands (replaced by its event_log.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from tokenfuse.state.connection import text
from tokenfuse.state.keys import EVENTS_STREAM


def record_sync(client: redis.Redis, kind: str, key_id_prefix: str, detail: dict[str, Any],
                provider: str = "", model: str = "", pool: str = "") -> None:
    client.xadd(EVENTS_STREAM, {"at_ms": int(time.time() * 1000), "kind": kind,
                                "key_id_prefix": key_id_prefix, "provider": provider,
                                "model": model, "pool": pool, "detail": json.dumps(detail)},
                maxlen=10000, approximate=True)


def read_events(client: redis.Redis, limit: int, kind: str = "") -> list[dict[str, Any]]:
    out = []
    for entry_id, fields in client.xrevrange(EVENTS_STREAM, count=limit):
        f = {text(k): text(v) for k, v in fields.items()}
        if kind and f.get("kind") != kind:
            continue
        out.append({"id": text(entry_id), "at_ms": int(f.get("at_ms") or 0), **{
            k: f.get(k, "") for k in ("kind", "key_id_prefix", "provider", "model", "pool")},
            "detail": json.loads(f.get("detail") or "{}")})
    return out
