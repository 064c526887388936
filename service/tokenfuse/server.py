"""Process entry point: `python -m tokenfuse.server` serves ext_proc on a Unix socket.

With TOKENFUSE_PROCESSES=N > 1 it is a supervisor instead (supervisor.py) of N workers
(`--worker i`), each this same processor on its own socket (`worker_socket`); Envoy
balances its ext_proc streams over all N sockets. Everything a decision needs is in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tokenfuse.admin.serving import add_admin_service, admin_thread_pool
from tokenfuse.config import (
    ConfigError,
    ProcessorSettings,
    Settings,
    load_secret,
    load_settings,
    setup_logging,
    worker_socket,
)
from tokenfuse.drain import drain
from tokenfuse.events.webhooks import WebhookConfigError, WebhookSink
from tokenfuse.extproc.runtime import Runtime
from tokenfuse.extproc.service import ExtProcService
from tokenfuse.health import Probes, ProcessorHealth, health_socket, start_http_server
from tokenfuse.identity import secret_fingerprint
from tokenfuse.metering.tokens import count_text
from tokenfuse.metrics import REAPED, REAPED_NANO, REAPER_RUNS, REDIS_ERRORS, REGISTRY
from tokenfuse.pools.probes import probe_forever
from tokenfuse.pools.secrets import PoolSecrets
from tokenfuse.pricing import PriceTable
from tokenfuse.state import eviction, secret_check
from tokenfuse.state.analytics import AnalyticsPolicy, RefusalRecorder
from tokenfuse.state.budgets import BudgetStore, GuardPolicy
from tokenfuse.state.connection import REDIS_FAILURES
from tokenfuse.state.control import ControlWatcher
from tokenfuse.state.event_log import EventLog
from tokenfuse.state.pools import PoolStore
from tokenfuse.supervisor import supervise
from tokenfuse.tracing import start_tracing

log = logging.getLogger("tokenfuse")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
]


async def serve(settings: Settings, index: int | None = None) -> None:
    """One processor: ext_proc on its socket, metrics, and the background tasks.
    `index` is set in a worker of a supervisor (which serves the metrics)."""
    setup_logging(settings.log_level)
    secret = load_secret(settings)
    prices = PriceTable.load(settings.estimate.prices_file)
    tracing = start_tracing(settings.tracing, index)  # each worker exports its own spans
    # The encoding of the current models; another one (cl100k: older OpenAI models, the
    # bound of Claude's) loads on its first use.
    count_text("warm up the tokenizer before the first request")
    loop_guard = settings.loop
    store = BudgetStore.from_url(
        settings.redis.url, settings.redis.timeout_ms, settings.budgets.default_limit_args(),
        GuardPolicy(
            loop_max_hits=loop_guard.max_hits,
            loop_window_ms=loop_guard.window_seconds * 1000,
            loop_cooldown_ms=loop_guard.cooldown_seconds * 1000,
            near_max_hits=loop_guard.near_max_hits if loop_guard.near_duplicate else 0,
            near_window_ms=loop_guard.near_window_seconds * 1000,
            near_cooldown_ms=loop_guard.near_cooldown_seconds * 1000,
            velocity_max_per_minute=loop_guard.velocity_max_per_minute,
            threshold_percent=settings.budgets.threshold_percent,
        ),
        cluster=settings.redis.cluster,
        analytics=AnalyticsPolicy(settings.analytics.enabled,
                                  settings.analytics.minute_retention_s,
                                  settings.analytics.hour_retention_s,
                                  settings.analytics.day_retention_s),
    )
    refused: list[ConfigError] = []  # the eviction check's verdict if it comes late
    redis_checks = await start_redis_checks(store, settings.redis.allow_eviction,
                                            secret_fingerprint(secret), refused)
    processor = settings.processor
    control = ControlWatcher(settings.redis.url, settings.redis.cluster)
    watcher = asyncio.create_task(control.run())
    hooks = settings.webhooks
    try:
        webhooks = WebhookSink(
            list(hooks.urls), hooks.secret, queue_size=hooks.queue_size,
            allow_private=hooks.allow_private, timeout_s=hooks.timeout_ms / 1000,
            max_attempts=hooks.max_attempts,
        )
    except WebhookConfigError as exc:
        raise ConfigError(str(exc)) from exc
    deliveries = asyncio.create_task(webhooks.run())
    pool_secrets = PoolSecrets(secret, settings.pools.directory)
    pool_secrets.load()
    pools = PoolStore(store.client, store.decisions, settings.pools.cooldown_ms,
                      settings.pools.max_cooldown_ms)
    background = (settings.analytics.queue_size, settings.redis.timeout_s * 4)
    events = EventLog(store.decisions, settings.analytics.events_max, *background)
    probes = asyncio.create_task(probe_forever(pools, pool_secrets, settings.envoy.upstreams,
                                               settings.pools.probe_interval_ms / 1000, events))
    admin_threads = admin_thread_pool() if settings.admin.port else None
    server = grpc.aio.server(options=tcp_options(processor) if processor.address
                             else GRPC_OPTIONS, migration_thread_pool=admin_threads)
    runtime = Runtime(settings, secret, store, prices, control, webhooks, pools, pool_secrets,
                      tracing=tracing,
                      analytics=RefusalRecorder(store.decisions, store.analytics, *background)
                      if store.analytics.enabled else None,
                      events=events)
    service = ExtProcService(runtime)
    pb_grpc.add_ExternalProcessorServicer_to_server(service, server)
    if admin_threads is not None:  # the admin API (Envoy's admin listener reaches it here)
        add_admin_service(server, settings, secret,
                          lambda: (len(runtime.open_streams), runtime.draining),
                          pool_secrets.load)
    socket_path = worker_socket(processor.socket, index or 0)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server.add_insecure_port(f"unix:{socket_path}")
    if processor.address:  # TOKENFUSE_PROCESSOR_ADDRESS: see tcp_options
        try:
            server.add_insecure_port(processor.address)
        except RuntimeError:
            raise ConfigError(f"TOKENFUSE_PROCESSOR_ADDRESS={processor.address}: cannot "
                              "listen there (in use, or not an address of this host)") from None
        log.info("tokenfuse processor also listening on tcp:%s (unauthenticated: only the "
                 "gateway may reach it)", processor.address)
    await server.start()
    # Probes (/healthz, /readyz): answered here, served over HTTP with the metrics.
    probe_path = health_socket(socket_path)
    health = await ProcessorHealth(runtime).serve(probe_path)
    if index is None:
        start_http_server(processor.metrics_address, processor.metrics_port, REGISTRY,
                          Probes(lambda: [probe_path], settings.redis.timeout_s))
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    if index is None:
        log.info("tokenfuse processor listening on unix:%s, metrics on %s:%d, %d model "
                 "prices, %s event loop", socket_path, processor.metrics_address,
                 processor.metrics_port, len(prices), loop_name)
    else:
        log.info("tokenfuse processor %d listening on unix:%s, %d model prices, %s event "
                 "loop", index, socket_path, len(prices), loop_name)

    # The reaper is idempotent (any number may run); one per processor group is enough.
    reaper = asyncio.create_task(
        reap_forever(store, settings.streams.reservation_ttl_seconds * 1000,
                     settings.streams.reaper_interval_ms / 1000)
    ) if not index else None
    # SIGTERM or SIGINT drains (tokenfuse.drain); a second one ends the drain at once. A
    # supervisor's worker leaves SIGINT (a terminal's Ctrl-C reaches the whole group) to
    # its supervisor, which forwards SIGTERM.
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        (hurry if stop.is_set() else stop).set()
        runtime.draining = True

    loop.add_signal_handler(signal.SIGTERM, on_stop_signal)
    loop.add_signal_handler(signal.SIGINT, on_stop_signal if index is None else _ignore)
    loop.add_signal_handler(signal.SIGHUP, pool_secrets.load)  # reload pool files
    if redis_checks is not None:
        redis_checks.add_done_callback(lambda _: refused and stop.set())
    await stop.wait()
    await drain(runtime, service, server, settings.drain.timeout_seconds, hurry)
    log.info("shutting down")
    health.close()
    probe_path.unlink(missing_ok=True)
    if reaper is not None:
        reaper.cancel()
    watcher.cancel()
    deliveries.cancel()
    probes.cancel()
    for writer in (runtime.analytics, runtime.events):  # background writes still queued
        if writer is not None:
            await writer.close()
    await store.close()
    if admin_threads is not None:
        admin_threads.shutdown(wait=False, cancel_futures=True)
    if tracing is not None:
        await asyncio.to_thread(tracing.shutdown)
    if refused:
        raise refused[0]


def tcp_options(processor: ProcessorSettings) -> list[tuple[str, int]]:
    """The gRPC options with a TCP listener (TOKENFUSE_PROCESSOR_ADDRESS), in addition to
    the Unix socket: with TOKENFUSE_PROCESSES > 1 every worker binds the same port
    (SO_REUSEPORT: the kernel spreads Envoy's connections); a single processor does not
    share its port (a second one on it fails to start)."""
    return [(name, value) for name, value in GRPC_OPTIONS if name != "grpc.so_reuseport"] + [
        ("grpc.so_reuseport", 1 if processor.processes > 1 else 0)]


def _ignore() -> None:
    """A signal this process leaves to another."""


async def start_redis_checks(store: BudgetStore, allow: bool, fingerprint: str,
                             refused: list[ConfigError]) -> asyncio.Task[None] | None:
    """Refuse to start when Redis may evict our keys (state/eviction.py) or holds budgets
    keyed with another secret (state/secret_check.py). If Redis does not answer yet, the
    processor starts (failing closed meanwhile) and checks when it answers: a failed check
    then stops it with the same error (put in `refused`)."""
    async def attempt() -> bool:
        try:
            warning = await eviction.check(store.client, allow)
            await secret_check.claim(store.client, fingerprint)
        except (eviction.EvictionRefused, secret_check.SecretMismatch) as exc:
            raise ConfigError(str(exc)) from None
        except REDIS_FAILURES:
            return False
        if warning:
            log.warning("%s", warning)
        return True

    if await attempt():
        return None
    log.warning("Redis does not answer: its maxmemory-policy is checked when it does")

    async def later() -> None:
        try:
            while not await attempt():
                await asyncio.sleep(1)
        except ConfigError as exc:
            log.error("%s", exc)
            refused.append(exc)
    return asyncio.create_task(later())


async def reap_forever(store: BudgetStore, ttl_ms: int, interval_s: float) -> None:
    """Charge orphaned reservations as spent, every interval, for as long as we run."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            count, nano = await store.reap(ttl_ms)
        except REDIS_FAILURES as exc:
            REDIS_ERRORS.labels("reap").inc()
            log.warning("reaper: redis unavailable: %s", type(exc).__name__)
            continue
        REAPER_RUNS.inc()
        if count:
            REAPED.inc(count)
            REAPED_NANO.inc(nano)
            log.info("reaper charged %d orphaned reservation(s): %d nano-USD", count, nano)


def run(main_coroutine: Coroutine[Any, Any, None], event_loop: str) -> None:
    """Run on the configured event loop (TOKENFUSE_EVENT_LOOP)."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main_coroutine)
    else:
        asyncio.run(main_coroutine)


def main() -> None:
    try:
        settings = load_settings()
        if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
            if os.getppid() != int(sys.argv[3]):
                sys.exit(1)  # the supervisor died before this worker started
            run(serve(settings, int(sys.argv[2])), settings.processor.event_loop)
            return
        if settings.processor.processes > 1:
            sys.exit(supervise(settings))
        run(serve(settings), settings.processor.event_loop)
    except ConfigError as exc:
        print(f"tokenfuse: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
