"""Pool files: each pool's provider keys, read from CSV into this process's memory only.

An operator keeps each pool's keys in a CSV file (`key,label,weight`) where the processors
can read it: `$TOKENFUSE_POOLS_DIR/<pool>.csv` (a secret mount in production). The
processors load the secrets at start and on SIGHUP; `tokenfuse keys import` registers the
pool's key ids (keyed hashes), labels and weights in Redis (`tokenfuse.state.pools`),
where every replica shares the round-robin counter and each key's health. No secret is
ever written anywhere by tokenfuse. Gateway (virtual) keys `tfk-…` are bound to a pool;
only their hash is stored.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tokenfuse.identity import key_id

log = logging.getLogger("tokenfuse.pools")

POOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PoolError(ValueError):
    """A pool file or command tokenfuse cannot use."""


@dataclass(frozen=True)
class PoolKey:
    secret: str
    label: str
    weight: int


#: AWS credentials instead of a key (a pool whose provider signs each attempt with
#: SigV4): `aws_access_key_id,aws_secret_access_key,region[,session_token]` columns, held
#: as one secret `aws4:<access key id>:<secret>:<region>[:<session token>]`.
AWS_COLUMNS = ("aws_access_key_id", "aws_secret_access_key", "region")
AWS_SECRET_PREFIX = "aws4:"


def parse_pool_csv(text: str) -> list[PoolKey]:
    """Rows of `key,label,weight` (label and weight optional; a header row is required),
    or of AWS credentials (`AWS_COLUMNS`, optional `session_token`) in place of `key`."""
    reader = csv.DictReader(io.StringIO(text))
    names = [f.strip().lower() for f in reader.fieldnames or ()]
    aws = all(c in names for c in AWS_COLUMNS)
    if "key" not in names and not aws:
        raise PoolError("pool CSV needs a header row with at least a 'key' column (or "
                        + ", ".join(AWS_COLUMNS) + " for AWS credentials)")
    out: list[PoolKey] = []
    for number, row in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        secret = row.get("key", "")
        if aws and not secret:
            parts = [row.get(c, "") for c in AWS_COLUMNS]
            if not all(parts) or any(":" in p for p in parts) \
                    or ":" in row.get("session_token", ""):
                raise PoolError(f"line {number}: AWS credentials need an access key id, a "
                                "secret and a region (none containing ':')")
            token = row.get("session_token", "")
            secret = AWS_SECRET_PREFIX + ":".join(parts + ([token] if token else []))
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
