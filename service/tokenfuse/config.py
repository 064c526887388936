"""Every tunable of tokenfuse, read from the environment (listed in the README).

This is the only module that reads the environment. `load_settings()` reads it once and
checks every value: a bad one is a `ConfigError` naming the variable, reported at start.
The settings are grouped by the part of tokenfuse that uses them.

(Longer than most modules on purpose: every variable, its default and its check in one
place, in the order of the README's table.)
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tokenfuse.money import usd_to_nano
from tokenfuse.providers import PROVIDERS, declare

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
EVENT_LOOPS = ("uvloop", "asyncio")


class ConfigError(ValueError):
    """A setting has a value tokenfuse cannot use."""


class _Env:
    """Typed reads of one environment mapping; every failure names its variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def raw(self, name: str) -> str:
        return self._environ.get(name, "")

    def given(self, name: str, default: str) -> str:
        """The value when the variable is set (even to ""), else the default."""
        value = self._environ.get(name)
        return default if value is None else value.strip()

    def text(self, name: str, default: str) -> str:
        return self._environ.get(name, "").strip() or default

    def int(self, name: str, default: int, minimum: int | None = None) -> int:
        text = self.text(name, str(default))
        try:
            value = int(text)
        except ValueError as exc:
            raise ConfigError(f"{name} must be an integer, got {text!r}") from exc
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        text = self.text(name, "1" if default else "0").lower()
        return text not in ("0", "false", "off", "no")

    def usd(self, name: str, default: str | None) -> int | None:
        text = self._environ.get(name, "").strip() or default
        if text is None:
            return None
        try:
            return usd_to_nano(text)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from exc

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value


@dataclass(frozen=True)
class RedisSettings:
    # repr=False: the URL may carry a password (REDIS_URL's, or make run's local one).
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    url_given: bool = False  # REDIS_URL was set (else `make run` starts its own Redis)
    timeout_ms: int = 250
    local_port: int = 6379  # the redis-server `make run` starts
    local_password_file: Path = Path(".tokenfuse/redis.password")  # ... and its password
    # Redis Cluster (TOKENFUSE_REDIS_MODE=cluster: REDIS_URL names one seed node) and the
    # start-up check of maxmemory-policy (TOKENFUSE_ALLOW_EVICTION=1: warn, do not refuse).
    mode: str = "single"
    allow_eviction: bool = False

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"


@dataclass(frozen=True)
class ProcessorSettings:
    socket: Path = Path(".tokenfuse/processor.sock")
    processes: int = 1
    event_loop: str = "uvloop"
    timeout_ms: int = 3000  # Envoy's bound per processor answer
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 9464
    #: TOKENFUSE_PROCESSOR_ADDRESS: also serve ext_proc on this TCP host:port (a processor
    #: in its own container or Service); "" = the Unix socket only. Unauthenticated gRPC:
    #: whoever reaches it can reserve against budgets (see processor_address()).
    address: str = ""


@dataclass(frozen=True)
class BudgetSettings:
    default_limits: dict[str, int | None] = field(default_factory=dict)
    threshold_percent: int = 80

    def default_limit_args(self) -> list[int]:
        """Default limits in window order for the Lua scripts (-1 = no limit)."""
        return [-1 if self.default_limits.get(w) is None else int(self.default_limits[w] or 0)
                for w in WINDOWS]


@dataclass(frozen=True)
class EstimateSettings:
    default_output_tokens: int = 4096
    input_margin_percent: int = 10
    prices_file: Path | None = None
    unknown_model_policy: str = "refuse"  # refuse | price
    unknown_input_nano_per_mtok: int = 0
    unknown_output_nano_per_mtok: int = 0


@dataclass(frozen=True)
class StreamSettings:
    initial_tokens: int = 256
    step_tokens: int = 256
    grace_tokens: int = 32
    reservation_ttl_seconds: int = 3600
    reaper_interval_ms: int = 30000


@dataclass(frozen=True)
class LoopGuardSettings:
    max_hits: int = 5  # exact tier; 0 = off
    window_seconds: int = 60
    cooldown_seconds: int = 30
    near_duplicate: bool = True  # the near-duplicate tier (counted only on repeated answers)
    near_max_hits: int = 5
    near_window_seconds: int = 120
    near_cooldown_seconds: int = 60
    max_tool_repeats: int = 5  # 0 = off
    velocity_max_per_minute: int = 0  # 0 = off


