"""The admin service's business logic, once: what the CLI, the JSON API (admin/api.py) and
the dashboard do. Synchronous (redis-py); every change is audited (who, what, when,
before/after) and announced where processors must see it at once (kill, limits). Answers
are the proto's messages (protos/tokenfuse/admin/v1/admin.proto), documents the CLI
prints are built from the same data. (Longer than 300 lines: one method per admin
operation, hence its length.)"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2

from tokenfuse.admin import usage as usage_view
from tokenfuse.admin.v1 import admin_pb2 as pb
from tokenfuse.config import WINDOWS, Settings
from tokenfuse.identity import ID_HEX_CHARS, PREFIX_CHARS, key_id
from tokenfuse.pools.secrets import PoolError, check_pool_name, parse_pool_csv
from tokenfuse.providers import PROVIDERS
from tokenfuse.state import audit, event_log
from tokenfuse.state.admin import BudgetAdmin, BudgetStatus
from tokenfuse.state.connection import SyncRedis
from tokenfuse.state.pools import PoolAdmin

_KEY_ID = re.compile(rf"^[0-9a-f]{{{ID_HEX_CHARS}}}$")
_VKEY_ID = _KEY_ID
#: ~9 million USD per window: the Lua scripts read limits as doubles, exact up to 2^53.
MAX_LIMIT_NANO = 2**53 - 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@:/-]{0,63}")  # gateway-key names: printable
_PRINTABLE_KEY = re.compile(r"[\x21-\x7e]+")  # a key goes into a header value as it is
MAX_LIST = 1000
POOL_EXPORT_HEADER = ["pool", "id", "label", "weight", "enabled", "state", "requests",
                      "tokens", "spend_nano_usd"]


class AdminError(Exception):
    """A refused admin call: `kind` names the gRPC status (admin/api.py maps it)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # invalid | not_found | conflict | precondition


@dataclass(frozen=True)
class Actor:
    """Who acts: an admin token's name and role, or the CLI."""

    name: str
    role: str


CLI = Actor("cli", "operator")


def budget_document(key: str, status: BudgetStatus) -> dict[str, Any]:
    """What `budget status --json` prints and GET /api/v1/budgets/{key_id} answers."""
    def iso(epoch: int) -> str | None:
        return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None

    return {
        "key_id": key,
        "key_id_prefix": key[:PREFIX_CHARS],
        "killed": status.killed,
        "limits": "own" if status.own_limits else "defaults",
        "windows": {
            w.window: {
                "limit_nano_usd": w.limit_nano,
                "spent_nano_usd": w.spent_nano,
                "reserved_nano_usd": w.reserved_nano,
                "remaining_nano_usd": w.remaining_nano,
                "resets_at": iso(w.resets_at),
            }
            for w in status.windows
        },
    }


