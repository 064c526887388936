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
import redis.exceptions
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import start_http_server

from tokenfuse.config import (
    ConfigError,
    event_loop_name,
    load_secret,
    load_settings,
    setup_logging,
    worker_socket,
)
from tokenfuse.control import ControlWatcher
from tokenfuse.envoy_config import PROVIDER_DEFAULTS, upstream_url
from tokenfuse.metrics import REAPED, REAPED_NANO, REAPER_RUNS, REDIS_ERRORS, REGISTRY
from tokenfuse.pools import PoolSecrets, PoolStore, probe_forever
from tokenfuse.pricing import PriceTable
from tokenfuse.processor import Processor
from tokenfuse.store import BudgetStore, GuardPolicy
from tokenfuse.supervisor import supervise
from tokenfuse.tokens import count_text
from tokenfuse.webhooks import WebhookConfigError, WebhookSink

log = logging.getLogger("tokenfuse")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
]


async def serve(index: int | None = None) -> None:
    """One processor: ext_proc on its socket, metrics, and the background tasks.
    `index` is set in a worker of a supervisor (which serves the metrics)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    secret = load_secret(settings.state_dir)
    prices = PriceTable.load(settings.prices_file)
    count_text("warm up the tokenizer before the first request")
    store = BudgetStore.from_url(
        settings.redis_url, settings.redis_timeout_ms, settings.default_limit_args(),
        GuardPolicy(
            loop_max_hits=settings.loop_max_hits,
            loop_window_ms=settings.loop_window_seconds * 1000,
            loop_cooldown_ms=settings.loop_cooldown_seconds * 1000,
            velocity_max_per_minute=settings.velocity_max_per_minute,
            threshold_percent=settings.threshold_percent,
        ),
    )
    if index is None:
        start_http_server(settings.metrics_port, settings.metrics_address, registry=REGISTRY)

    control = ControlWatcher(settings.redis_url)
    watcher = asyncio.create_task(control.run())
    try:
        webhooks = WebhookSink(
            list(settings.webhook_urls), settings.webhook_secret,
            queue_size=settings.webhook_queue_size,
            allow_private=settings.webhook_allow_private,
            timeout_s=settings.webhook_timeout_ms / 1000,
            max_attempts=settings.webhook_max_attempts,
        )
    except WebhookConfigError as exc:
        raise ConfigError(str(exc)) from exc
    deliveries = asyncio.create_task(webhooks.run())
    pool_secrets = PoolSecrets(secret, settings.pools_dir)
    pool_secrets.load()
    pools = PoolStore(store.client, store.decisions, settings.pool_cooldown_ms,
                      settings.pool_max_cooldown_ms)
    upstreams = {name: upstream_url(name) for name in PROVIDER_DEFAULTS}
    probes = asyncio.create_task(probe_forever(pools, pool_secrets, upstreams,
                                               settings.pool_probe_interval_ms / 1000))
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_ExternalProcessorServicer_to_server(
        Processor(settings, secret, store, prices, control, webhooks, pools, pool_secrets),
        server
    )
    socket_path = worker_socket(settings.processor_socket, index or 0)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    if index is None:
        log.info("tokenfuse processor listening on unix:%s, metrics on %s:%d, %d model "
                 "prices, %s event loop", socket_path, settings.metrics_address,
                 settings.metrics_port, len(prices), loop_name)
    else:
        log.info("tokenfuse processor %d listening on unix:%s, %d model prices, %s event "
                 "loop", index, socket_path, len(prices), loop_name)

    # The reaper is idempotent (any number may run); one per processor group is enough.
    reaper = asyncio.create_task(
        reap_forever(store, settings.reservation_ttl_seconds * 1000,
                     settings.reaper_interval_ms / 1000)
    ) if not index else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, pool_secrets.load)  # reload pool files
    await stop.wait()
    log.info("shutting down")
    if reaper is not None:
        reaper.cancel()
    watcher.cancel()
    deliveries.cancel()
    probes.cancel()
    await server.stop(grace=2)
    await store.close()


async def reap_forever(store: BudgetStore, ttl_ms: int, interval_s: float) -> None:
    """Charge orphaned reservations as spent, every interval, for as long as we run."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            count, nano = await store.reap(ttl_ms)
        except (redis.exceptions.RedisError, OSError) as exc:
            REDIS_ERRORS.labels("reap").inc()
            log.warning("reaper: redis unavailable: %s", type(exc).__name__)
            continue
        REAPER_RUNS.inc()
        if count:
            REAPED.inc(count)
            REAPED_NANO.inc(nano)
            log.info("reaper charged %d orphaned reservation(s): %d nano-USD", count, nano)


def run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on the configured event loop (TOKENFUSE_EVENT_LOOP)."""
    if event_loop_name() == "uvloop":
        import uvloop

        uvloop.run(main_coroutine)
    else:
        asyncio.run(main_coroutine)


def main() -> None:
    try:
        if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
            if os.getppid() != int(sys.argv[3]):
                sys.exit(1)  # the supervisor died before this worker started
            run(serve(int(sys.argv[2])))
            return
        settings = load_settings()
        if settings.processes > 1:
            sys.exit(supervise(settings.processes))
        run(serve())
    except ConfigError as exc:
        print(f"tokenfuse: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
