"""Liveness (`GET /healthz`) and readiness (`GET /readyz`) on the metrics port.

Each processor answers its own probes on a Unix socket next to its gRPC one
(`health_socket`), from its event loop: an answer at all is liveness (the loop is not
blocked); readiness adds Redis (a PING within TOKENFUSE_REDIS_TIMEOUT_MS), the decision
scripts (SCRIPT EXISTS, loaded again if Redis lost them), the price table and the drain
(SIGTERM turns it 503 at once). The metrics HTTP server (a thread: the processor's own, or
the supervisor's with TOKENFUSE_PROCESSES > 1) asks every processor's socket and answers
200 only when all of them pass; the JSON body names each check, and which failed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from tokenfuse.extproc.runtime import Runtime
from tokenfuse.state.readiness import OK, store_checks

#: A processor whose event loop does not answer within this is not alive.
LIVENESS_BOUND_S = 1.0
PROBES = ("healthz", "readyz")


def health_socket(grpc_socket: Path) -> Path:
    """Where a processor answers its probes: next to its gRPC socket."""
    return grpc_socket.with_name(grpc_socket.name + ".health")


class ProcessorHealth:
    """One processor's side: answers probes from its event loop."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def readiness(self) -> dict[str, str]:
        rt = self._rt
        checks = await store_checks(rt.store.client, rt.redis_timeout)
        checks["prices"] = OK if len(rt.prices) else "empty"
        checks["drain"] = "draining" if rt.draining else OK
        return checks

    async def serve(self, path: Path) -> asyncio.AbstractServer:
        path.unlink(missing_ok=True)
        return await asyncio.start_unix_server(self._answer, path=str(path))

    async def _answer(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(LIVENESS_BOUND_S):
                what = (await reader.readline()).strip().decode()
            checks = await self.readiness() if what == "readyz" else {"event_loop": OK}
            writer.write(json.dumps(checks).encode())
            await writer.drain()
        except (OSError, TimeoutError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


def ask(path: Path, what: str, timeout_s: float) -> dict[str, str]:
    """One processor's checks (blocking: the HTTP server's thread), or why it did not
    answer within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(str(path))
            conn.sendall(what.encode() + b"\n")
            while chunk := conn.recv(65536):
                data += chunk
                conn.settimeout(max(0.001, deadline - time.monotonic()))
        checks = json.loads(data)
    except (OSError, ValueError) as exc:
        name = "event_loop" if what == "healthz" else "processor"
        return {name: f"no answer in {timeout_s:g} s ({type(exc).__name__})"}
    return {str(k): str(v) for k, v in checks.items()}


class Probes:
    """The HTTP side: every processor's answers, merged (`local`: checks of the process
    serving HTTP itself, e.g. the supervisor's own drain)."""

    def __init__(self, sockets: Callable[[], list[Path]], redis_timeout_s: float,
                 local: Callable[[], dict[str, str]] = dict) -> None:
        self._sockets = sockets
        self._ready_bound = 2 * redis_timeout_s + LIVENESS_BOUND_S
        self._local = local

    def answer(self, what: str) -> tuple[int, dict[str, Any]]:
        bound = LIVENESS_BOUND_S if what == "healthz" else self._ready_bound
        each = [ask(path, what, bound) for path in self._sockets()]
        checks: dict[str, str] = dict(self._local()) if what == "readyz" else {}
        for index, result in enumerate(each):
            for name, value in result.items():
                if value == OK:
                    checks.setdefault(name, OK)
                    continue
                where = f"process {index}: {value}" if len(each) > 1 else value
                previous = checks.get(name, OK)
                checks[name] = where if previous == OK else f"{previous}; {where}"
        failed = sorted(name for name, value in checks.items() if value != OK)
        passed = "alive" if what == "healthz" else "ready"
        doc: dict[str, Any] = {"status": "failing" if failed else passed, "checks": checks}
        if failed:
            doc["failed"] = failed
        if len(each) > 1:
            doc["processes"] = each
        return (503 if failed else 200), doc


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds: no access log."""


def start_http_server(address: str, port: int, registry: CollectorRegistry,
                      probes: Probes) -> None:
    """Prometheus metrics at /metrics (as prometheus_client serves them), the probes at
    /healthz and /readyz; a daemon thread."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        what = environ.get("PATH_INFO", "").strip("/")
        if what not in PROBES:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        status, doc = probes.answer(what)
        body = json.dumps(doc).encode()
        start_response("200 OK" if status == 200 else "503 Service Unavailable",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    class Server(ThreadingWSGIServer):
        pass

    family, _, _, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    Server.address_family = family
    httpd = make_server(sockaddr[0], port, app, Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
