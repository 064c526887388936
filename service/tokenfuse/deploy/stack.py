"""`make run`: the whole stack in the foreground — redis-server (unless REDIS_URL is
set), the processor and Envoy. Ctrl-C (or SIGTERM) stops all of it; if one part dies,
the others are stopped too, so nothing is left half-running (and fail-closed anyway).

Its redis-server requires a password, generated once into $TOKENFUSE_STATE_DIR/
redis.password (mode 0600) and handed to redis-server on stdin, never on a command line;
`load_settings()` reads the same file, so the CLI in the same state directory gets in.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from tokenfuse.config import ConfigError, load_secret, load_settings, worker_sockets
from tokenfuse.providers import PROVIDERS


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"tokenfuse: {what} exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise SystemExit(f"tokenfuse: {what} did not start within {timeout:.0f}s")
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


def main() -> int:
    password = ""
    try:
        settings = load_settings()
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        load_secret(settings, create=True)  # generated once, kept in .tokenfuse/secret
        if not settings.redis.url_given:
            password = _redis_password(settings.redis.local_password_file)
            settings = load_settings()  # its Redis URL now carries that password
    except (ConfigError, OSError) as exc:
        print(f"tokenfuse: configuration error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("TOKENFUSE_SECRET_FILE", str(settings.secret_file))
    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def stop_all(*_: object) -> None:
        for _name, proc in reversed(children):
            if proc.poll() is None:
                proc.terminate()
        for _name, proc in reversed(children):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: a shell may start us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        processor_env = dict(env)
        if not settings.redis.url_given:
            redis_bin = shutil.which("redis-server")
            if redis_bin is None:
                raise SystemExit("tokenfuse: redis-server not found (make setup installs it)")
            sock = state / "redis.sock"
            sock.unlink(missing_ok=True)
            # The whole config on stdin ("-"): the password stays off every command line.
            proc = subprocess.Popen([redis_bin, "-"], stdin=subprocess.PIPE)
            children.append(("redis-server", proc))
            assert proc.stdin is not None
            try:  # a few hundred bytes: fits the pipe, so this never blocks
                proc.stdin.write(_redis_config(settings.redis.local_port, state, sock,
                                               password))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it exited already: _wait_for reports that
            _wait_for(sock, proc, "redis-server", 10)
            # Only the processor's environment holds it (the URL is never printed).
            processor_env["REDIS_URL"] = settings.redis.url
        sockets = worker_sockets(settings.processor.socket, settings.processor.processes)
        for path in sockets:
            path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "tokenfuse.server"], env=processor_env)
        children.append(("processor", proc))
        for path in sockets:  # every processor process (TOKENFUSE_PROCESSES)
            _wait_for(path, proc, "processor", 30)
        config = state / "envoy.json"
        subprocess.run([sys.executable, "-m", "tokenfuse.deploy.envoy_config", str(config)],
                       env=env, check=True)
        envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"
        # No hot restart (a restart here is a new stack): Envoy then opens no shared
        # memory or domain socket, which would collide with another Envoy on this host.
        proc = subprocess.Popen([envoy, "-c", str(config), "--log-level", "warn",
                                 "--disable-hot-restart"], env=env)
        children.append(("envoy", proc))
        listen = f"{settings.envoy.listen_address}:{settings.envoy.listen_port}"
        print(f"tokenfuse: gateway on http://{listen} — Ctrl-C stops everything", flush=True)
        for name, provider in PROVIDERS.items():
            upstream = settings.envoy.upstreams.get(name) or "not configured"
            print(f"  /{name}{provider.sdk_base_path or '/'}  →  {upstream}", flush=True)
        while True:
            for name, child in children:
                if child.poll() is not None:
                    print(f"tokenfuse: {name} exited ({child.returncode}); stopping",
                          file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
