"""`make run`: the whole stack in the foreground — redis-server (unless REDIS_URL is
set), the processor and Envoy — supervised. Ctrl-C (or SIGTERM) stops all of it.

A part that crashes is restarted after a backoff (TOKENFUSE_RESTART_BACKOFF_MS, doubled
per restart within the minute, at most 8 s), at most TOKENFUSE_RESTARTS_PER_MINUTE times
a minute per part (one crash more stops the whole stack): while the processor or Redis is
down Envoy keeps running and refuses every request with 503 (failure_mode_allow false;
the processor itself answers 503 while Redis is away), nothing reaches a provider, and
traffic recovers once the part is back. Each restart is logged on stderr.

Several stacks on one host: each needs its own TOKENFUSE_STATE_DIR (it holds the sockets,
the local Redis data and a lock) and its own ports. A second `make run` on a state
directory in use, or on a port taken, stops before starting anything, with a message.

Its redis-server requires a password, generated once into $TOKENFUSE_STATE_DIR/
redis.password (mode 0600) and handed to redis-server on stdin, never on a command line;
`load_settings()` reads the same file, so the CLI in the same state directory gets in.
(Longer than 300 lines — hence its length: start-up checks, the parts and their supervisor.)
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from tokenfuse.config import (
    ConfigError,
    Settings,
    SupervisionSettings,
    load_secret,
    load_settings,
    load_supervision,
    worker_sockets,
)
from tokenfuse.providers import PROVIDERS
from tokenfuse.supervisor import _die_with_parent

LOCK_FILE = "stack.lock"


class CannotStart(Exception):
    """Another stack holds what this one needs (its state directory, a port, a socket)."""


class StartFailed(Exception):
    """A part exited, or did not become ready, while starting."""


def _say(message: str) -> None:
    print(f"tokenfuse: {message}", file=sys.stderr, flush=True)


def _wait_for(paths: list[Path], proc: subprocess.Popen[bytes], what: str,
              timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if proc.poll() is not None:
            raise StartFailed(f"{what} exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise StartFailed(f"{what} did not start within {timeout:.0f}s")
        time.sleep(0.05)


def _redis_password(path: Path) -> str:
    """The local Redis password: generated once (32 random bytes, hex, mode 0600)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"{path} is open to other users (mode {mode:o}); "
                              "chmod 600 it") from None
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    password = path.read_text().strip()
    if not password:
        raise ConfigError(f"local Redis password file {path} is empty")
    return password


