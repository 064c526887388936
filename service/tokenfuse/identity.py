"""Caller identity: a keyed hash of the API key. The key itself is never stored."""

from __future__ import annotations

import hashlib
import hmac

ID_HEX_CHARS = 32  # 128 bits of HMAC-SHA256: collision-free for any realistic key count
PREFIX_CHARS = 8  # what logs, metrics labels and webhooks may show
VIRTUAL_KEY_PREFIX = "tfk-"  # gateway keys bound to a provider key pool (tokenfuse.pools)


def key_id(secret: bytes, api_key: str) -> str:
    """Stable identifier of an API key: HMAC-SHA256(secret, key), hex, truncated."""
    return hmac.new(secret, api_key.encode(), hashlib.sha256).hexdigest()[:ID_HEX_CHARS]


def secret_fingerprint(secret: bytes) -> str:
    """What tells two gateways' secrets apart without revealing either (state/secret_check.py)."""
    return hmac.new(secret, b"tokenfuse secret check", hashlib.sha256).hexdigest()[:ID_HEX_CHARS]
