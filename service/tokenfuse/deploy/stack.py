"""`make run`: the whole stack in the foreground — redis-server (unless REDIS_URL is
set), the processor and Envoy. Ctrl-C (or SIGTERM) stops all of it; if one part dies,
the others are stopped too, so nothing is left half-running (and fail-closed anyway).
"""

from __future__ import annotations

import os
import shutil
import signal
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


def main() -> int:
    try:
        settings = load_settings()
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        load_secret(settings, create=True)  # generated once, kept in .tokenfuse/secret
    except ConfigError as exc:
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
        if not settings.redis.url_given:
            port = str(settings.redis.local_port)
            redis_bin = shutil.which("redis-server")
            if redis_bin is None:
                raise SystemExit("tokenfuse: redis-server not found (make setup installs it)")
            sock = state / "redis.sock"
            sock.unlink(missing_ok=True)
            proc = subprocess.Popen([redis_bin, "--port", port, "--bind", "127.0.0.1",
                                     "--dir", str(state), "--unixsocket", str(sock),
                                     "--appendonly", "yes"])
            children.append(("redis-server", proc))
            _wait_for(sock, proc, "redis-server", 10)
            env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        sockets = worker_sockets(settings.processor.socket, settings.processor.processes)
        for path in sockets:
            path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "tokenfuse.server"], env=env)
        children.append(("processor", proc))
        for path in sockets:  # every processor process (TOKENFUSE_PROCESSES)
            _wait_for(path, proc, "processor", 30)
        config = state / "envoy.json"
        subprocess.run([sys.executable, "-m", "tokenfuse.deploy.envoy_config", str(config)],
                       env=env, check=True)
        envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"
        proc = subprocess.Popen([envoy, "-c", str(config), "--log-level", "warn"], env=env)
        children.append(("envoy", proc))
        listen = f"{settings.envoy.listen_address}:{settings.envoy.listen_port}"
        bases = ", ".join(f"{name}: /{name}{provider.sdk_base_path}"
                          for name, provider in PROVIDERS.items())
        print(f"tokenfuse: gateway on http://{listen}  ({bases}) — Ctrl-C stops everything",
              flush=True)
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
