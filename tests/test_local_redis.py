"""`make run`'s own Redis: password-protected, and the CLI finds it with no REDIS_URL.

The stack test starts `python -m tokenfuse.deploy.stack` for real (redis-server, the
processor and Envoy, on free ports in a private state directory) and stops it with
SIGINT, as Ctrl-C would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.harness import envoy_ready, free_port, wait_until
from tokenfuse.config import ConfigError, load_settings


def _env(state: Path, port: int, **extra: str) -> dict[str, str]:
    """Only what the test means to set: no REDIS_URL, no TOKENFUSE_SECRET."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "TOKENFUSE_STATE_DIR": str(state), "TOKENFUSE_LOCAL_REDIS_PORT": str(port)}
    env.update(extra)
    return env


# --- config: resolving the local Redis like `make run` ---------------------------------

def test_no_password_file_means_no_password(tmp_path: Path) -> None:
    settings = load_settings(_env(tmp_path, 7001))
    assert settings.redis.url == "redis://127.0.0.1:7001/0"
    assert not settings.redis.url_given
    assert settings.redis.local_password_file == tmp_path.resolve() / "redis.password"


def test_password_file_goes_into_the_url_but_not_the_repr(tmp_path: Path) -> None:
    password = "0123abcd" * 8
    (tmp_path / "redis.password").write_text(password + "\n")
    settings = load_settings(_env(tmp_path, 7002))
    assert settings.redis.url == f"redis://:{password}@127.0.0.1:7002/0"
    assert password not in repr(settings)
    assert password not in repr(settings.redis)


def test_odd_password_is_quoted_in_the_url(tmp_path: Path) -> None:
    (tmp_path / "redis.password").write_text("p@ss:w/rd")
    url = load_settings(_env(tmp_path, 7003)).redis.url
    assert url == "redis://:p%40ss%3Aw%2Frd@127.0.0.1:7003/0"
    assert redis.connection.parse_url(url)["password"] == "p@ss:w/rd"


def test_redis_url_wins_over_the_password_file(tmp_path: Path) -> None:
    (tmp_path / "redis.password").write_text("local-one")
    url = "redis://:Zq7xWv9given@db.example:6380/2"
    settings = load_settings(_env(tmp_path, 7004, REDIS_URL=url))
    assert settings.redis.url == url and settings.redis.url_given
    assert "Zq7xWv9given" not in repr(settings)


def test_empty_password_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "redis.password").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_settings(_env(tmp_path, 7005))


# --- the real stack ----------------------------------------------------------------------

class RunningStack:
    def __init__(self) -> None:
        # Short path: the unix sockets live here (sun_path is ~108 bytes).
        self.state = Path(tempfile.mkdtemp(prefix="tf-lr-"))
        self.redis_port = free_port()
        self.admin_port = free_port()
        self.env = _env(
            self.state, self.redis_port,
            TOKENFUSE_LISTEN_PORT=str(free_port()),
            TOKENFUSE_ENVOY_ADMIN_PORT=str(self.admin_port),
            TOKENFUSE_ADMIN_PORT=str(free_port()),
            TOKENFUSE_METRICS_PORT=str(free_port()),
            TOKENFUSE_LOG_LEVEL="DEBUG",
        )
        self.out = self.state / "stack.out"
        self.err = self.state / "stack.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tokenfuse.deploy.stack"], env=self.env,
                cwd=self.state, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def envoy_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"stack exited with {self.proc.returncode}:\n{self.logs()}")
        return envoy_ready(self.admin_port)

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT to the stack process alone; it stops its children."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.out, self.err)
                       if p.exists())

    def cleanup(self) -> None:
        try:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.interrupt()
        finally:
            # Anything of this stack still alive: its own session, started by this test.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            shutil.rmtree(self.state, ignore_errors=True)


@pytest.fixture
def running_stack() -> Iterator[RunningStack]:
    stack = RunningStack()
    try:
        wait_until(stack.envoy_ready, timeout=60, what="make run's stack (envoy /ready)")
        yield stack
    finally:
        stack.cleanup()


def _cli(stack: RunningStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = _env(stack.state, stack.redis_port)  # no REDIS_URL: resolved like make run
    return subprocess.run([sys.executable, "-m", "tokenfuse.cli", *args], env=env,
                          cwd=stack.state, capture_output=True, text=True, timeout=30)


def _raw_command(family: socket.AddressFamily, address: object, command: bytes) -> bytes:
    """One inline command, as any client on the host could send it; the first reply line."""
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(address)
        conn.sendall(command + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


def _command_lines() -> str:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"))
            except OSError:
                continue
    return "\n".join(lines)


def test_make_run_redis_needs_the_password_and_the_cli_has_it(
        running_stack: RunningStack) -> None:
    stack = running_stack
    password_file = stack.state / "redis.password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    assert len(password) == 64 and int(password, 16) >= 0  # 32 random bytes, hex

    # Nobody on the host gets in without it: not over TCP, not over the unix socket.
    sock = stack.state / "redis.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    for family, address in ((socket.AF_INET, ("127.0.0.1", stack.redis_port)),
                            (socket.AF_UNIX, str(sock))):
        assert _raw_command(family, address, b"SET tf:x 1").startswith(b"-NOAUTH"), address
    # (retry=None: redis-py retries an authentication error otherwise, for seconds)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=stack.redis_port, socket_timeout=2, retry=None).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=stack.redis_port, password="wrong", socket_timeout=2,
                    retry=None).ping()
    assert redis.Redis(port=stack.redis_port, password=password, socket_timeout=2).ping()
    assert password not in _command_lines()  # not on redis-server's (or any) command line

    # The CLI, with only TOKENFUSE_STATE_DIR and TOKENFUSE_LOCAL_REDIS_PORT, reaches it.
    done = _cli(stack, "budget", "set", "--key", "k", "--daily", "1")
    assert done.returncode == 0, done.stderr
    status = _cli(stack, "budget", "status", "--key", "k", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["limits"] == "own"
    assert doc["windows"]["day"]["limit_nano_usd"] == 1_000_000_000
    for result in (done, status):
        assert password not in result.stdout + result.stderr

    assert stack.interrupt() == 0
    logs = stack.logs()
    assert "gateway on http://" in logs  # the stack did write its output here
    assert password not in logs


def test_a_password_file_others_can_read_stops_make_run(tmp_path: Path) -> None:
    """Refused at start, before anything runs; the file is left as it is."""
    password = "Qk3v" * 16
    (tmp_path / "redis.password").write_text(password)
    os.chmod(tmp_path / "redis.password", 0o644)
    result = subprocess.run([sys.executable, "-m", "tokenfuse.deploy.stack"],
                            env=_env(tmp_path, free_port()), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "chmod 600" in result.stderr and password not in result.stderr
    assert (tmp_path / "redis.password").read_text() == password
