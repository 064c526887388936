"""Operator CLI: `tokenfuse budget set|status|clear --key …`, `tokenfuse kill --key …`,
`tokenfuse keys …`, `tokenfuse vkey create|list|revoke`, `tokenfuse admin token
create|list|revoke`, `tokenfuse audit`, `tokenfuse prices refresh --source …`.

Budgets, kills, gateway keys and pools go through the admin service's logic
(tokenfuse.admin.core), as the JSON API and the dashboard do; every change is audited
with the actor "cli". (Longer than 300 lines: one parser and one handler per command
group, hence its length.)

`--key` takes the API key itself; only its keyed hash (HMAC with the server secret)
reaches Redis, so the CLI needs the same TOKENFUSE_SECRET / secret file as the processor.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf import json_format

from tokenfuse import price_refresh
from tokenfuse.admin import tokens
from tokenfuse.admin.core import CLI, POOL_EXPORT_HEADER, AdminCore, AdminError
from tokenfuse.config import WINDOWS, ConfigError, Settings, load_secret, load_settings
from tokenfuse.identity import PREFIX_CHARS, secret_fingerprint
from tokenfuse.money import nano_to_usd, usd_to_nano
from tokenfuse.pools.secrets import PoolError, PoolSecrets, parse_pool_csv
from tokenfuse.pricing import BUILTIN_PRICES
from tokenfuse.providers import DEFAULT_PROVIDER, PROVIDERS
from tokenfuse.state import secret_check
from tokenfuse.state.admin_tokens import AdminTokenStore
from tokenfuse.state.connection import REDIS_FAILURES, sync_client
from tokenfuse.state.pools import PoolAdmin

# CLI flag -> window name
WINDOW_FLAGS = {
    "minute": "minute", "hourly": "hour", "daily": "day",
    "weekly": "week", "monthly": "month", "total": "total",
}


def _usd(text: str) -> int:
    try:
        return usd_to_nano(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfuse", description=__doc__.split("\n")[0])
    groups = parser.add_subparsers(dest="group", required=True)
    budget = groups.add_parser("budget", help="per-key budgets (USD, UTC calendar windows)")
    actions = budget.add_subparsers(dest="action", required=True)

    set_cmd = actions.add_parser("set", help="set one or more window limits")
    set_cmd.add_argument("--key", required=True, help="the API key (hashed, never stored)")
    for flag in WINDOW_FLAGS:
        set_cmd.add_argument(f"--{flag}", type=_usd, metavar="USD")

    status = actions.add_parser("status", help="limit, spent, reserved, remaining, reset")
    status.add_argument("--key", required=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    clear = actions.add_parser("clear", help="remove the key's own limits (spend is kept)")
    clear.add_argument("--key", required=True)

    keys = groups.add_parser("keys", help="provider key pools (secrets never stored)")
    key_actions = keys.add_subparsers(dest="action", required=True)
    imp = key_actions.add_parser("import", help="register a pool CSV (key,label,weight)")
    imp.add_argument("--pool", required=True)
    imp.add_argument("--provider", default=DEFAULT_PROVIDER,
                     help=f"the provider the pool's keys are for: {', '.join(PROVIDERS)}, or a "
                          "name declared in TOKENFUSE_OPENAI_COMPATIBLE")
    imp.add_argument("csv_file")
    for name, text in (("list", "keys with health, cooldown, last error, usage"),
                       ("export", "CSV of ids, labels, weights and health")):
        cmd = key_actions.add_parser(name, help=text)
        cmd.add_argument("--pool", help="one pool (default: all)")
        if name == "list":
            cmd.add_argument("--json", action="store_true")
        else:
            cmd.add_argument("--include-secrets", action="store_true",
                             help="add the secrets, read from $TOKENFUSE_POOLS_DIR/<pool>.csv")
    for name in ("enable", "disable"):
        cmd = key_actions.add_parser(name, help=f"{name} one key (by id or label)")
        cmd.add_argument("--pool", required=True)
        cmd.add_argument("key")

    vkey = groups.add_parser("vkey", help="gateway keys bound to a pool")
    vkey_actions = vkey.add_subparsers(dest="action", required=True)
    create = vkey_actions.add_parser("create", help="create one; it is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--pool", required=True)
    vkey_actions.add_parser("list", help="ids, names, pools (never the keys)")
    revoke = vkey_actions.add_parser("revoke", help="delete one (by id)")
    revoke.add_argument("id")

    admin = groups.add_parser("admin", help="admin API tokens (viewer reads, operator acts)")
    admin_groups = admin.add_subparsers(dest="object", required=True)
    token = admin_groups.add_parser("token", help="admin tokens")
    token_actions = token.add_subparsers(dest="action", required=True)
    token_create = token_actions.add_parser("create", help="create one; it is printed once")
    token_create.add_argument("--name", required=True)
    token_create.add_argument("--role", required=True, choices=tokens.ROLES)
    token_actions.add_parser("list", help="names, roles, creation times (never the tokens)")
    token_revoke = token_actions.add_parser("revoke", help="revoke one (by name or id)")
    token_revoke.add_argument("name")

    audit = groups.add_parser("audit", help="the audit trail of operator actions")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--json", action="store_true")

    kill = groups.add_parser("kill", help="kill switch: refuse the key's requests and end "
                                          "its in-flight streams within one chunk")
    kill.add_argument("--key", required=True)
    kill.add_argument("--lift", action="store_true", help="lift the kill switch")

    prices = groups.add_parser("prices", help="the model price table")
    price_actions = prices.add_subparsers(dest="action", required=True)
    refresh = price_actions.add_parser(
        "refresh", help="regenerate the table from LiteLLM's price dataset (exact)")
    refresh.add_argument("--source", required=True,
                         help="model_prices_and_context_window.json, a litellm wheel, or URL")
    refresh.add_argument("--output", type=Path, default=BUILTIN_PRICES,
                         help="the table to write (default: the shipped one)")
    refresh.add_argument("--version", help="the dataset's version or commit (default: the "
                                           "wheel's version, else the file's sha256)")
    refresh.add_argument("--date", help="the dataset's date, YYYY-MM-DD (default: today)")
    return parser


def _prices_command(args: argparse.Namespace) -> int:
    """`prices refresh`: no Redis, no secret."""
    try:
        document = price_refresh.refresh(args.source, args.output, args.version, args.date)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        print(f"tokenfuse: cannot refresh prices from {args.source}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({document['source']['version']}, "
          f"{document['source']['date']})")
    print(price_refresh.summary(document))
    for name, note in document["unpriced"].items():
        if isinstance(note, dict) and str(note.get("reason", "")).startswith("not priced:"):
            print(f"tokenfuse: {name}: {note['reason']}", file=sys.stderr)
    return 0


def _print_status(doc: dict[str, object]) -> None:
    print(f"key {doc['key_id_prefix']}…  limits: {doc['limits']}"
          + ("  KILLED" if doc["killed"] else ""))
    print(f"{'window':<8} {'limit':>14} {'spent':>14} {'reserved':>14} {'remaining':>14}  resets")
    windows = doc["windows"]
    assert isinstance(windows, dict)
    for name in WINDOWS:
        w = windows[name]

        def usd(v: int | None) -> str:
            return "-" if v is None else "$" + nano_to_usd(v)

        print(f"{name:<8} {usd(w['limit_nano_usd']):>14} {usd(w['spent_nano_usd']):>14} "
              f"{usd(w['reserved_nano_usd']):>14} {usd(w['remaining_nano_usd']):>14}  "
              f"{w['resets_at'] or 'never'}")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except REDIS_FAILURES as exc:
        # Never the URL: it may carry the password.
        print(f"tokenfuse: Redis refused or unreachable ({type(exc).__name__}: {exc}); use "
              "the TOKENFUSE_STATE_DIR and TOKENFUSE_LOCAL_REDIS_PORT of `make run`, or "
              "REDIS_URL", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.group == "prices":
        return _prices_command(args)
    try:
        settings = load_settings()
        secret = load_secret(settings)
    except ConfigError as exc:
        print(f"tokenfuse: {exc}", file=sys.stderr)
        return 2
    try:  # a budget set under another secret than the gateways' would bind no one
        secret_check.claim_sync(sync_client(settings.redis.url, settings.redis.cluster),
                                secret_fingerprint(secret))
    except secret_check.SecretMismatch as exc:
        print(f"tokenfuse: {exc}", file=sys.stderr)
        return 2
    core = AdminCore(sync_client(settings.redis.url, settings.redis.cluster), settings, secret)
    try:
        if args.group == "admin":
            return _tokens_command(args, core, secret)
        if args.group == "audit":
            return _audit_command(args, core)
        if args.group in ("keys", "vkey"):
            return _pools_command(args, settings, secret, core)
        return _budget_command(args, core)
    except (AdminError, tokens.TokenError, PoolError, OSError) as exc:
        print(f"tokenfuse: {exc}", file=sys.stderr)
        return 2


def _budget_command(args: argparse.Namespace, core: AdminCore) -> int:
    caller = core.caller_of(args.key)
    prefix = caller[:PREFIX_CHARS]
    if args.group == "kill":
        core.set_killed(CLI, caller, not args.lift, must_exist=False)
        print(f"kill switch {'lifted' if args.lift else 'set'} for key {prefix}…")
        return 0
    if args.action == "set":
        limits = {WINDOW_FLAGS[f]: getattr(args, f) for f in WINDOW_FLAGS
                  if getattr(args, f) is not None}
        if not limits:
            print("tokenfuse: give at least one of --" + " --".join(WINDOW_FLAGS),
                  file=sys.stderr)
            return 2
        core.set_budget(CLI, caller, limits, must_exist=False)
        print(f"budget set for key {prefix}…: "
              + ", ".join(f"{w} ${nano_to_usd(v)}" for w, v in limits.items()))
    elif args.action == "clear":
        core.clear_budget(CLI, caller, must_exist=False)
        print(f"budget cleared for key {prefix}… (defaults apply)")
    else:
        doc = core.budget_doc(caller, must_exist=False)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_status(doc)
    return 0


def _tokens_command(args: argparse.Namespace, core: AdminCore, secret: bytes) -> int:
    store = AdminTokenStore(core.redis)
    if args.action == "create":
        token = tokens.create(store, secret, args.name, args.role)
        print(token)
        print(f"(admin token '{args.name}', role {args.role}: shown once, only its keyed "
              "hash is stored)", file=sys.stderr)
    elif args.action == "revoke":
        record = tokens.revoke(store, args.name)
        print(f"admin token '{record.name}' ({record.role}) revoked")
    else:
        for record in store.all():
            created = datetime.fromtimestamp(record.created_ms // 1000, UTC).isoformat()
            print(f"{record.name:<24} {record.role:<9} {record.token_id}  {created}")
    return 0


def _audit_command(args: argparse.Namespace, core: AdminCore) -> int:
    entries = json_format.MessageToDict(core.audit_entries(args.limit),
                                        preserving_proto_field_name=True).get("entries", [])
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        at = datetime.fromtimestamp(int(e["at_ms"]) // 1000, UTC).isoformat()
        print(f"{at}  {e['actor']:<16} {e['action']:<20} {e['target']}  "
              f"{json.dumps(e.get('before'))} -> {json.dumps(e.get('after'))}")
    return 0


def _pools_command(args: argparse.Namespace, settings: Settings, secret: bytes,
                   core: AdminCore) -> int:
    admin = PoolAdmin(core.redis, secret)
    if args.group == "vkey":
        if args.action == "list":
            for row in core.gateway_keys().keys:
                print(f"{row.id}  {row.name:<24} pool {row.pool}")
            return 0
        if args.action == "revoke":
            row = core.revoke_gateway_key(CLI, args.id)
            print(f"gateway key '{row.name}' ({row.id[:PREFIX_CHARS]}…) revoked")
            return 0
        created = core.create_gateway_key(CLI, args.name, args.pool)
        print(created.secret)
        print(f"(gateway key '{args.name}' for pool '{args.pool}': shown once, only its hash "
              "is stored)", file=sys.stderr)
        return 0
    if args.action == "import":
        keys = parse_pool_csv(Path(args.csv_file).read_text())
        ids = admin.import_keys(args.pool, keys, args.provider)
        expected = settings.pools.directory / f"{args.pool}.csv"
        print(f"pool {args.pool}: {len(ids)} key(s) registered ({args.provider})")
        if not expected.exists():
            print(f"note: processors read the secrets from {expected}; put the file there",
                  file=sys.stderr)
        return 0
    if args.action in ("enable", "disable"):
        key = core.set_pool_key_enabled(CLI, args.pool, args.key, args.action == "enable")
        print(f"pool {args.pool}: key {key.id[:PREFIX_CHARS]}… {args.action}d")
        return 0
    rows = core.pool_rows(args.pool or "")
    if args.action == "list":
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'pool':<14}{'label':<14}{'id':<10}{'w':>3} {'state':<10}{'requests':>9}"
                  f"{'tokens':>10}{'spend $':>12}  last error")
            for r in rows:
                state = r["state"] if r["enabled"] else "off"
                print(f"{r['pool']:<14}{r['label']:<14}{r['id'][:8]:<10}{r['weight']:>3} "
                      f"{state:<10}{r['requests']:>9}{r['tokens']:>10}"
                      f"{nano_to_usd(r['spend_nano_usd']):>12}  {r['last_error'] or ''}")
        return 0
    if not args.include_secrets:
        sys.stdout.write(core.export_pool_csv(args.pool or ""))
        return 0
    loaded = PoolSecrets(secret, settings.pools.directory)
    loaded.load()
    out = csv.writer(sys.stdout)
    out.writerow([*POOL_EXPORT_HEADER, "key"])
    for r in rows:
        out.writerow([*(r[h] for h in POOL_EXPORT_HEADER),
                      loaded.by_pool.get(r["pool"], {}).get(r["id"], "")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
