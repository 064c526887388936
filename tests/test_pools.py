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
import httpx
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import key_of, usage_cost
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tokenfuse.identity import key_id
from tokenfuse.pools.secrets import parse_pool_csv

CLAUDE_KEYS = [f"sk-ant-pool-secret-{i}-{'x' * 20}" for i in range(3)]
OPENAI_KEYS = [f"sk-proj-pool-secret-{i}-{'y' * 20}" for i in range(2)]


@pytest.fixture(scope="module")
def pool_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300",
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000",
                              "LOOP_GUARD_MAX_HITS": "0",
                              "LOOP_GUARD_NEAR_DUPLICATE": "0"})
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


def test_each_key_is_credited_its_own_calls(pool_stack: Stack, fake: FakeProvider) -> None:
    """The key that served a call is named to the processor in internal response headers
    (gateway-key routes send response headers); the client never sees them."""
    vkey = pool_stack.cli("vkey", "create", "--name", "credit", "--pool",
                          "openai-main").stdout.strip()

    def rows() -> dict[str, dict]:
        out = json.loads(pool_stack.cli("keys", "list", "--pool", "openai-main",
                                        "--json").stdout)
        return {r["id"]: r for r in out}

    before, since = rows(), len(fake.records)
    for i in range(4):
        raw = openai_client(pool_stack, vkey).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", max_tokens=2 + i,
            messages=[{"role": "user", "content": f"credit {i}"}])
        assert not any(h.lower().startswith("x-tokenfuse-") for h in raw.headers)
    wait_until(lambda: sum(r["requests"] for r in rows().values())
               >= sum(r["requests"] for r in before.values()) + 4, what="per-key reports")
    after = rows()
    for key in OPENAI_KEYS:
        served = [r for r in list(fake.records)[since:] if key_of(r.headers) == key]
        kid = key_id(pool_stack.secret.encode(), key)
        assert len(served) == 2
        assert after[kid]["spend_nano_usd"] - before[kid]["spend_nano_usd"] == sum(
            usage_cost(r.usage) for r in served)
        assert after[kid]["tokens"] > before[kid]["tokens"]


def attempts_by_key(fake: FakeProvider, since: int) -> dict[str, list[int]]:
    """Statuses the provider answered, per key, for completions since record `since`."""
    out: dict[str, list[int]] = {}
    for r in list(fake.records)[since:]:
        if r.method == "POST":
            out.setdefault(key_of(r.headers), []).append(r.status)
    return out


def test_rate_limited_key_skipped_then_used_again(pool_stack: Stack, fake: FakeProvider,
                                                  claude_vkey: str) -> None:
    fake.key_failures[CLAUDE_KEYS[1]] = (429, 2)
    since = len(fake.records)
    for i in range(6):
        ask_claude(pool_stack, claude_vkey, f"rl {i}")  # failover: no error reaches us
    attempts = attempts_by_key(fake, since)
    assert attempts[CLAUDE_KEYS[1]] == [429]  # tried once, then skipped for its retry-after
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


def _failover_vkey(stack: Stack, pool: str) -> str:
    vkey = stack.cli("vkey", "create", "--name", "failover", "--pool", pool).stdout.strip()
    assert stack.cli("budget", "set", "--key", vkey, "--daily", "5").returncode == 0
    return vkey


def _day(stack: Stack, vkey: str) -> dict:
    doc = json.loads(stack.cli("budget", "status", "--key", vkey, "--json").stdout)
    return doc["windows"]["day"]


def _billed_since(fake: FakeProvider, since: int) -> int:
    return sum(usage_cost(r.usage) for r in list(fake.records)[since:]
               if r.method == "POST" and r.usage is not None and r.completed)


