"""The adversarial suite's stack: default settings (the loop guard included) plus a key
pool, so a gateway key exists; the fake provider is the session's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack

POOL_KEY = "sk-ant-adversarial-pool-" + "p" * 24


@pytest.fixture(scope="package")
def stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url)
    pools = s.workdir / "pools"
    pools.mkdir()
    (pools / "adv.csv").write_text(f"key,label,weight\n{POOL_KEY},adv-0,1\n")
    (pools / "adv.csv").chmod(0o600)
    s.env["TOKENFUSE_POOLS_DIR"] = str(pools)
    s.start()
    done = s.cli("keys", "import", "--pool", "adv", "--provider", "anthropic",
                 str(pools / "adv.csv"))
    assert done.returncode == 0, done.stderr
    yield s
    s.cleanup()


@pytest.fixture(scope="package")
def gateway_key(stack: Stack) -> str:
    created = stack.cli("vkey", "create", "--name", "adversary", "--pool", "adv")
    assert created.returncode == 0, created.stderr
    vkey = created.stdout.strip()
    assert vkey.startswith("tfk-")
    return vkey