@dataclass(frozen=True)
class WebhookSettings:
    urls: tuple[str, ...] = ()
    secret: bytes = b""
    queue_size: int = 1000
    allow_private: bool = False
    timeout_ms: int = 5000
    max_attempts: int = 5


@dataclass(frozen=True)
class PoolSettings:
    directory: Path = Path(".tokenfuse/pools")
    cooldown_ms: int = 5000
    max_cooldown_ms: int = 300000
    probe_interval_ms: int = 10000
    max_retries: int = 2  # Envoy retries on other keys


@dataclass(frozen=True)
class EnvoySettings:
    listen_address: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 9901
    max_request_bytes: int = 32 * 1024 * 1024
    max_connections: int = 50000
    ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"
    #: The listener speaks HTTPS with this certificate chain and key (PEM files; both or
    #: neither; "" = plain HTTP). Some SDKs send keys only over HTTPS (boto3's Bedrock
    #: API keys).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    bench_routes: bool = False  # benchmarks only: /direct/<provider>/ without the processor
    upstreams: dict[str, str] = field(default_factory=dict)  # provider -> base URL


@dataclass(frozen=True)
class DrainSettings:
    """SIGTERM: how long in-flight requests and streams may take to finish before the
    processor ends them and exits (tokenfuse.drain)."""

    timeout_seconds: int = 30


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    redis: RedisSettings = field(default_factory=RedisSettings)
    processor: ProcessorSettings = field(default_factory=ProcessorSettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    estimate: EstimateSettings = field(default_factory=EstimateSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    loop: LoopGuardSettings = field(default_factory=LoopGuardSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    pools: PoolSettings = field(default_factory=PoolSettings)
    envoy: EnvoySettings = field(default_factory=EnvoySettings)
    drain: DrainSettings = field(default_factory=DrainSettings)
    tracing: TracingSettings = field(default_factory=lambda: TracingSettings())
    admin: AdminSettings = field(default_factory=lambda: AdminSettings())
    secret_value: str = field(default="", repr=False)  # TOKENFUSE_SECRET
    secret_file: Path = Path(".tokenfuse/secret")
    log_level: str = "INFO"
    analytics: AnalyticsSettings = field(default_factory=lambda: AnalyticsSettings())


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = _Env(os.environ if environ is None else environ)
    state_dir = Path(env.text("TOKENFUSE_STATE_DIR", STATE_DIR_DEFAULT)).resolve()
    urls = tuple(u.strip() for u in env.raw("TOKENFUSE_WEBHOOK_URLS").split(",") if u.strip())
    webhook_secret = env.raw("TOKENFUSE_WEBHOOK_SECRET")
    if urls and not webhook_secret:
        raise ConfigError("TOKENFUSE_WEBHOOK_URLS is set but TOKENFUSE_WEBHOOK_SECRET is not "
                          "(webhooks are always signed)")
    prices_file = env.raw("TOKENFUSE_PRICES_FILE").strip()
    tls_cert, tls_key = (env.text("TOKENFUSE_TLS_CERT_FILE", ""),
                         env.text("TOKENFUSE_TLS_KEY_FILE", ""))
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("TOKENFUSE_TLS_CERT_FILE and TOKENFUSE_TLS_KEY_FILE are a pair: "
                          "set both (HTTPS listener) or neither (plain HTTP)")
    for name, path in (("TOKENFUSE_TLS_CERT_FILE", tls_cert), ("TOKENFUSE_TLS_KEY_FILE", tls_key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{name}={path}: no such file")
    compatible = _name_map(env, "TOKENFUSE_OPENAI_COMPATIBLE", "vllm=http://10.0.0.5:8000")
    for name, url in compatible.items():
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"TOKENFUSE_OPENAI_COMPATIBLE: the URL of '{name}' must be "
                              f"http(s)://host[:port][/path], got {url!r}")
    try:
        declare(compatible, _name_map(env, "TOKENFUSE_AZURE_DEPLOYMENTS", "prod-4o=gpt-4o",
                                      lower=False))
    except ValueError as exc:
        raise ConfigError(f"TOKENFUSE_OPENAI_COMPATIBLE: {exc}") from None
    return Settings(
        state_dir=state_dir,
        redis=RedisSettings(
            # Unset REDIS_URL: the redis-server `make run` starts, exactly as it starts it.
            url=env.text("REDIS_URL", "") or local_redis_url(
                env.int("TOKENFUSE_LOCAL_REDIS_PORT", 6379, minimum=1),
                state_dir / "redis.password"),
            url_given=bool(env.raw("REDIS_URL").strip()),
            timeout_ms=env.int("TOKENFUSE_REDIS_TIMEOUT_MS", 250, minimum=1),
            local_port=env.int("TOKENFUSE_LOCAL_REDIS_PORT", 6379, minimum=1),
            local_password_file=state_dir / "redis.password",
            mode=_redis_mode(env),
            allow_eviction=env.flag("TOKENFUSE_ALLOW_EVICTION", False),
        ),
        processor=ProcessorSettings(
            socket=Path(env.text("TOKENFUSE_PROCESSOR_SOCKET",
                                 str(state_dir / "processor.sock"))).resolve(),
            processes=env.int("TOKENFUSE_PROCESSES", 1, minimum=1),
            event_loop=env.choice("TOKENFUSE_EVENT_LOOP", "uvloop", EVENT_LOOPS),
            timeout_ms=env.int("TOKENFUSE_PROCESSOR_TIMEOUT_MS", 3000, minimum=1),
            metrics_address=env.text("TOKENFUSE_METRICS_ADDRESS", "127.0.0.1"),
            metrics_port=env.int("TOKENFUSE_METRICS_PORT", 9464),
            address=processor_address(env.text("TOKENFUSE_PROCESSOR_ADDRESS", "")),
        ),
        budgets=BudgetSettings(
            default_limits={w: env.usd(DEFAULT_BUDGET_ENV[w], None) for w in WINDOWS},
            threshold_percent=env.int("TOKENFUSE_BUDGET_THRESHOLD_PERCENT", 80),
        ),
        estimate=EstimateSettings(
            default_output_tokens=env.int("TOKENFUSE_DEFAULT_OUTPUT_TOKENS", 4096),
            input_margin_percent=env.int("TOKENFUSE_INPUT_MARGIN_PERCENT", 10),
            prices_file=Path(prices_file) if prices_file else None,
            unknown_model_policy=env.choice("TOKENFUSE_UNKNOWN_MODEL", "refuse",
                                            ("refuse", "price")),
            unknown_input_nano_per_mtok=env.usd(
                "TOKENFUSE_UNKNOWN_MODEL_INPUT_USD_PER_MTOK", "15") or 0,
            unknown_output_nano_per_mtok=env.usd(
                "TOKENFUSE_UNKNOWN_MODEL_OUTPUT_USD_PER_MTOK", "75") or 0,
        ),
        streams=StreamSettings(
            initial_tokens=env.int("TOKENFUSE_STREAM_INITIAL_TOKENS", 256),
            step_tokens=env.int("TOKENFUSE_STREAM_STEP_TOKENS", 256),
            grace_tokens=env.int("TOKENFUSE_STREAM_GRACE_TOKENS", 32),
            reservation_ttl_seconds=env.int("TOKENFUSE_RESERVATION_TTL_SECONDS", 3600),
            reaper_interval_ms=env.int("TOKENFUSE_REAPER_INTERVAL_MS", 30000),
        ),
        loop=LoopGuardSettings(
            max_hits=env.int("LOOP_GUARD_MAX_HITS", 5),
            window_seconds=env.int("LOOP_GUARD_WINDOW_SECONDS", 60),
            cooldown_seconds=env.int("LOOP_GUARD_COOLDOWN_SECONDS", 30),
            near_duplicate=_near_duplicate_switch(env),
            near_max_hits=env.int("LOOP_GUARD_NEAR_DUPLICATE_MAX_HITS", 5, minimum=1),
            near_window_seconds=env.int("LOOP_GUARD_NEAR_DUPLICATE_WINDOW_SECONDS", 120,
                                        minimum=1),
            near_cooldown_seconds=env.int("LOOP_GUARD_NEAR_DUPLICATE_COOLDOWN_SECONDS", 60,
                                          minimum=1),
            max_tool_repeats=env.int("LOOP_GUARD_MAX_TOOL_REPEATS", 5),
            velocity_max_per_minute=env.int("TOKENFUSE_VELOCITY_MAX_PER_MINUTE", 0),
        ),
        webhooks=WebhookSettings(
            urls=urls,
            secret=webhook_secret.encode(),
            queue_size=env.int("TOKENFUSE_WEBHOOK_QUEUE_SIZE", 1000),
            allow_private=env.text("TOKENFUSE_WEBHOOK_ALLOW_PRIVATE", "0") in ("1", "true"),
            timeout_ms=env.int("TOKENFUSE_WEBHOOK_TIMEOUT_MS", 5000),
            max_attempts=env.int("TOKENFUSE_WEBHOOK_MAX_ATTEMPTS", 5),
        ),
        pools=PoolSettings(
            directory=Path(env.text("TOKENFUSE_POOLS_DIR", str(state_dir / "pools"))).resolve(),
            cooldown_ms=env.int("TOKENFUSE_POOL_COOLDOWN_MS", 5000),
            max_cooldown_ms=env.int("TOKENFUSE_POOL_MAX_COOLDOWN_MS", 300000),
            probe_interval_ms=env.int("TOKENFUSE_POOL_PROBE_INTERVAL_MS", 10000),
            max_retries=env.int("TOKENFUSE_POOL_MAX_RETRIES", 2, minimum=0),
        ),
        envoy=EnvoySettings(
            listen_address=env.text("TOKENFUSE_LISTEN_ADDRESS", "127.0.0.1"),
            listen_port=env.int("TOKENFUSE_LISTEN_PORT", 10000),
            admin_port=env.int("TOKENFUSE_ENVOY_ADMIN_PORT", 9901),
            max_request_bytes=env.int("TOKENFUSE_MAX_REQUEST_BYTES", 32 * 1024 * 1024,
                                      minimum=1),
            max_connections=env.int("TOKENFUSE_MAX_CONNECTIONS", 50000, minimum=1),
            ca_bundle=env.text("TOKENFUSE_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"),
            tls_cert_file=str(Path(tls_cert).resolve()) if tls_cert else "",
            tls_key_file=str(Path(tls_key).resolve()) if tls_key else "",
            bench_routes=env.text("TOKENFUSE_BENCH_ROUTES", "0") == "1",
            # A variable set to "" turns its provider off (404 provider_not_configured).
            upstreams={name: compatible.get(name) or env.given(
                upstream_variable(name), provider.default_upstream)
                for name, provider in PROVIDERS.items()},
        ),
        drain=DrainSettings(
            timeout_seconds=env.int("TOKENFUSE_DRAIN_TIMEOUT_SECONDS", 30, minimum=0)),
        tracing=_tracing(env),
        admin=AdminSettings(
            address=env.text("TOKENFUSE_ADMIN_ADDRESS", "127.0.0.1"),
            port=env.int("TOKENFUSE_ADMIN_PORT", 10001, minimum=0),
            max_upload_bytes=env.int("TOKENFUSE_ADMIN_MAX_UPLOAD_BYTES", 1024 * 1024,
                                     minimum=1024),
            audit_max_entries=env.int("TOKENFUSE_AUDIT_MAX_ENTRIES", 100000, minimum=100),
        ),
        secret_value=env.raw("TOKENFUSE_SECRET"),
        secret_file=Path(env.text("TOKENFUSE_SECRET_FILE", str(state_dir / "secret"))),
        log_level=env.text("TOKENFUSE_LOG_LEVEL", "INFO").upper(),
        analytics=_analytics(env),
    )


# ------------------------------------------------------------ usage analytics, events feed

@dataclass(frozen=True)
class AnalyticsSettings:
    """Usage analytics written by the settlement script (tokenfuse.state.analytics) and
    the events feed (tokenfuse.state.event_log). Retention: how long a bucket lives after
    its period ended."""

    enabled: bool = True  # TOKENFUSE_ANALYTICS; 0 = no analytics writes (events stay)
    minute_retention_s: int = 48 * 3600  # TOKENFUSE_ANALYTICS_MINUTE_RETENTION_HOURS
    hour_retention_s: int = 35 * 86400  # TOKENFUSE_ANALYTICS_HOUR_RETENTION_DAYS
    day_retention_s: int = 400 * 86400  # TOKENFUSE_ANALYTICS_DAY_RETENTION_DAYS
    events_max: int = 10000  # TOKENFUSE_EVENTS_MAX: the events stream's (approximate) cap
    queue_size: int = 1000  # TOKENFUSE_ANALYTICS_QUEUE_SIZE: background writes waiting


def _analytics(env: _Env) -> AnalyticsSettings:
    return AnalyticsSettings(
        enabled=env.flag("TOKENFUSE_ANALYTICS", True),
        minute_retention_s=env.int("TOKENFUSE_ANALYTICS_MINUTE_RETENTION_HOURS", 48,
                                   minimum=1) * 3600,
        hour_retention_s=env.int("TOKENFUSE_ANALYTICS_HOUR_RETENTION_DAYS", 35,
                                 minimum=1) * 86400,
        day_retention_s=env.int("TOKENFUSE_ANALYTICS_DAY_RETENTION_DAYS", 400,
                                minimum=1) * 86400,
        events_max=env.int("TOKENFUSE_EVENTS_MAX", 10000, minimum=1),
        queue_size=env.int("TOKENFUSE_ANALYTICS_QUEUE_SIZE", 1000, minimum=1),
    )


# ------------------------------------------------------------ the admin API

@dataclass(frozen=True)
class AdminSettings:
    """The admin listener Envoy opens for the admin API and the dashboard (never the proxy
    listener); `port` 0 leaves it out of Envoy's configuration."""

    address: str = "127.0.0.1"
    port: int = 10001
    max_upload_bytes: int = 1024 * 1024  # a request body on the admin listener (CSV import)
    audit_max_entries: int = 100000  # the audit trail keeps about this many (XADD MAXLEN ~)


# ------------------------------------------------------------ OpenTelemetry traces

@dataclass(frozen=True)
class TracingSettings:
    """Traces (tokenfuse/tracing.py) are on when an OTLP endpoint is set. Only whether,
    and where to, are decided here; the SDK reads the other standard variables itself
    (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP[_TRACES]_HEADERS /
    _TIMEOUT / _COMPRESSION / _CERTIFICATE, OTEL_BSP_*, OTEL_TRACES_SAMPLER[_ARG])."""

    endpoint: str = ""  # the OTLP/HTTP traces URL; "" = tracing off (no SDK loaded)

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


#: The only OTLP protocol tokenfuse ships an exporter for.
OTLP_PROTOCOL = "http/protobuf"


def _tracing(env: _Env) -> TracingSettings:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as is), else OTEL_EXPORTER_OTLP_ENDPOINT +
    `/v1/traces` (the OTLP exporter specification's rule); OTEL_SDK_DISABLED=true or an
    OTEL_TRACES_EXPORTER without `otlp` (e.g. `none`) turn it off."""
    traces = env.text("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    base = env.text("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    exporters = env.text("OTEL_TRACES_EXPORTER", "otlp").lower()
    if (not traces and not base) or env.text("OTEL_SDK_DISABLED", "").lower() == "true" \
            or "otlp" not in (e.strip() for e in exporters.split(",")):
        return TracingSettings()
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.text(name, OTLP_PROTOCOL)
        if protocol != OTLP_PROTOCOL:
            raise ConfigError(f"{name}={protocol}: tokenfuse exports traces over OTLP "
                              f"{OTLP_PROTOCOL} only (point it at the collector's HTTP "
                              "port, 4318 by default)")
    endpoint = traces or base.rstrip("/") + "/v1/traces"
    name = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if traces else "OTEL_EXPORTER_OTLP_ENDPOINT"
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http(s):// URL, got {endpoint!r}")
    return TracingSettings(endpoint=endpoint)


def _name_map(env: _Env, name: str, example: str, lower: bool = True) -> dict[str, str]:
    """`a=x,b=y` → {"a": "x", "b": "y"} (names lowercased unless `lower` is False); a bad
    item is a ConfigError."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in env.raw(name).split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower() if lower else key.strip(), value.strip()
        if not sep or not key or not value or key in out:
            raise ConfigError(f"{name}: '{item}' is not name=value (e.g. {name}=\"{example}\"), "
                              "or names something twice")
        out[key] = value
    return out


def _redis_mode(env: _Env) -> str:
    """TOKENFUSE_REDIS_MODE: single (default) or cluster, which needs REDIS_URL naming a
    seed node over TCP (`make run`'s own Redis is a single node)."""
    mode = env.choice("TOKENFUSE_REDIS_MODE", "single", ("single", "cluster"))
    url = env.raw("REDIS_URL").strip()
    if mode == "cluster" and not urlsplit(url).hostname:
        raise ConfigError("TOKENFUSE_REDIS_MODE=cluster needs REDIS_URL naming one node of "
                          "the cluster over TCP (redis://host:port or rediss://host:port)")
    return mode


def upstream_variable(provider: str) -> str:
    """The variable naming a provider's upstream: TOKENFUSE_UPSTREAM_<NAME>."""
    return f"TOKENFUSE_UPSTREAM_{provider.upper().replace('-', '_')}"


def _near_duplicate_switch(env: _Env) -> bool:
    """LOOP_GUARD_NEAR_DUPLICATE; the removed LOOP_GUARD_NORMALIZE is refused by name (it
    merged near-duplicates into the exact count: its meaning changed, so no silent map)."""
    if env.raw("LOOP_GUARD_NORMALIZE").strip():
        raise ConfigError(
            "LOOP_GUARD_NORMALIZE was removed: the exact loop guard never normalises; "
            "near-duplicates (numbers, UUIDs, timestamps, ids) are their own tier, counted "
            "only when the answer repeats too: set LOOP_GUARD_NEAR_DUPLICATE=1 (default) or "
            "0, and unset LOOP_GUARD_NORMALIZE")
    return env.flag("LOOP_GUARD_NEAR_DUPLICATE", True)


def local_redis_url(port: int, password_file: Path) -> str:
    """The URL of the redis-server `make run` starts when REDIS_URL is unset: 127.0.0.1 on
    TOKENFUSE_LOCAL_REDIS_PORT, with the password `make run` keeps in `password_file`
    (no password if that file does not exist, e.g. before the first `make run`)."""
    from urllib.parse import quote

    try:
        password = password_file.read_text().strip()
    except FileNotFoundError:
        return f"redis://127.0.0.1:{port}/0"
    except OSError as exc:
        raise ConfigError(f"cannot read the local Redis password {password_file}: "
                          f"{exc.strerror}") from exc
    if not password:
        raise ConfigError(f"local Redis password file {password_file} is empty")
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"


def processor_address(value: str) -> str:
    """TOKENFUSE_PROCESSOR_ADDRESS checked: "" or host:port ([v6]:port), host an IP
    literal or a name. ext_proc has no authentication: bind it to 127.0.0.1 or the pod's
    network and let only the gateway reach it (NetworkPolicy, an unpublished compose port)."""
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("TOKENFUSE_PROCESSOR_ADDRESS must be host:port (e.g. "
                          f"127.0.0.1:50051 or 0.0.0.0:50051), got {value!r}")
    return value


def worker_socket(base: Path, index: int) -> Path:
    """The Unix socket of processor process `index`: the configured one for 0, then
    `processor-1.sock`, `processor-2.sock`, ... next to it."""
    if index == 0:
        return base
    return base.with_name(f"{base.stem}-{index}{base.suffix}")


def worker_sockets(base: Path, count: int) -> list[Path]:
    return [worker_socket(base, i) for i in range(count)]


def load_secret(settings: Settings, create: bool = False) -> bytes:
    """The HMAC secret for key ids: TOKENFUSE_SECRET, else TOKENFUSE_SECRET_FILE.

    With create=True (used by `make run`) a missing file gets a fresh random secret,
    written once with mode 0600 so every later start hashes keys the same way.
    """
    if settings.secret_value:
        return settings.secret_value.encode()
    path = settings.secret_file
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
    # Libraries that log secrets at DEBUG (botocore's signer writes the canonical request,
    # session token included, and the signature) stay at WARNING whatever the level.
    quiet = max(logging.WARNING, logging.getLogger().level)
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(quiet)


#: Loggers kept at WARNING or above (they would log credentials at DEBUG).
QUIET_LIBRARIES = ("botocore", "boto3", "urllib3", "google", "httpx", "httpcore")


# --- `make run`'s supervision (deploy/stack.py), apart from `Settings` -------------------

@dataclass(frozen=True)
class SupervisionSettings:
    """How `make run` restarts a part that crashed (Redis, the processor, Envoy)."""

    restarts_per_minute: int = 5  # per part; one crash more within a minute stops the stack
    backoff_ms: int = 500  # before the first restart; doubled per restart within the minute
    max_backoff_ms: int = 8000


def load_supervision(environ: Mapping[str, str] | None = None) -> SupervisionSettings:
    """TOKENFUSE_RESTARTS_PER_MINUTE (0: never restart, a crash stops the stack) and
    TOKENFUSE_RESTART_BACKOFF_MS."""
    env = _Env(os.environ if environ is None else environ)
    backoff = env.int("TOKENFUSE_RESTART_BACKOFF_MS", 500, minimum=1)
    return SupervisionSettings(
        restarts_per_minute=env.int("TOKENFUSE_RESTARTS_PER_MINUTE", 5, minimum=0),
        backoff_ms=backoff, max_backoff_ms=max(backoff, 8000))
