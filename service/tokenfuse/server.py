"""Process entry point: `python -m tokenfuse.server` serves ext_proc on a Unix socket.

With TOKENFUSE_PROCESSES=N > 1 this process is a supervisor: it starts N worker processes
(`python -m tokenfuse.server --worker i`), each a complete processor on its own socket
(`worker_socket`); Envoy balances its ext_proc streams over all N sockets. Everything a
decision needs is in Redis, so the workers share nothing else. Metrics use
prometheus_client's multiprocess mode: the workers write their samples to files in a
private directory and the supervisor serves the sum on TOKENFUSE_METRICS_PORT, once every
worker listens (so an open metrics port still means "ready"). SIGINT/SIGTERM stop them all,
SIGHUP is passed on; a worker that exits takes the others down with it (as the single
process would: fail closed, whatever runs tokenfuse restarts it), and a supervisor that
dies abruptly takes its workers with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import redis.exceptions
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from tokenfuse.config import ConfigError, load_secret, load_settings, worker_socket
from tokenfuse.control import ControlWatcher
from tokenfuse.envoy_config import PROVIDER_DEFAULTS, upstream_url
from tokenfuse.metrics import REAPED, REAPED_NANO, REAPER_RUNS, REDIS_ERRORS, REGISTRY
from tokenfuse.pools import PoolSecrets, PoolStore, probe_forever
from tokenfuse.pricing import PriceTable
from tokenfuse.processor import Processor
from tokenfuse.store import BudgetStore, GuardPolicy
from tokenfuse.tokens import count_text
from tokenfuse.webhooks import WebhookConfigError, WebhookSink

log = logging.getLogger("tokenfuse")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


async def serve(index: int | None = None) -> None:
    """One processor: ext_proc on its socket, metrics, and the background tasks.
    `index` is set in a worker of a supervisor (which serves the metrics)."""
    settings = load_settings()
    _setup_logging(settings.log_level)
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
    pools = PoolStore(store.client, settings.pool_cooldown_ms, settings.pool_max_cooldown_ms)
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
    if index is None:
        log.info("tokenfuse processor listening on unix:%s, metrics on %s:%d, %d model prices",
                 socket_path, settings.metrics_address, settings.metrics_port, len(prices))
    else:
        log.info("tokenfuse processor %d listening on unix:%s, %d model prices", index,
                 socket_path, len(prices))

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


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a worker, before exec: SIGKILL when the supervisor dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere: the worker's parent check at start-up is all there is


def supervise(count: int) -> int:
    """Run `count` worker processes until a signal (0) or until one of them exits."""
    settings = load_settings()
    _setup_logging(settings.log_level)
    load_secret(settings.state_dir)  # a configuration error is reported once, here
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    workers: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGHUP, forward)
    metrics_dir = tempfile.mkdtemp(prefix="tokenfuse-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    sockets = [worker_socket(settings.processor_socket, i) for i in range(count)]
    serving = False
    code = 0
    try:
        # preexec_fn is safe here: the supervisor runs no threads.
        for index, path in enumerate(sockets):
            path.unlink(missing_ok=True)
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "tokenfuse.server", "--worker", str(index),
                 str(os.getpid())], env=env, preexec_fn=_die_with_parent))
        while not stopping:
            ended = next((w for w in workers if w.poll() is not None), None)
            if ended is not None:
                log.error("processor process %d exited (%s); stopping the others",
                          ended.pid, ended.returncode)
                code = ended.returncode or 1
                break
            if not serving and all(path.exists() for path in sockets):
                registry = CollectorRegistry()
                MultiProcessCollector(registry, path=metrics_dir)
                start_http_server(settings.metrics_port, settings.metrics_address,
                                  registry=registry)
                serving = True
                log.info("tokenfuse: %d processor processes ready, metrics (all of them) "
                         "on %s:%d", count, settings.metrics_address, settings.metrics_port)
            time.sleep(0.05 if not serving else 0.2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        deadline = time.monotonic() + 10
        for worker in workers:
            try:
                worker.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def main() -> None:
    try:
        if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
            if os.getppid() != int(sys.argv[3]):
                sys.exit(1)  # the supervisor died before this worker started
            asyncio.run(serve(int(sys.argv[2])))
            return
        settings = load_settings()
        if settings.processes > 1:
            sys.exit(supervise(settings.processes))
        asyncio.run(serve())
    except ConfigError as exc:
        print(f"tokenfuse: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
