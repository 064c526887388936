"""Real processes for the tests: redis-server, the tokenfuse processor and envoy.

Each is started on free ports in a private temp directory and waited for by probing the
socket it serves (a deadline, not a fixed sleep). Logs go to files the tests can scan.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

from tokenfuse.config import upstream_variable, worker_sockets
from tokenfuse.providers import BUILTIN

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until it returns truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def envoy_ready(admin_port: int) -> bool:
    """Envoy's admin /ready answers 200."""
    try:
        url = f"http://127.0.0.1:{admin_port}/ready"
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return resp.status == 200
    except OSError:
        return False


class ServiceFailed(RuntimeError):
    """A service exited while it was starting (its log is in the message)."""


#: Ports a stack picks for itself (free_port can race with another process's ephemeral
#: port between the pick and the bind: such a start is retried on fresh ports).
STACK_PORTS = ("TOKENFUSE_METRICS_PORT", "TOKENFUSE_LISTEN_PORT", "TOKENFUSE_ENVOY_ADMIN_PORT",
               "TOKENFUSE_ADMIN_PORT")


class Service:
    """A subprocess with a log file."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.workdir, start_new_session=True)
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RedisServer(Service):
    def __init__(self, workdir: Path) -> None:
        super().__init__("redis", workdir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self._spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(self.workdir),
                     "--enable-debug-command", "local"])
        wait_until(self._ready, what="redis-server")

    def _ready(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def dump_text(self) -> str:
        """Every key name and value, as text: for scanning Redis for leaked secrets."""
        client = self.client()
        dump = bytearray()
        for name in client.scan_iter("*"):
            dump += name
            kind = client.type(name)
            if kind == b"hash":
                for field, value in client.hgetall(name).items():
                    dump += field + value
            elif kind == b"string":
                dump += client.get(name) or b""
            else:
                dump += repr(client.dump(name)).encode()
        return bytes(dump).decode("latin-1")


class Processor(Service):
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__("processor", workdir)
        self.env = env
        self.socket = Path(env["TOKENFUSE_PROCESSOR_SOCKET"])
        self.metrics_port = int(env["TOKENFUSE_METRICS_PORT"])
        self.processes = int(env.get("TOKENFUSE_PROCESSES", "").strip() or 1)
        self.sockets = worker_sockets(self.socket, self.processes)

    def start(self) -> None:
        for path in self.sockets:
            path.unlink(missing_ok=True)
        self._spawn([sys.executable, "-m", "tokenfuse.server"], self.env)
        # With TOKENFUSE_PROCESSES > 1, the supervisor opens the metrics port (the sum of
        # every worker's metrics) once all workers listen.
        wait_until(lambda: not self.running() or (
            _tcp_open(self.metrics_port) and all(path.exists() for path in self.sockets)),
                   what="tokenfuse processor")
        if not self.running():
            raise ServiceFailed(f"the processor exited while starting:\n{self.log_text()}")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()


class Envoy(Service):
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__("envoy", workdir)
        self.env = env
        self.port = int(env["TOKENFUSE_LISTEN_PORT"])
        self.admin_port = int(env["TOKENFUSE_ENVOY_ADMIN_PORT"])
        self.config = workdir / "envoy.json"

    def start(self) -> None:
        subprocess.run([sys.executable, "-m", "tokenfuse.deploy.envoy_config", str(self.config)],
                       env=self.env, check=True)
        envoy = shutil.which("envoy", path=str(VENV_BIN)) or "envoy"
        self._spawn([envoy, "-c", str(self.config), "--concurrency", "2", "--log-level",
                     "warn", "--base-id", str(self.admin_port)], self.env)
        wait_until(lambda: not self.running() or self._ready(), what="envoy")
        if not self.running():
            raise ServiceFailed(f"envoy exited while starting:\n{self.log_text()}")

    def _ready(self) -> bool:
        return envoy_ready(self.admin_port)

    @property
    def admin_url(self) -> str:
        """tokenfuse's admin listener (API and dashboard), not Envoy's own admin."""
        return f"http://127.0.0.1:{self.env['TOKENFUSE_ADMIN_PORT']}"

    @property
    def base_url(self) -> str:
        scheme = "https" if self.env.get("TOKENFUSE_TLS_CERT_FILE") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def stat(self, name: str) -> int:
        """An Envoy admin counter (e.g. ``http.tokenfuse.ext_proc.streams_started``)."""
        url = f"http://127.0.0.1:{self.admin_port}/stats?filter=^{re.escape(name)}$"
        with urllib.request.urlopen(url, timeout=5) as resp:
            line = resp.read().decode().strip()
        return int(line.rsplit(":", 1)[1])


class Stack:
    """redis + processor + envoy in front of a fake provider, torn down together."""

    def __init__(self, upstream_url: str, extra_env: dict[str, str] | None = None,
                 redis_url: str | None = None) -> None:
        """`redis_url`: a Redis of the caller's (shared by several stacks), neither started
        nor stopped here; `self.redis` is then None."""
        self.workdir = Path(tempfile.mkdtemp(prefix="tf-"))
        self.redis: RedisServer | None = None if redis_url else RedisServer(self.workdir)
        self.secret = "test-secret-" + os.urandom(8).hex()
        env = dict(os.environ)
        env.update({
            "REDIS_URL": redis_url or self.redis.url,
            "TOKENFUSE_SECRET": self.secret,
            "TOKENFUSE_STATE_DIR": str(self.workdir),
            "TOKENFUSE_PROCESSOR_SOCKET": str(self.workdir / "p.sock"),
            "TOKENFUSE_METRICS_PORT": str(free_port()),
            "TOKENFUSE_LISTEN_PORT": str(free_port()),
            "TOKENFUSE_ENVOY_ADMIN_PORT": str(free_port()),
            "TOKENFUSE_ADMIN_PORT": str(free_port()),  # tokenfuse's admin API + dashboard
            "TOKENFUSE_UPSTREAM_OPENAI": upstream_url,
            "TOKENFUSE_UPSTREAM_ANTHROPIC": upstream_url,
            # Every other vendor at the fake under its own prefix (the fake speaks each
            # vendor's dialect at /<vendor>/...).
            **{upstream_variable(name): f"{upstream_url.rstrip('/')}/{name}"
               for name in BUILTIN if name not in ("openai", "anthropic")},
            "TOKENFUSE_LOG_LEVEL": "DEBUG",
            "TOKENFUSE_MAX_REQUEST_BYTES": str(4 * 1024 * 1024),
            # 250 ms by default; a 2-core runner with two test workers flooding at once
            # queues decisions past that (fail-closed 503s): the floods assert <= 10 %.
            "TOKENFUSE_REDIS_TIMEOUT_MS": "1000",
        })
        env.update(extra_env or {})
        self.env = env
        self._own_ports = [name for name in STACK_PORTS if name not in (extra_env or {})]
        self.processor = Processor(self.workdir, env)
        self.envoy = Envoy(self.workdir, env)
        self._pools_to_import: list[tuple[str, str]] = []

    def add_pool(self, pool: str, provider: str, csv_text: str) -> Path:
        """A pool file (mode 0600) in the stack's pools directory, imported with
        `tokenfuse keys import` when the stack starts; call before `start`."""
        directory = self.workdir / "pools"
        directory.mkdir(exist_ok=True)
        self.env["TOKENFUSE_POOLS_DIR"] = str(directory)
        path = directory / f"{pool}.csv"
        path.write_text(csv_text)
        path.chmod(0o600)
        self._pools_to_import.append((pool, provider))
        return path

    def _import_pools(self) -> None:
        while self._pools_to_import:
            pool, provider = self._pools_to_import.pop(0)
            done = self.cli("keys", "import", "--pool", pool, "--provider", provider,
                            str(self.workdir / "pools" / f"{pool}.csv"))
            assert done.returncode == 0, done.stderr

    def start(self) -> Stack:
        if self.redis is not None:
            self.redis.start()
        for attempt in range(3):
            try:
                self.processor.start()
                self.envoy.start()
                self._import_pools()
                return self
            except ServiceFailed as failed:
                self.envoy.stop()
                self.processor.stop()
                if "address already in use" not in str(failed).lower() or attempt == 2:
                    raise
                for name in self._own_ports:  # lost a port race: fresh ports, once more
                    self.env[name] = str(free_port())
                self.processor = Processor(self.workdir, self.env)
                self.envoy = Envoy(self.workdir, self.env)
        return self

    def stop(self) -> None:
        for service in (self.envoy, self.processor, self.redis):
            if service is not None:
                service.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the operator CLI against this stack's Redis and secret."""
        return subprocess.run([sys.executable, "-m", "tokenfuse.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def admin_token(self, name: str, role: str) -> str:
        """A new admin token (`tokenfuse admin token create`), as the CLI printed it."""
        done = self.cli("admin", "token", "create", "--name", name, "--role", role)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1].strip()

    def logs(self) -> str:
        return "\n".join(s.log_text() for s in (self.redis, self.processor, self.envoy)
                         if s is not None)