@pytest.mark.parametrize("status", [429, 529])
def test_failover_is_invisible_and_charged_once(pool_stack: Stack, fake: FakeProvider,
                                                status: int) -> None:
    vkey = _failover_vkey(pool_stack, "claude-main")
    failing = CLAUDE_KEYS[0]
    fake.key_failures[failing] = (status, 30)
    since = len(fake.records)
    try:
        texts = [ask_claude(pool_stack, vkey, f"failover {status} {i}").content[0].text
                 for i in range(4)]
        with anthropic_client(pool_stack, vkey).messages.stream(
                model="claude-haiku-4-5", max_tokens=8,
                messages=[{"role": "user", "content": f"failover stream {status}"}]) as s:
            texts.append("".join(s.text_stream))
    finally:
        del fake.key_failures[failing]
        pool_stack.cli("keys", "enable", "--pool", "claude-main", "claude-0")
    assert all(texts)  # every call answered; the client saw no error
    attempts = attempts_by_key(fake, since)
    assert attempts[failing] == [status]  # one failed attempt, then the key cooled down
    assert sum(len(v) for v in attempts.values()) == 6  # 5 calls + 1 failed attempt
    day = _day(pool_stack, vkey)
    assert day["spent_nano_usd"] == _billed_since(fake, since) > 0  # charged once
    assert day["reserved_nano_usd"] == 0
    metrics = pool_stack.processor.metrics()
    assert f'tokenfuse_pool_failovers_total{{pool="claude-main",status="{status}"}}' in metrics
    prefix = key_id(pool_stack.secret.encode(), failing)[:8]
    assert (f'tokenfuse_pool_key_state{{key="{prefix}",pool="claude-main",state="open"}} 1.0'
            in metrics)


def test_failover_is_bounded(pool_stack: Stack, fake: FakeProvider) -> None:
    """Every key failing with 503: TOKENFUSE_POOL_MAX_RETRIES (2) more attempts, then the
    client gets an answer; nothing is charged."""
    vkey = _failover_vkey(pool_stack, "openai-main")
    since = len(fake.records)
    for k in OPENAI_KEYS:
        fake.key_failures[k] = (503, 1)
    try:
        with pytest.raises(openai.APIStatusError) as raised:
            openai_client(pool_stack, vkey).chat.completions.create(
                model="gpt-4o-mini", max_tokens=2,
                messages=[{"role": "user", "content": "bounded"}])
    finally:
        for k in OPENAI_KEYS:
            fake.key_failures.pop(k, None)
        for label in ("oa-0", "oa-1"):
            pool_stack.cli("keys", "enable", "--pool", "openai-main", label)
    assert raised.value.status_code == 503
    assert raised.value.response.json()["error"]["code"] == "no_healthy_key"
    assert "x-tokenfuse-retry" not in raised.value.response.headers
    attempts = attempts_by_key(fake, since)
    assert sorted(attempts) == sorted(OPENAI_KEYS)  # each key tried once, no storm
    assert all(v == [503] for v in attempts.values())
    day = _day(pool_stack, vkey)
    assert day["spent_nano_usd"] == 0 and day["reserved_nano_usd"] == 0


def test_clients_cannot_route_to_a_pool(pool_stack: Stack, fake: FakeProvider,
                                        api_key: str) -> None:
    """Forged routing headers are dropped: the request goes out with the client's own key."""
    since = len(fake.records)
    response = httpx.post(
        pool_stack.envoy.base_url + "/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {api_key}",
                 "x-tokenfuse-pool": "openai:openai-main", "x-tokenfuse-grant": "0" * 64},
        json={"model": "gpt-4o-mini", "max_tokens": 2,
              "messages": [{"role": "user", "content": "forged"}]}, timeout=30)
    assert response.status_code == 200, response.text
    sent = list(fake.records)[since:]
    assert [key_of(r.headers) for r in sent] == [api_key]
    assert not any(h.startswith("x-tokenfuse-") for h in sent[0].headers)


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
        since = len(fake.records)
        for text in ("x", "y"):  # the first call tries both keys; the second none
            with pytest.raises(openai.APIStatusError) as raised:
                client.chat.completions.create(model="gpt-4o-mini", max_tokens=2,
                                               messages=[{"role": "user", "content": text}])
            assert raised.value.status_code == 503
            assert raised.value.response.json()["error"]["code"] == "no_healthy_key"
            assert 25 <= int(raised.value.response.headers["retry-after"]) <= 30
        assert {k: v for k, v in attempts_by_key(fake, since).items()} == {
            k: [429] for k in OPENAI_KEYS}
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


def test_pool_serves_only_its_provider(pool_stack: Stack, fake: FakeProvider,
                                       claude_vkey: str) -> None:
    """A pool of Claude keys is never presented to another provider's route."""
    before = len(fake.records)
    client = openai_client(pool_stack, claude_vkey)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "pool_provider_mismatch"
    assert "/anthropic/" in str(raised.value)
    assert len(fake.records) == before
