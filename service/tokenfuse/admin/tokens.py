"""Admin tokens: `tfadm_<id>_<secret>`, shown once when created. Redis keeps the name, the
role and HMAC-SHA256(server secret, token) under the id; a presented token is hashed the
same way and compared in constant time (a missing id is compared with a dummy digest, so
an unknown id takes as long as a wrong secret)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from tokenfuse.state.admin_tokens import AdminTokenStore, TokenRecord

PREFIX = "tfadm_"
ROLES = ("viewer", "operator")
_FORMAT = re.compile(r"^tfadm_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DUMMY = "0" * 64


class TokenError(ValueError):
    """A token that cannot be created (bad name or role, name taken)."""


def digest(server_secret: bytes, token: str) -> str:
    return hmac.new(server_secret, b"tokenfuse admin token|" + token.encode(),
                    hashlib.sha256).hexdigest()


def create(store: AdminTokenStore, server_secret: bytes, name: str, role: str) -> str:
    """A new token (returned once; only its keyed hash is stored)."""
    if role not in ROLES:
        raise TokenError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not _NAME.match(name):
        raise TokenError("a token name is 1-64 characters: letters, digits, . _ @ -")
    if any(r.name == name for r in store.all()):
        raise TokenError(f"a token named {name!r} exists: revoke it first")
    token_id = secrets.token_hex(8)
    token = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    store.add(TokenRecord(token_id, name, role, digest(server_secret, token),
                          int(time.time() * 1000)))
    return token


def verify(store: AdminTokenStore, server_secret: bytes, token: str) -> TokenRecord | None:
    """The token's record, or None (malformed, unknown, revoked or wrong)."""
    match = _FORMAT.match(token)
    record = store.get(match.group(1)) if match else None
    presented = digest(server_secret, token)
    expected = record.digest if record is not None else _DUMMY
    if not hmac.compare_digest(presented, expected) or record is None:
        return None
    return record if record.role in ROLES else None


def revoke(store: AdminTokenStore, name_or_id: str) -> TokenRecord:
    for record in store.all():
        if name_or_id in (record.name, record.token_id):
            store.remove(record.token_id)
            return record
    raise TokenError(f"no admin token named {name_or_id!r}")
