"""Operator CLI: `tokenfuse budget set|status|clear --key …`, `tokenfuse kill --key …`.

`--key` takes the API key itself; only its keyed hash (HMAC with the server secret)
reaches Redis, so the CLI needs the same TOKENFUSE_SECRET / secret file as the processor.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from tokenfuse.config import WINDOWS, ConfigError, load_secret, load_settings
from tokenfuse.identity import PREFIX_CHARS, key_id
from tokenfuse.money import nano_to_usd, usd_to_nano
from tokenfuse.store import BudgetAdmin, BudgetStatus

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

    kill = groups.add_parser("kill", help="kill switch: refuse the key's requests and end "
                                          "its in-flight streams within one chunk")
    kill.add_argument("--key", required=True)
    kill.add_argument("--lift", action="store_true", help="lift the kill switch")
    return parser


def status_document(key_prefix: str, status: BudgetStatus) -> dict[str, object]:
    def iso(epoch: int) -> str | None:
        return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None

    return {
        "key_id_prefix": key_prefix,
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
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        secret = load_secret(settings.state_dir)
    except ConfigError as exc:
        print(f"tokenfuse: {exc}", file=sys.stderr)
        return 2
    admin = BudgetAdmin.from_url(settings.redis_url, settings.default_limit_args())
    caller = key_id(secret, args.key)
    prefix = caller[:PREFIX_CHARS]
    if args.group == "kill":
        admin.set_killed(caller, not args.lift)
        print(f"kill switch {'lifted' if args.lift else 'set'} for key {prefix}…")
        return 0
    if args.action == "set":
        limits = {WINDOW_FLAGS[f]: getattr(args, f) for f in WINDOW_FLAGS
                  if getattr(args, f) is not None}
        if not limits:
            print("tokenfuse: give at least one of --" + " --".join(WINDOW_FLAGS),
                  file=sys.stderr)
            return 2
        admin.set_limits(caller, limits)
        print(f"budget set for key {prefix}…: "
              + ", ".join(f"{w} ${nano_to_usd(v)}" for w, v in limits.items()))
    elif args.action == "clear":
        admin.clear_limits(caller)
        print(f"budget cleared for key {prefix}… (defaults apply)")
    else:
        doc = status_document(prefix, admin.status(caller))
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_status(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