def _quote(value: str) -> str:
    """A redis.conf string: double-quoted, backslash escapes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redis_config(port: int, state: Path, sock: Path, password: str) -> bytes:
    lines = [f"port {port}", "bind 127.0.0.1", f"dir {_quote(str(state))}",
             f"unixsocket {_quote(str(sock))}", "unixsocketperm 700", "appendonly yes",
             f"requirepass {_quote(password)}"]
    return ("\n".join(lines) + "\n").encode()


# --- start-up checks: nothing of another stack is touched ---------------------------------

def _lock(state: Path) -> IO[str]:
    """An exclusive lock on the state directory, held as long as this process lives
    (the kernel drops it when the process dies, however it dies)."""
    handle = open(state / LOCK_FILE, "a+")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CannotStart(
            f"the state directory {state} is in use by another `make run` (pid {holder}); "
            "give this stack its own TOKENFUSE_STATE_DIR and ports") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _port_taken(address: str, port: int) -> bool:
    """Something listens on address:port (a bind like the real one's fails)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as Envoy and Redis set it: a port in TIME_WAIT is free, and only a
        # listener makes the bind fail (Envoy's reuse_port would otherwise let a second
        # Envoy share a taken listener port silently).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise CannotStart(f"cannot bind {address}:{port}: {exc.strerror}") from None
    return False


def _envoy_ready(admin_port: int) -> bool:
    """Envoy's admin /ready answers 200 (its listeners are open)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready",
                                    timeout=0.5) as reply:
            return reply.status == 200
    except OSError:
        return False


def _socket_served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def check_free(settings: Settings) -> None:
    """Every port and socket this stack will open is distinct and free, else CannotStart
    naming the variable to change."""
    ports = [("TOKENFUSE_LISTEN_PORT", settings.envoy.listen_address,
              settings.envoy.listen_port),
             ("TOKENFUSE_ENVOY_ADMIN_PORT", "127.0.0.1", settings.envoy.admin_port),
             ("TOKENFUSE_METRICS_PORT", settings.processor.metrics_address,
              settings.processor.metrics_port)]
    if settings.admin.port:
        ports.append(("TOKENFUSE_ADMIN_PORT", settings.admin.address, settings.admin.port))
    if not settings.redis.url_given:
        ports.append(("TOKENFUSE_LOCAL_REDIS_PORT", "127.0.0.1", settings.redis.local_port))
    seen: dict[int, str] = {}
    for name, address, port in ports:
        if port in seen:
            raise CannotStart(f"{name} and {seen[port]} are both {port}: give each its own")
        seen[port] = name
        if _port_taken(address, port):
            raise CannotStart(f"port {port} ({name}) on {address} is already in use, by "
                              f"another stack or program: set {name} to a free port")
    for path in worker_sockets(settings.processor.socket, settings.processor.processes):
        if _socket_served(path):
            raise CannotStart(f"the processor socket {path} is served by another process: "
                              "set TOKENFUSE_PROCESSOR_SOCKET (or TOKENFUSE_STATE_DIR) to "
                              "one of this stack's own")


# --- the parts and their supervisor ---------------------------------------------------------

class Part:
    """One supervised child: how to start it and wait until it serves, its crash times."""

    def __init__(self, name: str, spawn: Callable[[], subprocess.Popen[bytes]],
                 ready: Callable[[subprocess.Popen[bytes]], None], meanwhile: str) -> None:
        self.name = name
        self._spawn = spawn
        self._ready = ready
        self.meanwhile = meanwhile  # what users see while it is down
        self.proc: subprocess.Popen[bytes] | None = None
        self.crashes: collections.deque[float] = collections.deque()

    def start(self) -> None:
        self.proc = self._spawn()
        try:
            self._ready(self.proc)
        except StartFailed:
            if self.proc.poll() is None:  # stuck: end it, so the supervisor sees it down
                self.proc.kill()
                self.proc.wait()
            raise

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def recover(part: Part, policy: SupervisionSettings) -> bool:
    """Restart a part that exited, after its backoff; False: it crashed too often."""
    assert part.proc is not None
    how = _how(part.proc.returncode)
    now = time.monotonic()
    while part.crashes and now - part.crashes[0] > 60:
        part.crashes.popleft()
    if len(part.crashes) >= policy.restarts_per_minute:
        times = (f", {len(part.crashes) + 1} times within a minute"
                 if policy.restarts_per_minute else "")
        _say(f"{part.name} exited ({how}){times} (TOKENFUSE_RESTARTS_PER_MINUTE="
             f"{policy.restarts_per_minute}): giving up, stopping the stack")
        return False
    delay_ms = min(policy.backoff_ms * 2 ** len(part.crashes), policy.max_backoff_ms)
    part.crashes.append(now)
    _say(f"{part.name} exited ({how}); restarting it in {delay_ms / 1000:.1f} s (restart "
         f"{len(part.crashes)} of at most {policy.restarts_per_minute} a minute); "
         f"{part.meanwhile}")
    time.sleep(delay_ms / 1000)
    try:
        part.start()
    except StartFailed as exc:
        _say(f"{part.name} restart failed: {exc}")  # seen as exited: the next round
        return True
    assert part.proc is not None
    _say(f"{part.name} restarted (pid {part.proc.pid})")
    return True


def _setup() -> tuple[Settings, SupervisionSettings, str, IO[str]]:
    """Settings, the local Redis password ("" when REDIS_URL is set) and the state lock."""
    settings = load_settings()
    policy = load_supervision()
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    lock = _lock(state)
    check_free(settings)
    load_secret(settings, create=True)  # generated once, kept in .tokenfuse/secret
    password = ""
    if not settings.redis.url_given:
        password = _redis_password(settings.redis.local_password_file)
        settings = load_settings()  # its Redis URL now carries that password
    return settings, policy, password, lock


def _parts(settings: Settings, password: str, env: dict[str, str]) -> list[Part]:
    state = settings.state_dir
    parts: list[Part] = []
    processor_env = dict(env)
    if not settings.redis.url_given:
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            raise StartFailed("redis-server not found (make setup installs it)")
        sock = state / "redis.sock"
        config = _redis_config(settings.redis.local_port, state, sock, password)

        def spawn_redis() -> subprocess.Popen[bytes]:
            sock.unlink(missing_ok=True)
            # The whole config on stdin ("-"): the password stays off every command line.
            proc = subprocess.Popen([redis_bin, "-"], stdin=subprocess.PIPE,
                                    preexec_fn=_die_with_parent, start_new_session=True)
            assert proc.stdin is not None
            try:  # a few hundred bytes: fits the pipe, so this never blocks
                proc.stdin.write(config)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it exited already: the readiness wait reports that
            return proc

        parts.append(Part("redis-server", spawn_redis,
                          lambda proc: _wait_for([sock], proc, "redis-server", 10),
                          "the processor refuses requests with 503 meanwhile (its data "
                          "comes back from the append-only file)"))
        # Only the processor's environment holds it (the URL is never printed).
        processor_env["REDIS_URL"] = settings.redis.url
    sockets = worker_sockets(settings.processor.socket, settings.processor.processes)

    def spawn_processor() -> subprocess.Popen[bytes]:
        for path in sockets:
            path.unlink(missing_ok=True)
        return subprocess.Popen([sys.executable, "-m", "tokenfuse.server"],
                                env=processor_env, preexec_fn=_die_with_parent,
                                start_new_session=True)

    parts.append(Part("processor", spawn_processor,  # every process (TOKENFUSE_PROCESSES)
                      lambda proc: _wait_for(sockets, proc, "processor", 30),
                      "Envoy refuses requests with 503 meanwhile (nothing is forwarded)"))
    envoy_config = state / "envoy.json"
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"

    def spawn_envoy() -> subprocess.Popen[bytes]:
        # No hot restart (a restart here is a new Envoy): Envoy then opens no shared
        # memory or domain socket, which would collide with another Envoy on this host.
        return subprocess.Popen([envoy, "-c", str(envoy_config), "--log-level", "warn",
                                 "--disable-hot-restart"], env=env,
                                preexec_fn=_die_with_parent, start_new_session=True)

    def envoy_up(proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not _envoy_ready(settings.envoy.admin_port):
            if proc.poll() is not None:
                raise StartFailed(f"envoy exited with {proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise StartFailed("envoy was not ready within 30s")
            time.sleep(0.05)

    parts.append(Part("envoy", spawn_envoy, envoy_up,
                      "the gateway port refuses connections meanwhile"))
    return parts


def main() -> int:
    try:
        settings, policy, password, _held = _setup()
    except (ConfigError, OSError) as exc:
        print(f"tokenfuse: configuration error: {exc}", file=sys.stderr)
        return 2
    except CannotStart as exc:
        _say(f"cannot start: {exc}")
        return 2
    env = dict(os.environ)
    env.setdefault("TOKENFUSE_SECRET_FILE", str(settings.secret_file))
    parts: list[Part] = []

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a shell may start us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        parts = _parts(settings, password, env)
        for part in parts:
            if part.name == "envoy":
                subprocess.run([sys.executable, "-m", "tokenfuse.deploy.envoy_config",
                                str(settings.state_dir / "envoy.json")], env=env, check=True)
            part.start()
        listen = f"{settings.envoy.listen_address}:{settings.envoy.listen_port}"
        print(f"tokenfuse: gateway on http://{listen} — Ctrl-C stops everything", flush=True)
        for name, provider in PROVIDERS.items():
            upstream = settings.envoy.upstreams.get(name) or "not configured"
            print(f"  /{name}{provider.sdk_base_path or '/'}  →  {upstream}", flush=True)
        if settings.admin.port:
            print(f"tokenfuse: dashboard and admin API on http://{settings.admin.address}:"
                  f"{settings.admin.port}/ (tokens: tokenfuse admin token create --name NAME "
                  "--role viewer|operator)", flush=True)
        while True:
            for part in parts:
                if part.exited() and not recover(part, policy):
                    return 1
            time.sleep(0.2)
    except StartFailed as exc:
        _say(str(exc))
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # The processor first: it drains (new requests 503 `draining`, in-flight streams
        # finish and settle through Envoy, which keeps running), then Envoy, then Redis.
        # The children are in sessions of their own, so a terminal's Ctrl-C reaches only
        # this supervisor, which stops them in this order.
        for part in sorted(parts, key=lambda part: part.name != "processor"):
            part.stop()
            part.wait(settings.drain.timeout_seconds + 5 if part.name == "processor" else 10)


if __name__ == "__main__":
    sys.exit(main())
