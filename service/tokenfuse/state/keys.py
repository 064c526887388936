"""The Redis key layout: the only place that names Redis keys.

Everything of one caller shares the hash tag `{<key id>}` and everything of one key pool
the tag `{<pool>}`, so every script touches one slot (and runs on Redis Cluster). The
Lua scripts get the prefix as an argument and the suffixes below through the prelude
`tokenfuse.state.scripts` generates, so the layout is written down once, here.

    tf:{<id>}:b          limits hash: minute..total (nano-USD), killed
    tf:{<id>}:u:<window> counters of one calendar window: s (spent), r (reserved)
    tf:{<id>}:rs         open reservations: rid -> "amount|touched_ms|window ids"
    tf:{<id>}:lp:<fp>    loop guard: ZSET of forwarded requests with this fingerprint
    tf:{<id>}:lc:<fp>    loop guard: cooldown after a block (hit count, PX = cooldown)
    tf:{<id>}:nd:<nfp>   near-duplicate tier: ZSET "<answer fp>|<rid>" of the settled calls
                         of the current streak of identical answers (score = ms, PX = window)
    tf:{<id>}:nc:<nfp>   near-duplicate tier: cooldown after a block (hit count, PX)
    tf:{<id>}:vel        velocity breaker: ZSET of forwarded requests, last minute
    tf:{<id>}:wt:<w>     threshold alert sent for window w (expires with it)
    tf:{<id>}:wx:<w>     budget.exceeded alert sent for window w (expires with it)
    tf:{<id>}:am:<n>     usage analytics of minute n since the epoch (hash: metric|group ->
    tf:{<id>}:ah:<n>     count; state/analytics.py), hour n, day n; written by settle.lua,
    tf:{<id>}:ad:<n>     reserve.lua (refusals), refusal.lua and reap.lua; EXPIREAT = end
                         of the period + retention (TOKENFUSE_ANALYTICS_*_RETENTION_*)
    tf:events            the events feed: a capped stream (state/event_log.py)
    tf:vk:<vkey id>      gateway key: name, pool
    tf:secret-check      fingerprint of the secret the gateways on this Redis key callers with
    tf:at:<token id>     admin token: name, role, digest (keyed hash of the token), created_ms
    tf:audit             audit trail: a stream of operator actions (capped, XADD MAXLEN ~)
    tfp:{<pool>}:keys    pool members: key id -> "weight|enabled|label"
    tfp:{<pool>}:rr      round-robin counter
    tfp:{<pool>}:meta    provider
    tfp:{<pool>}:h:<id>  health of one key (state, until, failures, counts)
    tfp:{<pool>}:probe:<id>  probe lock (one replica probes a key at a time)
"""

from __future__ import annotations

#: Suffixes after a caller's prefix `tf:{<id>}`.
CALLER = {
    "limits": ":b",
    "reservations": ":rs",
    "window": ":u:",
    "loop_hits": ":lp:",
    "loop_cooldown": ":lc:",
    "near_hits": ":nd:",
    "near_cooldown": ":nc:",
    "velocity": ":vel",
    "threshold_mark": ":wt:",
    "exceeded_mark": ":wx:",
    "analytics_minute": ":am:",
    "analytics_hour": ":ah:",
    "analytics_day": ":ad:",
}
#: Suffixes after a pool's prefix `tfp:{<pool>}`.
POOL = {
    "keys": ":keys",
    "round_robin": ":rr",
    "meta": ":meta",
    "health": ":h:",
    "probe_lock": ":probe:",
}
CONTROL_CHANNEL = "tf:control"
SECRET_CHECK_KEY = "tf:secret-check"  # state/secret_check.py
ADMIN_TOKEN_PATTERN = "tf:at:*"  # SCAN: every admin token (state/admin_tokens.py)
AUDIT_STREAM = "tf:audit"  # state/audit.py
LIMITS_PATTERN = "tf:{*}" + CALLER["limits"]  # SCAN: callers with own limits or a kill
TOTAL_WINDOW_PATTERN = "tf:{*}" + CALLER["window"] + "t"  # SCAN: callers that spent
RESERVATIONS_PATTERN = "tf:*" + CALLER["reservations"]  # SCAN: callers with reservations
POOLS_PATTERN = "tfp:{*}" + POOL["keys"]  # SCAN: every pool
EVENTS_KEY = "tf:events"  # state/event_log.py
#: Analytics bucket resolutions: the CALLER part naming their keys, and their length (s).
ANALYTICS_RESOLUTIONS = {"minute": ("analytics_minute", 60), "hour": ("analytics_hour", 3600),
                         "day": ("analytics_day", 86400)}


