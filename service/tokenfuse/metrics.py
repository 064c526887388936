"""Prometheus metrics of the processor. Labels never carry key material.

With TOKENFUSE_PROCESSES > 1 the workers run in prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor, which serves the sum of all of them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

DECISIONS = Counter(
    "tokenfuse_decisions_total",
    "Pre-call decisions by outcome (allowed/refused/error) and reason.",
    ["outcome", "reason", "provider"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "tokenfuse_decision_seconds",
    "Time to decide on a request body (parse, estimate, Redis round trip).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
SPEND_NANO = Counter(
    "tokenfuse_spend_nano_usd_total",
    "Settled spend in nano-USD by provider and model.",
    ["provider", "model"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "tokenfuse_tokens_total",
    "Settled tokens by provider, model and kind (input/output/cache_read/cache_write).",
    ["provider", "model", "kind"],
    registry=REGISTRY,
)
BACKGROUND_WRITES = Counter(
    "tokenfuse_background_writes_total",
    "Writes made off the request path (kind: refusal analytics, events feed) by outcome "
    "(written, dropped_queue_full, failed).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
CLAMPS = Counter(
    "tokenfuse_output_clamps_total",
    "Requests whose output cap tokenfuse rewrote down to what the budget covers.",
    registry=REGISTRY,
)
SETTLEMENTS = Counter(
    "tokenfuse_settlements_total",
    "Settlements by basis: usage (provider-reported), counted (stream without final "
    "usage: counted tokens + grace), reservation (no usage seen), failed (upstream error).",
    ["basis"],
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "tokenfuse_redis_errors_total",
    "Redis calls that failed or exceeded TOKENFUSE_REDIS_TIMEOUT_MS, by operation.",
    ["operation"],
    registry=REGISTRY,
)
EXTENSIONS = Counter(
    "tokenfuse_stream_extensions_total",
    "Reservations extended mid-stream before more tokens were forwarded.",
    registry=REGISTRY,
)
STREAMS_CUT = Counter(
    "tokenfuse_streams_cut_total",
    "Streams ended by tokenfuse, by reason (budget_exceeded, killed, ...).",
    ["reason"],
    registry=REGISTRY,
)
REAPED = Counter(
    "tokenfuse_reservations_reaped_total",
    "Orphaned reservations (processor died, stream lost) charged as spent by the reaper.",
    registry=REGISTRY,
)
REAPED_NANO = Counter(
    "tokenfuse_reaped_nano_usd_total",
    "Nano-USD charged by the reaper.",
    registry=REGISTRY,
)
REAPER_RUNS = Counter(
    "tokenfuse_reaper_runs_total",
    "Completed passes of the reservation reaper.",
    registry=REGISTRY,
)
LOOPS = Counter(
    "tokenfuse_loops_detected_total",
    "Requests refused by the loop guard, by kind (recursive_loop, "
    "near_duplicate_loop, tool_loop, velocity).",
    ["kind"],
    registry=REGISTRY,
)
WEBHOOKS = Counter(
    "tokenfuse_webhooks_total",
    "Webhook events by outcome: delivered, failed (after retries), dropped_queue_full, "
    "redirect_refused.",
    ["event", "outcome"],
    registry=REGISTRY,
)
POOL_REQUESTS = Counter(
    "tokenfuse_pool_requests_total",
    "Requests sent with a pooled provider key, by pool, key id prefix and HTTP status.",
    ["pool", "key", "status"],
    registry=REGISTRY,
)
POOL_TOKENS = Counter(
    "tokenfuse_pool_tokens_total", "Tokens billed per pooled key.", ["pool", "key"],
    registry=REGISTRY,
)
POOL_SPEND = Counter(
    "tokenfuse_pool_spend_nano_usd_total", "Spend per pooled key (nano-USD).",
    ["pool", "key"], registry=REGISTRY,
)
POOL_PROBES = Counter(
    "tokenfuse_pool_probes_total", "Health probes of pooled keys, by pool and HTTP status.",
    ["pool", "status"], registry=REGISTRY,
)
POOL_FAILOVERS = Counter(
    "tokenfuse_pool_failovers_total",
    "Attempts answered with a key-specific failure and retried on another key (Envoy "
    "retries while TOKENFUSE_POOL_MAX_RETRIES allows), by pool and status.",
    ["pool", "status"], registry=REGISTRY,
)
POOL_KEY_STATE = Gauge(
    "tokenfuse_pool_key_state",
    "Health of a pooled key as last seen by this processor: 1 for its current state "
    "(closed, open, half_open, disabled), 0 for the others.",
    ["pool", "key", "state"], registry=REGISTRY,
    multiprocess_mode="mostrecent",  # TOKENFUSE_PROCESSES > 1: the latest report wins
)
KEY_STATES = ("closed", "open", "half_open", "disabled")


def set_pool_key_state(pool: str, key_prefix: str, state: str) -> None:
    for candidate in KEY_STATES:
        POOL_KEY_STATE.labels(pool, key_prefix, candidate).set(int(candidate == state))
