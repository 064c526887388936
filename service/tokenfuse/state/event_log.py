"""The events feed: blocks and state changes operators see in the dashboard.

One capped Redis stream (`tf:events`, `XADD MAXLEN ~ TOKENFUSE_EVENTS_MAX`): loops
detected, budgets exceeded (the first refusal of a window, as the webhook), thresholds
crossed, streams cut, pool key state changes (written by the processor, in the
background: `EventLog.record` never blocks or fails a request), kills and key changes
(written by the admin side, `record_sync`).

An entry's fields: at_ms, kind, key_id_prefix (8 characters of the caller's key id, never
a key), provider, model, pool, detail (a small JSON object; never prompt text or a key).
"""

from __future__ import annotations

import json
import time
from typing import Any

from tokenfuse.identity import PREFIX_CHARS
from tokenfuse.state.background import BackgroundWrites
from tokenfuse.state.connection import text
from tokenfuse.state.keys import EVENTS_KEY
from tokenfuse.state.redis_pipe import PipelinedRedis

DEFAULT_MAX_EVENTS = 10000
#: A detail longer than this (JSON) is replaced by {"truncated": true}: the feed stays small.
MAX_DETAIL_BYTES = 2048
FIELDS = ("at_ms", "kind", "key_id_prefix", "provider", "model", "pool")


def _entry(kind: str, key_id_prefix: str, detail: dict[str, Any], provider: str,
           model: str, pool: str) -> list[str]:
    body = json.dumps(detail, separators=(",", ":"), default=str)
    if len(body) > MAX_DETAIL_BYTES:
        body = '{"truncated":true}'
    values = (str(int(time.time() * 1000)), kind, key_id_prefix[:PREFIX_CHARS], provider,
              model, pool)
    return [*(part for pair in zip(FIELDS, values, strict=True) for part in pair),
            "detail", body]


class EventLog:
    """The processor's writer: one XADD per event, off the request path."""

    def __init__(self, decisions: PipelinedRedis | Any, max_events: int = DEFAULT_MAX_EVENTS,
                 queue_size: int = 1000, timeout_s: float = 1.0) -> None:
        self._decisions = decisions
        self._max = max_events
        self._writes = BackgroundWrites("events", queue_size, timeout_s)

    def record(self, kind: str, key_id_prefix: str, detail: dict[str, Any],
               provider: str = "", model: str = "", pool: str = "") -> None:
        command = ("XADD", EVENTS_KEY, "MAXLEN", "~", self._max, "*",
                   *_entry(kind, key_id_prefix, detail, provider, model, pool))
        self._writes.put(lambda: self._decisions.execute(*command))

    async def flush(self) -> None:
        await self._writes.flush()

    async def close(self) -> None:
        await self._writes.close()


def record_sync(client: Any, kind: str, key_id_prefix: str, detail: dict[str, Any],
                provider: str = "", model: str = "", pool: str = "",
                max_events: int = DEFAULT_MAX_EVENTS) -> str:
    """The admin side's writer (kills, key enable/disable); returns the entry's id.
    `client`: a synchronous redis-py client."""
    fields = _entry(kind, key_id_prefix, detail, provider, model, pool)
    entry = client.xadd(EVENTS_KEY, dict(zip(fields[::2], fields[1::2], strict=True)),
                        maxlen=max_events, approximate=True)
    return text(entry)


def read_events(client: Any, limit: int = 100, kind: str = "") -> list[dict[str, Any]]:
    """The newest `limit` events (of `kind`, when given), newest first: dicts with id,
    at_ms, kind, key_id_prefix, provider, model, pool, detail (a dict)."""
    out: list[dict[str, Any]] = []
    upper = "+"
    page = max(limit, 100) if kind else limit
    while len(out) < limit:
        entries = client.xrevrange(EVENTS_KEY, max=upper, min="-", count=page)
        for entry_id, raw in entries:
            fields = {text(k): text(v) for k, v in raw.items()}
            if kind and fields.get("kind") != kind:
                continue
            try:
                detail = json.loads(fields.get("detail", "{}"))
            except ValueError:
                detail = {}
            out.append({"id": text(entry_id), "at_ms": int(fields.get("at_ms", "0") or 0),
                        **{f: fields.get(f, "") for f in FIELDS[1:]},
                        "detail": detail if isinstance(detail, dict) else {}})
            if len(out) == limit:
                break
        if len(entries) < page:
            break
        upper = "(" + text(entries[-1][0])  # exclusive: the next page starts below it
    return out