def to_struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    """A JSON object as a Struct; integers as strings (a Struct number is a double, and
    nano-USD must stay exact)."""
    def exact(v: Any) -> Any:
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, int):
            return str(v)
        if isinstance(v, dict):
            return {str(k): exact(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [exact(x) for x in v]
        return v

    out = struct_pb2.Struct()
    if value:
        out.update(exact(value))
    return out


class AdminCore:
    def __init__(self, client: SyncRedis, settings: Settings, secret: bytes,
                 reload_pools: Callable[[], None] | None = None) -> None:
        """`reload_pools`: re-read this processor's pool files after an import (the API
        runs in the processor); other processors re-read theirs on SIGHUP."""
        self.redis = client
        self._settings = settings
        self._secret = secret
        self._budgets = BudgetAdmin(client, settings.budgets.default_limit_args())
        self._pools = PoolAdmin(client, secret)
        self._reload_pools = reload_pools

    # --------------------------------------------------------------- audit and events
    def audit_token_change(self, action: str, name: str, role: str) -> None:
        """Admin tokens are made and revoked by the CLI only: audited like any action."""
        self._audit(CLI, action, f"admin-token:{name}", None if action.endswith("create")
                    else {"name": name, "role": role},
                    {"name": name, "role": role} if action.endswith("create") else None)

    def _audit(self, actor: Actor, action: str, target: str, before: Any, after: Any) -> None:
        audit.record(self.redis, self._settings.admin.audit_max_entries, actor=actor.name,
                     role=actor.role, action=action, target=target, before=before,
                     after=after, at_ms=int(time.time() * 1000))

    def audit_entries(self, limit: int) -> pb.AuditList:
        rows = audit.read(self.redis, _limit(limit))
        return pb.AuditList(entries=[pb.AuditEntry(
            id=r["id"], at_ms=r["at_ms"], actor=r["actor"], role=r["role"],
            action=r["action"], target=r["target"], before=to_struct(r["before"]),
            after=to_struct(r["after"])) for r in rows])

    def events(self, limit: int, kind: str = "") -> pb.EventList:
        rows = event_log.read_events(self.redis, _limit(limit), kind)
        return pb.EventList(events=[pb.Event(
            id=r["id"], at_ms=r["at_ms"], kind=r["kind"], key_id_prefix=r["key_id_prefix"],
            provider=r.get("provider", ""), model=r.get("model", ""), pool=r.get("pool", ""),
            detail=to_struct(r.get("detail"))) for r in rows])

    # --------------------------------------------------------------------- budgets
    def caller_of(self, api_key: str) -> str:
        """The key id of an API key (the CLI's --key)."""
        return key_id(self._secret, api_key)

    def _known(self, key: str, must_exist: bool) -> str:
        if not _KEY_ID.fullmatch(key or ""):
            raise AdminError("invalid", f"a key id is {ID_HEX_CHARS} lowercase hex characters "
                             "(`tokenfuse budget status --key … --json` prints it)")
        if must_exist and not self._budgets.known(key):
            raise AdminError("not_found", f"no key {key[:PREFIX_CHARS]}… on this Redis (no "
                             "limits, no spend)")
        return key

    def budget_doc(self, key: str, must_exist: bool = True) -> dict[str, Any]:
        return budget_document(self._known(key, must_exist), self._budgets.status(key))

    def budget(self, key: str, must_exist: bool = True) -> pb.Budget:
        return json_format.ParseDict(self.budget_doc(key, must_exist), pb.Budget())

    def budgets(self) -> pb.BudgetList:
        return pb.BudgetList(budgets=[self.budget(k, False) for k in self._budgets.callers()])

    def set_budget(self, actor: Actor, key: str, limits: dict[str, int],
                   must_exist: bool = True) -> pb.Budget:
        self._known(key, must_exist)
        if not limits:
            raise AdminError("invalid", "give at least one limit: " + " ".join(WINDOWS))
        unknown = sorted(set(limits) - set(WINDOWS))
        if unknown:
            raise AdminError("invalid", f"unknown window(s) {unknown}: use {' '.join(WINDOWS)}")
        bad = sorted(w for w, v in limits.items() if not 0 <= v <= MAX_LIMIT_NANO)
        if bad:
            raise AdminError("invalid", f"limit of {bad} out of range: 0 to {MAX_LIMIT_NANO} "
                             "nano-USD")
        before = self._limits_of(key)
        self._budgets.set_limits(key, dict(limits))
        self._audit(actor, "budget.set", key, before, self._limits_of(key))
        return self.budget(key, False)

    def clear_budget(self, actor: Actor, key: str, must_exist: bool = True) -> pb.Budget:
        self._known(key, must_exist)
        before = self._limits_of(key)
        self._budgets.clear_limits(key)
        self._audit(actor, "budget.clear", key, before, self._limits_of(key))
        return self.budget(key, False)

    def set_killed(self, actor: Actor, key: str, killed: bool,
                   must_exist: bool = True) -> pb.Budget:
        self._known(key, must_exist)
        before = self._limits_of(key)
        self._budgets.set_killed(key, killed)
        self._audit(actor, "key.kill" if killed else "key.lift", key, before,
                    self._limits_of(key))
        event_log.record_sync(self.redis, "key.killed" if killed else "key.lifted",
                              key[:PREFIX_CHARS], {"by": actor.name},
                              max_events=self._settings.analytics.events_max)
        return self.budget(key, False)

    def _limits_of(self, key: str) -> dict[str, Any]:
        """A key's own limits and kill flag (the audit's before/after)."""
        status = self._budgets.status(key)
        return {"killed": status.killed, "limits_nano_usd": {
            w.window: w.limit_nano for w in status.windows
            if status.own_limits and w.limit_nano is not None}}

    # ---------------------------------------------------------------- gateway keys
    def gateway_keys(self) -> pb.GatewayKeyList:
        return pb.GatewayKeyList(keys=[pb.GatewayKey(**row)
                                       for row in self._pools.virtual_keys()])

    def create_gateway_key(self, actor: Actor, name: str, pool: str) -> pb.CreatedGatewayKey:
        if not _NAME.fullmatch(name or ""):
            raise AdminError("invalid", "a gateway key's name is 1-64 printable characters: "
                             "letters, digits, space . _ @ : / -")
        try:
            secret, vid = self._pools.create_virtual_key(name, pool)
        except PoolError as exc:
            raise AdminError("invalid", str(exc)) from None
        row = next(r for r in self._pools.virtual_keys() if r["id"] == vid)
        self._audit(actor, "gateway_key.create", vid, None, {"name": name, "pool": pool})
        return pb.CreatedGatewayKey(key=pb.GatewayKey(**row), secret=secret)

    def revoke_gateway_key(self, actor: Actor, vid: str) -> pb.GatewayKey:
        if not _VKEY_ID.fullmatch(vid or ""):
            raise AdminError("invalid", f"a gateway key id is {ID_HEX_CHARS} hex characters")
        row = self._pools.revoke_virtual_key(vid)
        if row is None:
            raise AdminError("not_found", f"no gateway key {vid[:PREFIX_CHARS]}…")
        self._audit(actor, "gateway_key.revoke", vid, row, None)
        return pb.GatewayKey(**row)

    # ----------------------------------------------------------------------- pools
    def pool_rows(self, pool: str = "") -> list[dict[str, Any]]:
        names = [pool] if pool else self._pools.pools()
        if pool and pool not in self._pools.pools():
            raise AdminError("not_found", f"no pool {pool!r}")
        return [row for name in names for row in self._pools.list_keys(name)]

    def pools(self) -> pb.PoolList:
        return pb.PoolList(pools=[self.pool(name) for name in self._pools.pools()])

    def pool(self, name: str) -> pb.Pool:
        return pb.Pool(name=name, provider=self._pools.provider(name),
                       keys=[_pool_key(row) for row in self._pools.list_keys(name)])

    def export_pool_csv(self, pool: str = "") -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(POOL_EXPORT_HEADER)
        for row in self.pool_rows(pool):
            writer.writerow([csv_cell(row[h]) for h in POOL_EXPORT_HEADER])
        return out.getvalue()

    def set_pool_key_enabled(self, actor: Actor, pool: str, key: str,
                             enabled: bool) -> pb.PoolKey:
        before = next((r for r in self.pool_rows(pool) if key in (r["id"], r["label"])), None)
        if before is None:
            raise AdminError("not_found", f"no key {key!r} in pool {pool!r}")
        self._pools.set_enabled(pool, before["id"], enabled)
        after = next(r for r in self.pool_rows(pool) if r["id"] == before["id"])
        self._audit(actor, "pool_key.enable" if enabled else "pool_key.disable",
                    f"{pool}/{before['id']}", _health_of(before), _health_of(after))
        event_log.record_sync(self.redis, "pool_key.state", "", {
            "key": before["id"][:PREFIX_CHARS], "label": before["label"],
            "state": after["state"] if enabled else "disabled", "by": actor.name}, pool=pool,
            max_events=self._settings.analytics.events_max)
        return _pool_key(after)

    def import_pool(self, actor: Actor, pool: str, provider: str, text: str) -> pb.Pool:
        """Register a pool CSV's keys (ids, labels, weights) and merge the keys into the
        pool file this processor reads."""
        limit = self._settings.admin.max_upload_bytes
        if len(text.encode()) > limit:
            raise AdminError("invalid", f"the CSV is over {limit} bytes "
                             "(TOKENFUSE_ADMIN_MAX_UPLOAD_BYTES)")
        if provider not in PROVIDERS:
            raise AdminError("invalid", f"provider must be one of {', '.join(sorted(PROVIDERS))}")
        try:
            check_pool_name(pool)
            keys = parse_pool_csv(text)
            path = self._settings.pools.directory / f"{pool}.csv"
            held = parse_pool_csv(path.read_text()) if path.exists() else []
        except (PoolError, UnicodeDecodeError) as exc:
            raise AdminError("invalid", f"pool {pool!r}: {exc}") from None
        if not keys:
            raise AdminError("invalid", "the CSV holds no key")
        secrets = {k.secret for k in keys}
        for number, k in enumerate(keys, start=2):
            if not _PRINTABLE_KEY.fullmatch(k.secret):
                raise AdminError("invalid", f"line {number}: a key is printable ASCII "
                                 "without spaces (it is sent as a header value)")
            if any(secret in k.label for secret in secrets | {h.secret for h in held}):
                raise AdminError("invalid", f"line {number}: the label holds a key (labels "
                                 "are shown to viewers)")
        known = self._pools.provider(pool)
        if known and known != provider:
            raise AdminError("precondition", f"pool {pool!r} holds {known} keys, not {provider}")
        merged = {k.secret: k for k in held} | {k.secret: k for k in keys}
        try:
            _write_private(path, merged.values())
        except OSError as exc:
            raise AdminError("precondition", f"cannot write the pool file ({exc.strerror}); "
                             "put it in TOKENFUSE_POOLS_DIR yourself") from None
        before = [r["id"] for r in self.pool_rows()] if known else []
        ids = self._pools.import_keys(pool, keys, provider)
        if self._reload_pools is not None:
            self._reload_pools()
        self._audit(actor, "pool.import", pool, {"keys": len(before)} if known else None,
                    {"provider": provider, "imported": [i[:PREFIX_CHARS] for i in ids]})
        return self.pool(pool)

    # ----------------------------------------------------------------------- usage
    def usage(self, window: str, group_by: str, start_ms: int = 0,
              end_ms: int = 0) -> pb.UsageReport:
        return usage_view.report(self.redis, window, group_by, start_ms, end_ms)

    def series(self, resolution: str, group_by: str, start_ms: int = 0,
               end_ms: int = 0) -> pb.UsageSeries:
        return usage_view.series(self.redis, resolution, group_by, start_ms, end_ms)

    def export_usage(self, fmt: str, resolution: str, group_by: str, start_ms: int = 0,
                     end_ms: int = 0) -> tuple[str, bytes]:
        if fmt not in ("csv", "json"):
            raise AdminError("invalid", "format is csv or json")
        rows = usage_view.rows(self.series(resolution or "hour", group_by, start_ms, end_ms))
        if fmt == "json":
            return "application/json", json.dumps(rows, indent=1).encode()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=usage_view.ROW_FIELDS)
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
        return "text/csv; charset=utf-8", out.getvalue().encode()

    def overview(self) -> pb.Overview:
        now_ms = int(time.time() * 1000)
        today = usage_view.report(self.redis, "day", "")
        month = usage_view.report(self.redis, "month", "")
        budgets = sorted(self.budgets().budgets,
                         key=lambda b: -b.windows["month"].spent_nano_usd)[:200]
        return pb.Overview(now_ms=now_ms, today=today.totals, month=month.totals,
                           requests_last_minute=usage_view.requests_last_minute(self.redis),
                           live_streams=usage_view.live_streams(self.redis), budgets=budgets)


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting like a formula (a model name or
    label is client or operator text) gets a leading apostrophe (OWASP's advice)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _limit(limit: int) -> int:
    return 100 if limit <= 0 else min(limit, MAX_LIST)


def _pool_key(row: dict[str, Any]) -> pb.PoolKey:
    return pb.PoolKey(
        pool=row["pool"], id=row["id"], label=row["label"], weight=row["weight"],
        enabled=row["enabled"], state=row["state"] if row["enabled"] else "disabled",
        cooldown_until_ms=row["cooldown_until_ms"] or 0, last_error=row["last_error"] or "",
        requests=row["requests"], errors_by_status=row["errors_by_status"],
        tokens=row["tokens"], spend_nano_usd=row["spend_nano_usd"])


def _health_of(row: dict[str, Any]) -> dict[str, Any]:
    return {"enabled": row["enabled"], "state": row["state"]}


def _write_private(path: Path, keys: Any) -> None:
    """The pool file, replaced atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", "label", "weight"])
    for k in keys:
        writer.writerow([k.secret, k.label, k.weight])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(out.getvalue())
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise
