"""Admin tokens in Redis: name, role, the keyed hash of the token, creation time. The token
itself is never stored (tokenfuse.admin.tokens makes and checks it)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from tokenfuse.state.connection import text
from tokenfuse.state.keys import ADMIN_TOKEN_PATTERN, admin_token_key


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    name: str
    role: str
    digest: str
    created_ms: int


class AdminTokenStore:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def add(self, record: TokenRecord) -> None:
        self._redis.hset(admin_token_key(record.token_id), mapping={
            "name": record.name, "role": record.role, "digest": record.digest,
            "created_ms": record.created_ms})

    def get(self, token_id: str) -> TokenRecord | None:
        raw = {text(k): text(v) for k, v in
               self._redis.hgetall(admin_token_key(token_id)).items()}
        if not raw.get("digest"):
            return None
        return TokenRecord(token_id, raw.get("name", ""), raw.get("role", ""), raw["digest"],
                           int(raw.get("created_ms") or 0))

    def all(self) -> list[TokenRecord]:
        records = []
        for key in self._redis.scan_iter(match=ADMIN_TOKEN_PATTERN, count=500):
            record = self.get(text(key).removeprefix(admin_token_key("")))
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: (r.created_ms, r.name))

    def remove(self, token_id: str) -> bool:
        return bool(self._redis.delete(admin_token_key(token_id)))
