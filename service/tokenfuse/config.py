"""Every tunable of tokenfuse, read from the environment (listed in the README)."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tokenfuse.money import usd_to_nano

WINDOWS = ("minute", "hour", "day", "week", "month", "total")
# Environment names of the default per-window budgets (for keys without their own).
DEFAULT_BUDGET_ENV = {
    "minute": "TOKENFUSE_DEFAULT_MINUTE_USD",
    "hour": "TOKENFUSE_DEFAULT_HOURLY_USD",
    "day": "TOKENFUSE_DEFAULT_DAILY_USD",
    "week": "TOKENFUSE_DEFAULT_WEEKLY_USD",
    "month": "TOKENFUSE_DEFAULT_MONTHLY_USD",
    "total": "TOKENFUSE_DEFAULT_TOTAL_USD",
}
STATE_DIR_DEFAULT = ".tokenfuse"


class ConfigError(ValueError):
    """A setting has a value tokenfuse cannot use."""


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def _env_int(name: str, default: int) -> int:
    text = _env(name, str(default))
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from exc


def _env_usd(name: str, default: str | None) -> int | None:
    text = os.environ.get(name, "").strip() or default
    if text is None:
        return None
    try:
        return usd_to_nano(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    redis_url: str
    redis_timeout_ms: int
    processor_socket: Path
    metrics_address: str
    metrics_port: int
    default_limits: dict[str, int | None] = field(default_factory=dict)
    default_output_tokens: int = 4096
    stream_initial_tokens: int = 256
    stream_step_tokens: int = 256
    stream_grace_tokens: int = 32
    reservation_ttl_seconds: int = 3600
    reaper_interval_ms: int = 30000
    loop_max_hits: int = 5
    loop_window_seconds: int = 60
    loop_cooldown_seconds: int = 30
    loop_normalize: bool = True
    loop_max_tool_repeats: int = 5
    velocity_max_per_minute: int = 0
    threshold_percent: int = 80
    webhook_urls: tuple[str, ...] = ()
    webhook_secret: bytes = b""
    webhook_queue_size: int = 1000
    webhook_allow_private: bool = False
    webhook_timeout_ms: int = 5000
    webhook_max_attempts: int = 5
    pools_dir: Path = Path(".tokenfuse/pools")
    pool_cooldown_ms: int = 5000
    pool_max_cooldown_ms: int = 300000
    pool_probe_interval_ms: int = 10000
    input_margin_percent: int = 10
    prices_file: Path | None = None
    unknown_model_policy: str = "refuse"
    unknown_input_nano_per_mtok: int = 0
    unknown_output_nano_per_mtok: int = 0
    log_level: str = "INFO"
    processes: int = 1

    def default_limit_args(self) -> list[int]:
        """Default limits in window order for the Lua scripts (-1 = no limit)."""
        return [
            -1 if self.default_limits.get(w) is None else int(self.default_limits[w] or 0)
            for w in WINDOWS
        ]


def load_settings() -> Settings:
    state_dir = Path(_env("TOKENFUSE_STATE_DIR", STATE_DIR_DEFAULT)).resolve()
    policy = _env("TOKENFUSE_UNKNOWN_MODEL", "refuse")
    if policy not in ("refuse", "price"):
        raise ConfigError(f"TOKENFUSE_UNKNOWN_MODEL must be 'refuse' or 'price', got {policy!r}")
    prices_file = os.environ.get("TOKENFUSE_PRICES_FILE", "").strip()
    urls = tuple(u.strip() for u in os.environ.get("TOKENFUSE_WEBHOOK_URLS", "").split(",")
                 if u.strip())
    webhook_secret = os.environ.get("TOKENFUSE_WEBHOOK_SECRET", "")
    if urls and not webhook_secret:
        raise ConfigError("TOKENFUSE_WEBHOOK_URLS is set but TOKENFUSE_WEBHOOK_SECRET is not "
                          "(webhooks are always signed)")
    processes = processor_processes()
    return Settings(
        state_dir=state_dir,
        redis_url=_env("REDIS_URL", "redis://127.0.0.1:6379/0"),
        redis_timeout_ms=_env_int("TOKENFUSE_REDIS_TIMEOUT_MS", 250),
        processor_socket=Path(
            _env("TOKENFUSE_PROCESSOR_SOCKET", str(state_dir / "processor.sock"))
        ).resolve(),
        metrics_address=_env("TOKENFUSE_METRICS_ADDRESS", "127.0.0.1"),
        metrics_port=_env_int("TOKENFUSE_METRICS_PORT", 9464),
        default_limits={w: _env_usd(DEFAULT_BUDGET_ENV[w], None) for w in WINDOWS},
        default_output_tokens=_env_int("TOKENFUSE_DEFAULT_OUTPUT_TOKENS", 4096),
        stream_initial_tokens=_env_int("TOKENFUSE_STREAM_INITIAL_TOKENS", 256),
        stream_step_tokens=_env_int("TOKENFUSE_STREAM_STEP_TOKENS", 256),
        stream_grace_tokens=_env_int("TOKENFUSE_STREAM_GRACE_TOKENS", 32),
        reservation_ttl_seconds=_env_int("TOKENFUSE_RESERVATION_TTL_SECONDS", 3600),
        reaper_interval_ms=_env_int("TOKENFUSE_REAPER_INTERVAL_MS", 30000),
        loop_max_hits=_env_int("LOOP_GUARD_MAX_HITS", 5),
        loop_window_seconds=_env_int("LOOP_GUARD_WINDOW_SECONDS", 60),
        loop_cooldown_seconds=_env_int("LOOP_GUARD_COOLDOWN_SECONDS", 30),
        loop_normalize=_env("LOOP_GUARD_NORMALIZE", "1") not in ("0", "false", "off"),
        loop_max_tool_repeats=_env_int("LOOP_GUARD_MAX_TOOL_REPEATS", 5),
        velocity_max_per_minute=_env_int("TOKENFUSE_VELOCITY_MAX_PER_MINUTE", 0),
        threshold_percent=_env_int("TOKENFUSE_BUDGET_THRESHOLD_PERCENT", 80),
        webhook_urls=urls,
        webhook_secret=webhook_secret.encode(),
        webhook_queue_size=_env_int("TOKENFUSE_WEBHOOK_QUEUE_SIZE", 1000),
        webhook_allow_private=_env("TOKENFUSE_WEBHOOK_ALLOW_PRIVATE", "0") in ("1", "true"),
        webhook_timeout_ms=_env_int("TOKENFUSE_WEBHOOK_TIMEOUT_MS", 5000),
        webhook_max_attempts=_env_int("TOKENFUSE_WEBHOOK_MAX_ATTEMPTS", 5),
        pools_dir=Path(_env("TOKENFUSE_POOLS_DIR", str(state_dir / "pools"))).resolve(),
        pool_cooldown_ms=_env_int("TOKENFUSE_POOL_COOLDOWN_MS", 5000),
        pool_max_cooldown_ms=_env_int("TOKENFUSE_POOL_MAX_COOLDOWN_MS", 300000),
        pool_probe_interval_ms=_env_int("TOKENFUSE_POOL_PROBE_INTERVAL_MS", 10000),
        input_margin_percent=_env_int("TOKENFUSE_INPUT_MARGIN_PERCENT", 10),
        prices_file=Path(prices_file) if prices_file else None,
        unknown_model_policy=policy,
        unknown_input_nano_per_mtok=_env_usd("TOKENFUSE_UNKNOWN_MODEL_INPUT_USD_PER_MTOK", "15")
        or 0,
        unknown_output_nano_per_mtok=_env_usd("TOKENFUSE_UNKNOWN_MODEL_OUTPUT_USD_PER_MTOK", "75")
        or 0,
        log_level=_env("TOKENFUSE_LOG_LEVEL", "INFO").upper(),
        processes=processes,
    )


def processor_processes() -> int:
    """TOKENFUSE_PROCESSES: how many processor processes serve Envoy (at least 1)."""
    count = _env_int("TOKENFUSE_PROCESSES", 1)
    if count < 1:
        raise ConfigError(f"TOKENFUSE_PROCESSES must be at least 1, got {count}")
    return count


EVENT_LOOPS = ("uvloop", "asyncio")


def event_loop_name() -> str:
    """TOKENFUSE_EVENT_LOOP: uvloop (default; ~15 % more requests per second measured) or
    asyncio (the standard library loop)."""
    name = os.environ.get("TOKENFUSE_EVENT_LOOP", "").strip() or "uvloop"
    if name not in EVENT_LOOPS:
        raise ConfigError(f"TOKENFUSE_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, "
                          f"got {name!r}")
    return name


def worker_socket(base: Path, index: int) -> Path:
    """The Unix socket of processor process `index`: the configured one for 0, then
    `processor-1.sock`, `processor-2.sock`, ... next to it."""
    if index == 0:
        return base
    return base.with_name(f"{base.stem}-{index}{base.suffix}")


def worker_sockets(base: Path, count: int) -> list[Path]:
    return [worker_socket(base, i) for i in range(count)]


def load_secret(state_dir: Path, create: bool = False) -> bytes:
    """The HMAC secret for key ids: TOKENFUSE_SECRET, else TOKENFUSE_SECRET_FILE.

    With create=True (used by `make run`) a missing file gets a fresh random secret,
    written once with mode 0600 so every later start hashes keys the same way.
    """
    value = os.environ.get("TOKENFUSE_SECRET", "")
    if value:
        return value.encode()
    path = Path(_env("TOKENFUSE_SECRET_FILE", str(state_dir / "secret")))
    if not path.exists():
        if not create:
            raise ConfigError(
                f"no secret: set TOKENFUSE_SECRET or TOKENFUSE_SECRET_FILE (looked at {path})"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    secret = path.read_text().strip()
    if not secret:
        raise ConfigError(f"secret file {path} is empty")
    return secret.encode()


def setup_logging(level: str) -> None:
    """Log lines on stderr with the process id (several processors may share a log)."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
