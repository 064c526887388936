"""Provider key pools through Envoy: rotation, cooldown, disable + probe, all-down 503,
CSV round trip, gateway keys with budgets; no pool secret anywhere."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.billing import key_of
from tests.conftest import anthropic_client, openai_client
from tests.fake_provider import FakeProvider
from tests.harness import Stack, wait_until
from tokenfuse.identity import key_id
from tokenfuse.pools import parse_pool_csv

CLAUDE_KEYS = [f"sk-ant-pool-secret-{i}-{'x' * 20}" for i in range(3)]
OPENAI_KEYS = [f"sk-proj-pool-secret-{i}-{'y' * 20}" for i in range(2)]


@pytest.fixture(scope="module")
def pool_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300",
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000",
                              "LOOP_GUARD_MAX_HITS": "0"})
    pools = s.workdir / "pools"
    pools.mkdir()
    (pools / "claude-main.csv").write_text(
        "key,label,weight\n" + "".join(f"{k},claude-{i},1\n" for i, k in enumerate(CLAUDE_KEYS)))
    (pools / "openai-main.csv").write_text(
        "key,label\n" + "".join(f"{k},oa-{i}\n" for i, k in enumerate(OPENAI_KEYS)))
    s.env["TOKENFUSE_POOLS_DIR"] = str(pools)
    s.start()
    for pool, provider in (("claude-main", "anthropic"), ("openai-main", "openai")):
        done = s.cli("keys", "import", "--pool", pool, "--provider", provider,
                     str(pools / f"{pool}.csv"))
        assert done.returncode == 0, done.stderr
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def claude_vkey(pool_stack: Stack) -> str:
    created = pool_stack.cli("vkey", "create", "--name", "my-app", "--pool", "claude-main")
    assert created.returncode == 0, created.stderr
    vkey = created.stdout.strip()
    assert vkey.startswith("tfk-")
    return vkey


def used_keys(fake: FakeProvider, since: int) -> Counter[str]:
    """Keys used for completions since record `since` (health probes excluded)."""
    return Counter(key_of(r.headers) for r in list(fake.records)[since:]
                   if r.method == "POST")


def ask_claude(stack: Stack, vkey: str, text: str) -> anthropic.types.Message:
    return anthropic_client(stack, vkey).messages.create(
        model="claude-haiku-4-5", max_tokens=3, messages=[{"role": "user", "content": text}])


def key_state(stack: Stack, pool: str, label: str) -> dict:
    rows = json.loads(stack.cli("keys", "list", "--pool", pool, "--json").stdout)
    return next(r for r in rows if r["label"] == label)


def test_round_robin_is_even(pool_stack: Stack, fake: FakeProvider, claude_vkey: str) -> None:
    since = len(fake.records)
    for i in range(30):
        ask_claude(pool_stack, claude_vkey, f"question {i}")
    counts = used_keys(fake, since)
    assert counts == {k: 10 for k in CLAUDE_KEYS}  # the vkey itself never went upstream
    oa = pool_stack.cli("vkey", "create", "--name", "oa", "--pool", "openai-main").stdout.strip()
    since = len(fake.records)
    for i in range(6):
        openai_client(pool_stack, oa).chat.completions.create(
            model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": str(i)}])
    assert used_keys(fake, since) == {k: 3 for k in OPENAI_KEYS}


def test_rate_limited_key_skipped_then_used_again(pool_stack: Stack, fake: FakeProvider,
                                                  claude_vkey: str) -> None:
    fake.key_failures[CLAUDE_KEYS[1]] = (429, 2)
    outcomes = []
    for i in range(6):
        try:
            ask_claude(pool_stack, claude_vkey, f"rl {i}")
            outcomes.append("ok")
        except anthropic.RateLimitError:
            outcomes.append("429")
    assert outcomes.count("429") == 1  # only the first call on the limited key
    state = key_state(pool_stack, "claude-main", "claude-1")
    assert state["state"] == "open" and state["last_error"] == "HTTP 429"
    del fake.key_failures[CLAUDE_KEYS[1]]
    wait_until(lambda: (key_state(pool_stack, "claude-main", "claude-1")["cooldown_until_ms"]
                        or 0) < int(pool_stack.redis.client().time()[0]) * 1000,
               what="retry-after to pass")
    since = len(fake.records)
    for i in range(6):
        ask_claude(pool_stack, claude_vkey, f"after {i}")
    assert used_keys(fake, since)[CLAUDE_KEYS[1]] >= 1  # back in rotation
    assert key_state(pool_stack, "claude-main", "claude-1")["state"] == "closed"


def test_revoked_key_disabled_then_probed_back(pool_stack: Stack, fake: FakeProvider,
                                               claude_vkey: str) -> None:
    fake.revoked_keys.add(CLAUDE_KEYS[2])
    for i in range(4):
        with contextlib.suppress(anthropic.AuthenticationError):
            ask_claude(pool_stack, claude_vkey, f"rev {i}")
    assert key_state(pool_stack, "claude-main", "claude-2")["state"] == "disabled"
    since = len(fake.records)
    for i in range(4):
        ask_claude(pool_stack, claude_vkey, f"while disabled {i}")
    assert CLAUDE_KEYS[2] not in used_keys(fake, since)
    fake.revoked_keys.discard(CLAUDE_KEYS[2])  # the provider accepts it again
    wait_until(lambda: key_state(pool_stack, "claude-main", "claude-2")["state"] == "closed",
               what="a probe to re-enable the key")
    assert 'tokenfuse_pool_probes_total{pool="claude-main",status="200"}' in \
        pool_stack.processor.metrics()


def test_all_keys_down_is_503_with_retry_after(pool_stack: Stack, fake: FakeProvider) -> None:
    oa = pool_stack.cli("vkey", "create", "--name", "down", "--pool", "openai-main")
    vkey = oa.stdout.strip()
    for k in OPENAI_KEYS:
        fake.key_failures[k] = (429, 30)
    try:
        client = openai_client(pool_stack, vkey)
        for _ in OPENAI_KEYS:
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="gpt-4o-mini", max_tokens=2,
                                               messages=[{"role": "user", "content": "x"}])
        before = sum(1 for r in list(fake.records) if r.method == "POST")
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=2,
                                           messages=[{"role": "user", "content": "y"}])
        assert raised.value.status_code == 503
        assert raised.value.response.json()["error"]["code"] == "no_healthy_key"
        assert 25 <= int(raised.value.response.headers["retry-after"]) <= 30
        assert sum(1 for r in list(fake.records) if r.method == "POST") == before
    finally:
        for k in OPENAI_KEYS:
            fake.key_failures.pop(k, None)
        for label in ("oa-0", "oa-1"):
            pool_stack.cli("keys", "enable", "--pool", "openai-main", label)


def test_budgets_apply_to_gateway_keys(pool_stack: Stack, claude_vkey: str) -> None:
    vkey = pool_stack.cli("vkey", "create", "--name", "b", "--pool", "claude-main").stdout
    vkey = vkey.strip()
    assert pool_stack.cli("budget", "set", "--key", vkey, "--daily", "0.000001").returncode == 0
    with pytest.raises(anthropic.APIStatusError) as raised:
        ask_claude(pool_stack, vkey, "too expensive")
    assert raised.value.status_code == 402
    with pytest.raises(anthropic.AuthenticationError):
        ask_claude(pool_stack, "tfk-not-a-real-gateway-key", "x")


def test_streaming_through_a_pool(pool_stack: Stack, claude_vkey: str) -> None:
    with anthropic_client(pool_stack, claude_vkey).messages.stream(
            model="claude-haiku-4-5", max_tokens=10,
            messages=[{"role": "user", "content": "stream via pool"}]) as stream:
        assert "".join(stream.text_stream)


def test_csv_import_export_round_trip(pool_stack: Stack, tmp_path: Path) -> None:
    plain = pool_stack.cli("keys", "export", "--pool", "claude-main").stdout
    for secret in CLAUDE_KEYS:
        assert secret not in plain
    rows = list(csv.DictReader(io.StringIO(plain)))
    assert {r["label"] for r in rows} == {"claude-0", "claude-1", "claude-2"}
    ids = {key_id(pool_stack.secret.encode(), k) for k in CLAUDE_KEYS}
    assert {r["id"] for r in rows} == ids
    full = pool_stack.cli("keys", "export", "--pool", "claude-main", "--include-secrets").stdout
    keys = parse_pool_csv(full)
    assert sorted(k.secret for k in keys) == sorted(CLAUDE_KEYS)
    (tmp_path / "again.csv").write_text(full)
    again = pool_stack.cli("keys", "import", "--pool", "claude-copy", "--provider",
                           "anthropic", str(tmp_path / "again.csv"))
    assert again.returncode == 0, again.stderr
    copied = json.loads(pool_stack.cli("keys", "list", "--pool", "claude-copy",
                                       "--json").stdout)
    assert {r["id"] for r in copied} == ids
    assert {r["label"] for r in copied} == {"claude-0", "claude-1", "claude-2"}


def test_pool_secrets_appear_nowhere(pool_stack: Stack) -> None:
    text = pool_stack.redis.dump_text()
    listing = pool_stack.cli("keys", "list").stdout
    for secret in CLAUDE_KEYS + OPENAI_KEYS:
        for where, haystack in (("redis", text), ("logs", pool_stack.logs()),
                                ("metrics", pool_stack.processor.metrics()),
                                ("keys list", listing)):
            assert secret not in haystack, f"a pool secret leaked into {where}"
