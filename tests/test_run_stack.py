"""`make run` (`python -m tokenfuse.deploy.stack`) for real: two on one host, a second one
on a state directory or port in use refused before it starts anything, and supervision —
a crashed processor, Redis or Envoy is restarted while the others keep failing closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.billing import billed_for, requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import envoy_ready, free_port, wait_until
from tokenfuse.config import (
    ConfigError,
    Settings,
    SupervisionSettings,
    load_settings,
    load_supervision,
)
from tokenfuse.deploy.stack import CannotStart, check_free


class MakeRun:
    """One `make run` in its own state directory, on free ports, in its own session."""

    def __init__(self, upstream: str, state: Path | None = None,
                 **extra: str) -> None:
        # Short path: the unix sockets live here (sun_path is ~108 bytes).
        self.state = state or Path(tempfile.mkdtemp(prefix="tf-rs-"))
        self.redis_port = free_port()
        self.listen_port = free_port()
        self.admin_port = free_port()
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "TOKENFUSE_STATE_DIR": str(self.state),
                    "TOKENFUSE_LOCAL_REDIS_PORT": str(self.redis_port),
                    "TOKENFUSE_LISTEN_PORT": str(self.listen_port),
                    "TOKENFUSE_ENVOY_ADMIN_PORT": str(self.admin_port),
                    "TOKENFUSE_ADMIN_PORT": str(free_port()),
                    "TOKENFUSE_METRICS_PORT": str(free_port()),
                    "TOKENFUSE_UPSTREAM_OPENAI": upstream}
        self.env.update(extra)
        self.log = Path(tempfile.mkstemp(prefix="tf-rs-log-")[1])
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tokenfuse.deploy.stack"], env=self.env,
                cwd=self.state, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"make run exited with {self.proc.returncode}:\n"
                                 f"{self.logs()}")
        return envoy_ready(self.admin_port)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """The stack's parts by name: redis-server, processor, envoy -> pid."""
        found: dict[str, int] = {}
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in path.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"tokenfuse.server" in cmdline:
                found["processor"] = int(pid)
            elif b"redis-server" in cmdline:
                found["redis-server"] = int(pid)
            elif b"envoy" in cmdline:
                found["envoy"] = int(pid)
        return found

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.listen_port}/openai/v1",
                             api_key=key, max_retries=0, timeout=10)

    def ask(self, key: str) -> openai.types.chat.ChatCompletion:
        return self.client(key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in self.env.items() if k != "TOKENFUSE_UPSTREAM_OPENAI"}
        return subprocess.run([sys.executable, "-m", "tokenfuse.cli", *args], env=env,
                              cwd=self.state, capture_output=True, text=True, timeout=30)

    def spent(self, key: str) -> int:
        done = self.cli("budget", "status", "--key", key, "--json")
        assert done.returncode == 0, done.stderr
        day = json.loads(done.stdout)["windows"]["day"]
        assert day["reserved_nano_usd"] == 0
        return int(day["spent_nano_usd"])

    def stop(self) -> int:
        """Ctrl-C: SIGINT to the stack process alone; it stops its parts."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        try:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # this test's own session
            self.proc.wait(timeout=10)
            shutil.rmtree(self.state, ignore_errors=True)
            self.log.unlink(missing_ok=True)


@pytest.fixture
def runs(fake: FakeProvider) -> Iterator[list[MakeRun]]:
    """`make run`s started by a test, all stopped at its end."""
    started: list[MakeRun] = []
    yield started
    for run in started:
        run.cleanup()


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] in "ZX"
    except (OSError, IndexError):
        return True


def _refused(run: MakeRun, key: str, fake: FakeProvider, codes: set[str]) -> bool:
    """A request: True when it was answered; else it must be refused (a 503 with one of
    `codes`, or "connection": refused or reset) and have reached no provider."""
    before = requests_for(fake, key)
    try:
        assert run.ask(key).usage is not None
        return True
    except openai.APIStatusError as exc:
        assert exc.status_code == 503, exc.response.text
        assert exc.response.json()["error"]["code"] in codes
    except openai.APIConnectionError:
        assert "connection" in codes
    assert requests_for(fake, key) == before  # never forwarded
    return False


def test_two_make_runs_on_one_host_and_a_third_refused(runs: list[MakeRun],
                                                       fake: FakeProvider) -> None:
    first, second = MakeRun(fake.base_url), MakeRun(fake.base_url)
    runs += [first, second]
    for run in (first, second):
        wait_until(run.ready, timeout=90, what="make run (envoy /ready)")
    keys = {}
    for run in (first, second):
        key = keys[run.admin_port] = "sk-test-" + os.urandom(8).hex()
        assert run.ask(key).usage is not None
        assert run.spent(key) == billed_for(fake, key) > 0
    # Each has its own Redis: one stack's key is unknown to the other.
    assert second.spent(keys[first.admin_port]) == 0

    # The same state directory (other ports all free): refused at once, nothing touched.
    sockets = sorted(p.name for p in first.state.glob("*.sock"))
    same_dir = MakeRun(fake.base_url, state=first.state)
    runs.append(same_dir)
    assert same_dir.proc.wait(timeout=30) == 2
    assert "is in use by another `make run`" in same_dir.logs()
    assert str(first.proc.pid) in same_dir.logs()
    assert sorted(p.name for p in first.state.glob("*.sock")) == sockets
    # A port in use (the first one's listener): refused, naming the variable to change.
    same_port = MakeRun(fake.base_url, TOKENFUSE_LISTEN_PORT=str(first.listen_port))
    runs.append(same_port)
    assert same_port.proc.wait(timeout=30) == 2
    assert (f"port {first.listen_port} (TOKENFUSE_LISTEN_PORT) on 127.0.0.1 is already in "
            "use") in same_port.logs()
    assert not list(same_port.state.glob("*.sock"))  # it started nothing
    for run in (first, second):  # both unaffected
        assert run.ask(keys[run.admin_port]).usage is not None
        assert run.spent(keys[run.admin_port]) == billed_for(fake, keys[run.admin_port])
    assert first.stop() == 0 and second.stop() == 0


def _kill_and_recover(run: MakeRun, part: str, key: str, fake: FakeProvider,
                      *codes: str) -> None:
    pid = run.children()[part]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _gone(pid), what=f"{part} to die")
    outcomes: list[bool] = []
    killed = time.monotonic()

    def answered() -> bool:
        outcomes.append(_refused(run, key, fake, set(codes)))
        return outcomes[-1]

    wait_until(answered, timeout=30, what=f"{part} to be restarted and traffic to recover")
    assert outcomes[0] is False  # the outage was seen, and failed closed
    print(f"\n{part}: down {time.monotonic() - killed:.1f} s, "
          f"{outcomes.count(False)} requests refused meanwhile")
    new_pid = run.children()[part]
    assert new_pid != pid
    assert f"{part} exited (killed by SIGKILL); restarting it" in run.logs()
    # (logged once the supervisor sees it ready: a request may beat it by a poll)
    wait_until(lambda: f"{part} restarted (pid {new_pid})" in run.logs(),
               what="the supervisor's restart log line")


def test_make_run_restarts_a_crashed_processor_redis_and_envoy(runs: list[MakeRun],
                                                               fake: FakeProvider) -> None:
    run = MakeRun(fake.base_url)
    runs.append(run)
    wait_until(run.ready, timeout=90, what="make run (envoy /ready)")
    key = "sk-test-" + os.urandom(8).hex()
    assert run.cli("budget", "set", "--key", key, "--daily", "1").returncode == 0
    assert run.ask(key).usage is not None
    envoy = run.children()["envoy"]

    _kill_and_recover(run, "processor", key, fake, "processor_unavailable")
    assert run.children()["envoy"] == envoy  # Envoy kept running, and refused meanwhile
    assert run.spent(key) == billed_for(fake, key)  # billed exactly

    before = run.spent(key)
    _kill_and_recover(run, "redis-server", key, fake, "state_store_unavailable")
    # The spend before the crash came back from the append-only file; the one after adds.
    assert run.spent(key) == billed_for(fake, key) > before

    # (a request that reaches the new Envoy before its processor connection: a 503)
    _kill_and_recover(run, "envoy", key, fake, "connection", "processor_unavailable")
    assert run.spent(key) == billed_for(fake, key)
    parts = run.children()
    assert run.stop() == 0  # Ctrl-C still stops everything
    for name, pid in parts.items():
        wait_until(lambda pid=pid: _gone(pid), timeout=15, what=f"{name} to stop")


def test_a_part_crashing_too_often_stops_the_stack(runs: list[MakeRun],
                                                   fake: FakeProvider) -> None:
    run = MakeRun(fake.base_url, TOKENFUSE_RESTARTS_PER_MINUTE="1",
                  TOKENFUSE_RESTART_BACKOFF_MS="100")
    runs.append(run)
    wait_until(run.ready, timeout=90, what="make run (envoy /ready)")
    parts = run.children()
    os.kill(parts["envoy"], signal.SIGKILL)
    wait_until(lambda: "envoy restarted" in run.logs(), what="the first restart")
    os.kill(run.children()["envoy"], signal.SIGKILL)
    assert run.proc.wait(timeout=30) == 1
    assert ("envoy exited (killed by SIGKILL), 2 times within a minute "
            "(TOKENFUSE_RESTARTS_PER_MINUTE=1): giving up, stopping the stack") in run.logs()
    for name in ("processor", "redis-server"):
        wait_until(lambda pid=parts[name]: _gone(pid), timeout=15, what=f"{name} to stop")


def test_supervision_settings() -> None:
    assert load_supervision({}) == SupervisionSettings(5, 500, 8000)
    policy = load_supervision({"TOKENFUSE_RESTARTS_PER_MINUTE": "0",
                               "TOKENFUSE_RESTART_BACKOFF_MS": "20000"})
    assert policy.restarts_per_minute == 0 and policy.max_backoff_ms == 20000
    with pytest.raises(ConfigError, match="TOKENFUSE_RESTARTS_PER_MINUTE"):
        load_supervision({"TOKENFUSE_RESTARTS_PER_MINUTE": "-1"})
    with pytest.raises(ConfigError, match="TOKENFUSE_RESTART_BACKOFF_MS"):
        load_supervision({"TOKENFUSE_RESTART_BACKOFF_MS": "soon"})


def _settings(state: Path, **extra: str) -> Settings:
    env = {"TOKENFUSE_STATE_DIR": str(state), "TOKENFUSE_LOCAL_REDIS_PORT": str(free_port()),
           "TOKENFUSE_LISTEN_PORT": str(free_port()),
           "TOKENFUSE_ENVOY_ADMIN_PORT": str(free_port()),
           "TOKENFUSE_METRICS_PORT": str(free_port())}
    return load_settings({**env, **extra})


def test_start_up_checks_name_what_to_change(tmp_path: Path) -> None:
    check_free(_settings(tmp_path))  # all free: passes
    port = str(free_port())
    with pytest.raises(CannotStart, match="TOKENFUSE_METRICS_PORT and TOKENFUSE_LISTEN_PORT "
                                          f"are both {port}"):
        check_free(_settings(tmp_path, TOKENFUSE_LISTEN_PORT=port,
                             TOKENFUSE_METRICS_PORT=port))
    # Another stack's processor socket (given explicitly): served, so not taken over.
    sock = tmp_path / "p.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(sock))
        other.listen()
        with pytest.raises(CannotStart, match=r"processor socket .* is served by another"):
            check_free(_settings(tmp_path, TOKENFUSE_PROCESSOR_SOCKET=str(sock)))
    check_free(_settings(tmp_path, TOKENFUSE_PROCESSOR_SOCKET=str(sock)))  # a stale file