def caller_prefix(caller: str) -> str:
    return f"tf:{{{caller}}}"


def limits_key(caller: str) -> str:
    return caller_prefix(caller) + CALLER["limits"]


def reservations_key(caller: str) -> str:
    return caller_prefix(caller) + CALLER["reservations"]


def analytics_key(caller: str, resolution: str, bucket: int) -> str:
    """The bucket hash of one caller for period `bucket` (minutes/hours/days since the
    epoch) at `resolution` (minute, hour, day)."""
    return caller_prefix(caller) + CALLER[ANALYTICS_RESOLUTIONS[resolution][0]] + str(bucket)


def analytics_pattern(resolution: str) -> str:
    """SCAN MATCH for every caller's buckets at one resolution."""
    return "tf:{*}" + CALLER[ANALYTICS_RESOLUTIONS[resolution][0]] + "*"


def parse_analytics_key(key: str) -> tuple[str, int] | None:
    """(caller key id, bucket number) of a bucket key found by SCAN; None for a key that
    only looks like one."""
    caller = key[key.find("{") + 1 : key.find("}")]
    bucket = key.rpartition(":")[2]
    return (caller, int(bucket)) if caller and bucket.isdigit() else None


def prefix_of_reservations(key: str) -> str:
    """The caller prefix of a reservations key found by SCAN."""
    return key.removesuffix(CALLER["reservations"])


#: Stands for a fingerprint when a tier is off for a call (its keys are then not touched).
NO_FINGERPRINT = "-"


def caller_keys(caller: str, fingerprint: str, near_fingerprint: str) -> dict[str, str]:
    """Every key the pre-call decision touches (reserve.lua's KEYS)."""
    prefix = caller_prefix(caller)
    return {
        "limits": prefix + CALLER["limits"],
        "reservations": prefix + CALLER["reservations"],
        "loop_hits": prefix + CALLER["loop_hits"] + fingerprint,
        "loop_cooldown": prefix + CALLER["loop_cooldown"] + fingerprint,
        "near_hits": prefix + CALLER["near_hits"] + near_fingerprint,
        "near_cooldown": prefix + CALLER["near_cooldown"] + near_fingerprint,
        "velocity": prefix + CALLER["velocity"],
    }


def settle_keys(caller: str, near_fingerprint: str) -> dict[str, str]:
    """Every key settlement touches (settle.lua's KEYS): the reservation and the
    near-duplicate tier's answer streak."""
    prefix = caller_prefix(caller)
    return {
        "reservations": prefix + CALLER["reservations"],
        "near_hits": prefix + CALLER["near_hits"] + near_fingerprint,
    }


def pool_prefix(pool: str) -> str:
    return f"tfp:{{{pool}}}"


def pool_key(pool: str, part: str, member: str = "") -> str:
    """`tfp:{<pool>}<suffix>[<member>]` for one of the POOL parts."""
    return pool_prefix(pool) + POOL[part] + member


def pool_of_keys_key(key: str) -> str:
    """The pool named in a `tfp:{<pool>}:keys` key found by SCAN."""
    return key[key.index("{") + 1 : key.index("}")]


def vkey_key(vkey_id: str) -> str:
    return f"tf:vk:{vkey_id}"


VKEY_PATTERN = "tf:vk:*"  # SCAN: every gateway key


def vkey_of_key(key: str) -> str:
    """The gateway key id of a `tf:vk:<id>` key found by SCAN."""
    return key.removeprefix("tf:vk:")


def caller_of_key(key: str) -> str:
    """The caller key id of any `tf:{<id>}…` key found by SCAN."""
    return key[key.index("{") + 1 : key.index("}")]


def total_window_key(caller: str) -> str:
    """The counters of the caller's lifetime window (exists once it was charged)."""
    return caller_prefix(caller) + CALLER["window"] + "t"


def admin_token_key(token_id: str) -> str:
    return f"tf:at:{token_id}"


def lua_layout() -> str:
    """The layout for the Lua prelude: `LAYOUT.window` etc."""
    fields = {**CALLER, **{f"pool_{k}": v for k, v in POOL.items()}}
    body = ", ".join(f"{name} = '{suffix}'" for name, suffix in fields.items())
    return f"local LAYOUT = {{{body}}}\n"
