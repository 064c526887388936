"""TOKENFUSE_PROCESSES > 1: run N processor workers and supervise them.

Each worker (`python -m tokenfuse.server --worker i <supervisor pid>`) is a complete
processor on its own socket; the supervisor serves the summed metrics (prometheus_client
multiprocess mode) and the probes of all of them (tokenfuse.health) once every worker
listens, forwards SIGHUP, drains all on SIGINT/SIGTERM (forwarded as SIGTERM; a second
signal stops them at once: tokenfuse.drain) or stops all when one exits (fail closed), and
its workers die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tokenfuse.config import Settings, load_secret, setup_logging, worker_socket
from tokenfuse.health import OK, Probes, health_socket, start_http_server

log = logging.getLogger("tokenfuse")

PR_SET_PDEATHSIG = 1
#: Beyond TOKENFUSE_DRAIN_TIMEOUT_SECONDS: how long a draining worker may take to stop.
STOP_MARGIN_S = 5.0


def _die_with_parent() -> None:
    """In a worker, before exec: SIGKILL when the supervisor dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere: the worker's parent check at start-up is all there is


def supervise(settings: Settings) -> int:
    """Run TOKENFUSE_PROCESSES worker processes until a signal (0) or until one of them
    exits."""
    count = settings.processor.processes
    setup_logging(settings.log_level)
    load_secret(settings)  # a configuration error is reported once, here
    stopping: list[int] = []
    workers: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for worker in workers:  # each drains; a second signal stops each at once
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    signal.signal(signal.SIGHUP, forward)
    metrics_dir = tempfile.mkdtemp(prefix="tokenfuse-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    sockets = [worker_socket(settings.processor.socket, i) for i in range(count)]

    def probed() -> list[Path]:
        """Every worker's probe socket; while draining, those of the workers still up."""
        return [health_socket(path) for path, worker in zip(sockets, workers, strict=False)
                if not stopping or worker.poll() is None]

    probes = Probes(probed, settings.redis.timeout_s,
                    lambda: {"drain": "draining" if stopping else OK})
    serving = False
    code = 0
    try:
        # preexec_fn is safe here: the supervisor runs no threads.
        for index, path in enumerate(sockets):
            if stopping:
                break
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
                start_http_server(settings.processor.metrics_address,
                                  settings.processor.metrics_port, registry, probes)
                serving = True
                log.info("tokenfuse: %d processor processes ready, metrics (all of them) "
                         "on %s:%d", count, settings.processor.metrics_address,
                         settings.processor.metrics_port)
            time.sleep(0.05 if not serving else 0.2)
    finally:
        if not stopping:  # one exited (or the supervisor failed): the others drain too
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        deadline = time.monotonic() + settings.drain.timeout_seconds + STOP_MARGIN_S
        for worker in workers:
            try:
                worker.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code
