"""TOKENFUSE_PROCESSES > 1: a supervisor, one worker per socket, Envoy balancing over them,
metrics summed on one port, and no worker outliving its supervisor."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import openai_client
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tokenfuse.config import load_settings, worker_socket
from tokenfuse.deploy import envoy_config


@pytest.fixture(scope="module")
def multi(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_PROCESSES": "2"}).start()
    yield s
    s.cleanup()


def _workers(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _allowed(metrics: str) -> float:
    pattern = (r'^tokenfuse_decisions_total\{outcome="allowed",provider="openai",'
               r'reason="within_budget"\} (\S+)$')
    match = re.search(pattern, metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_socket_names() -> None:
    base = Path("/run/tf/processor.sock")
    assert worker_socket(base, 0) == base
    assert worker_socket(base, 2) == Path("/run/tf/processor-2.sock")


def test_envoy_gets_one_endpoint_per_process(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("TOKENFUSE_PROCESSOR_SOCKET", str(tmp_path / "p.sock"))
    monkeypatch.setenv("TOKENFUSE_PROCESSES", "3")
    cluster = next(c for c in envoy_config.render(load_settings())["static_resources"]["clusters"]
                   if c["name"] == "tokenfuse_processor")
    paths = [e["endpoint"]["address"]["pipe"]["path"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert paths == [str(tmp_path / n) for n in ("p.sock", "p-1.sock", "p-2.sock")]


def test_requests_are_decided_by_every_worker_and_counted_once(multi: Stack,
                                                               api_key: str) -> None:
    assert all(path.exists() for path in multi.processor.sockets)
    assert len(_workers(multi.processor.proc.pid)) == 2
    multi.cli("budget", "set", "--key", api_key, "--daily", "1")
    before = _allowed(multi.processor.metrics())
    client = openai_client(multi, api_key)
    for i in range(12):
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=5,
            messages=[{"role": "user", "content": f"hello {'abcdefghijkl'[i]}"}])
    # One metrics page, the sum of both workers.
    assert _allowed(multi.processor.metrics()) - before == 12
    # Both workers decided some of them (Envoy balances streams round robin).
    logs = multi.processor.log_text()
    pids = set(re.findall(r"^\S+ \S+ (\d+) DEBUG tokenfuse.processor reserved", logs, re.M))
    assert len(pids) == 2
    status = json.loads(multi.cli("budget", "status", "--key", api_key, "--json").stdout)
    assert status["windows"]["day"]["reserved_nano_usd"] == 0
    assert status["windows"]["day"]["spent_nano_usd"] > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_the_supervisor(fake: FakeProvider, sig: int) -> None:
    stack = Stack(fake.base_url, {"TOKENFUSE_PROCESSES": "2"})
    try:
        stack.redis.start()
        stack.processor.start()
        assert stack.processor.proc is not None
        workers = _workers(stack.processor.proc.pid)
        assert len(workers) == 2
        stack.processor.stop(sig)
        wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=15,
                   what="workers to exit")
    finally:
        stack.cleanup()
