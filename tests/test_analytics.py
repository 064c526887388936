"""Usage analytics through the real stack: a known workload (streamed and not, both SDKs,
a budget refusal, loop and unknown-model refusals, a provider error, a cut stream, a
pooled call) and the analytics totals per model, key, provider and pool equal the fake
provider's bill and `budget status` to the nano-dollar; each refusal counted once;
minute, hour and day buckets agree; retention set on every bucket. One stack of its own
(its Redis holds only this workload)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import anthropic_client, openai_client
from tests.support.billing import billed_for, key_of, usage_cost
from tests.support.fake_provider import FakeProvider
from tests.support.harness import RedisServer, Stack, wait_until
from tokenfuse.config import load_settings
from tokenfuse.identity import key_id
from tokenfuse.state.admin import BudgetAdmin
from tokenfuse.state.analytics import (
    BOUNDS_MS,
    AnalyticsPolicy,
    AnalyticsReader,
    CallFacts,
    RefusalRecorder,
    Totals,
    bin_of,
    calendar_window,
    group_of,
    tiling_resolution,
)
from tokenfuse.state.budgets import BudgetStore, Refusal, Reservation
from tokenfuse.state.keys import analytics_pattern

POOL_KEYS = [f"sk-ant-analytics-pool-{i}-{'q' * 20}" for i in range(2)]
HAIKU, MINI = "claude-haiku-4-5", "gpt-4o-mini"


@pytest.fixture(scope="module")
def astack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"LOOP_GUARD_NEAR_DUPLICATE": "0"})
    s.add_pool("claude-pool", "anthropic", "key,label\n" + "".join(
        f"{k},p-{i}\n" for i, k in enumerate(POOL_KEYS)))
    s.start()
    yield s
    s.cleanup()


def fresh() -> str:
    return "sk-analytics-" + uuid.uuid4().hex


def status(stack: Stack, key: str) -> dict[str, Any]:
    done = stack.cli("budget", "status", "--key", key, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def spent(stack: Stack, key: str) -> int:
    return status(stack, key)["windows"]["total"]["spent_nano_usd"]


@dataclass
class Workload:
    """What was sent, by key: the keys, and the expectations the fake's records give."""

    keys: dict[str, str] = field(default_factory=dict)  # role -> API key
    billed_by_model: dict[str, int] = field(default_factory=dict)
    cut_model: str = MINI

    def caller(self, stack: Stack, role: str) -> str:
        return key_id(stack.secret.encode(), self.keys[role])


@pytest.fixture(scope="module")
def workload(astack: Stack, fake: FakeProvider) -> Workload:
    w = Workload(keys={r: fresh() for r in ("openai", "anthropic", "refused", "cut",
                                            "loop")})
    since = len(fake.records)
    oa = openai_client(astack, w.keys["openai"])
    oa.chat.completions.create(model=MINI, max_tokens=7,
                               messages=[{"role": "user", "content": "one"}])
    list(oa.chat.completions.create(model=MINI, max_tokens=9, stream=True,
                                    messages=[{"role": "user", "content": "two"}]))
    an = anthropic_client(astack, w.keys["anthropic"])
    an.messages.create(model=HAIKU, max_tokens=5,
                       messages=[{"role": "user", "content": "alpha beta " * 40}],
                       extra_headers={"x-fake-cache-read": "40",
                                      "x-fake-cache-creation": "30"})
    with an.messages.stream(model=HAIKU, max_tokens=11,
                            messages=[{"role": "user", "content": "b"}]) as events:
        events.get_final_message()
    with pytest.raises(anthropic.InternalServerError):  # a provider error: billed nothing
        an.messages.create(model=HAIKU, max_tokens=5,
                           messages=[{"role": "user", "content": "c"}],
                           extra_headers={"x-fake-status": "500"})
    with pytest.raises(anthropic.BadRequestError):  # refused by the processor (no script)
        an.messages.create(model="claude-no-such-model", max_tokens=5,
                           messages=[{"role": "user", "content": "d"}])
    # Refused by the budget, twice (reserve.lua counts these).
    assert astack.cli("budget", "set", "--key", w.keys["refused"],
                      "--daily", "0.000000001").returncode == 0
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as refused:
            openai_client(astack, w.keys["refused"]).chat.completions.create(
                model=MINI, max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert refused.value.status_code == 402
    # The sixth identical request is a loop (LOOP_GUARD_MAX_HITS=5), the seventh too.
    loop = openai_client(astack, w.keys["loop"])
    for i in range(7):
        try:
            loop.chat.completions.create(model=MINI, max_tokens=3,
                                         messages=[{"role": "user", "content": "same"}])
        except openai.RateLimitError:
            assert i >= 5
    # A stream cut at its budget (worth 150 gpt-4o-mini output tokens).
    assert astack.cli("budget", "set", "--key", w.keys["cut"],
                      "--daily", "0.000090000").returncode == 0
    with pytest.raises(openai.APIError):
        for _ in openai_client(astack, w.keys["cut"]).chat.completions.create(
                model=MINI, stream=True, messages=[{"role": "user", "content": "novel"}],
                extra_headers={"x-fake-chunk-delay-ms": "2", "x-fake-output-tokens": "4000"}):
            pass
    # A pooled call (a gateway key on a pool of Anthropic keys), streamed.
    vkey = astack.cli("vkey", "create", "--name", "a", "--pool", "claude-pool").stdout.strip()
    w.keys["pool"] = vkey
    with anthropic_client(astack, vkey).messages.stream(
            model=HAIKU, max_tokens=6, messages=[{"role": "user", "content": "pooled"}]) as s:
        s.get_final_message()
    for role in w.keys:  # every reservation settled
        wait_until(lambda r=role: all(v["reserved_nano_usd"] == 0 for v in status(
            astack, w.keys[r])["windows"].values()), what=f"{role} settled")
    for r in list(fake.records)[since:]:
        if r.usage is not None and r.completed and r.method == "POST":
            w.billed_by_model[r.usage.model] = (w.billed_by_model.get(r.usage.model, 0)
                                                + usage_cost(r.usage))
    return w


def reader(stack: Stack) -> AnalyticsReader:
    assert stack.redis is not None
    return AnalyticsReader(stack.redis.client())


def today(stack: Stack) -> tuple[int, int]:
    """Yesterday and today (UTC, by Redis's clock): a run across midnight is still inside."""
    assert stack.redis is not None
    seconds, micros = stack.redis.client().time()
    start, end = calendar_window("day", seconds * 1000 + micros // 1000)
    return start - 86_400_000, end


def wait_refusal(stack: Stack, caller: str, reason: str) -> Totals:
    """The background refusal count lands after the answer: wait for it."""
    found: list[Totals] = []

    def landed() -> bool:
        _, groups = reader(stack).usage(*today(stack), "key")
        found[:] = [groups.get(caller, Totals())]
        return found[0].refusals_by_reason.get(reason, 0) > 0

    wait_until(landed, what=f"refusal {reason} counted")
    return found[0]


def test_spend_per_key_is_budget_status_and_the_bill(astack: Stack, fake: FakeProvider,
                                                    workload: Workload) -> None:
    totals, by_key = reader(astack).usage(*today(astack), "key")
    for role, key in workload.keys.items():
        caller = workload.caller(astack, role)
        expected = spent(astack, key)
        assert by_key.get(caller, Totals()).spend_nano == expected, role
        if role in ("openai", "anthropic"):
            assert expected == billed_for(fake, key) > 0, role
    assert workload.keys["pool"] and by_key[workload.caller(astack, "pool")].spend_nano > 0
    assert by_key[workload.caller(astack, "cut")].spend_nano > 0  # what the cut stream cost
    assert totals.spend_nano == sum(t.spend_nano for t in by_key.values())
    assert totals.spend_nano == sum(spent(astack, k) for k in workload.keys.values())


def test_spend_per_model_provider_and_pool(astack: Stack, workload: Workload) -> None:
    window = today(astack)
    cut = spent(astack, workload.keys["cut"])  # charged as counted: not a completed bill
    _, by_model = reader(astack).usage(*window, "model")
    assert by_model[HAIKU].spend_nano == workload.billed_by_model[HAIKU]
    assert by_model[MINI].spend_nano == workload.billed_by_model[MINI] + cut
    _, by_provider = reader(astack).usage(*window, "provider")
    assert set(by_provider) == {"openai", "anthropic"}
    assert by_provider["anthropic"].spend_nano == workload.billed_by_model[HAIKU]
    assert by_provider["openai"].spend_nano == workload.billed_by_model[MINI] + cut
    _, by_pool = reader(astack).usage(*window, "pool")
    assert by_pool["claude-pool"].spend_nano == spent(astack, workload.keys["pool"]) > 0
    assert by_pool["claude-pool"].requests == 1
    assert by_pool[""].spend_nano == (sum(spent(astack, k) for k in workload.keys.values())
                                      - by_pool["claude-pool"].spend_nano)


def test_tokens_requests_errors_and_histograms(astack: Stack, fake: FakeProvider,
                                              workload: Workload) -> None:
    _, by_key = reader(astack).usage(*today(astack), "key")
    oa = by_key[workload.caller(astack, "openai")]
    records = [r for r in fake.records if key_of(r) == workload.keys["openai"]]
    assert oa.requests == 2 and oa.errors_by_status == {}
    assert oa.tokens["output"] == sum(r.usage.output_tokens for r in records) == 16
    assert oa.tokens["input"] == sum(r.usage.input_tokens for r in records) > 0
    an = by_key[workload.caller(astack, "anthropic")]
    assert an.requests == 3  # two answered, one provider error
    assert an.errors_by_status == {"500": 1}
    billed = [r.usage for r in fake.records
              if key_of(r) == workload.keys["anthropic"] and r.usage is not None]
    assert an.tokens["cache_read"] == sum(u.cached_input_tokens for u in billed) > 0
    assert an.tokens["cache_write"] == sum(u.cache_creation_input_tokens for u in billed) > 0
    assert an.tokens["input"] == sum(u.input_tokens for u in billed)
    assert an.tokens["output"] == sum(u.output_tokens for u in billed)
    # The unknown model: counted in the background, after the answer, once.
    assert wait_refusal(astack, workload.caller(astack, "anthropic"),
                        "unknown_model").refusals_by_reason == {"unknown_model": 1}
    for t in (oa, an):  # every settled call has a latency and a time to first byte
        for histogram in (t.latency, t.ttft):
            assert histogram.bounds_ms == BOUNDS_MS
            assert histogram.count == t.requests == sum(histogram.counts)
            assert histogram.sum_ms >= 0
        assert t.ttft.sum_ms <= t.latency.sum_ms


def test_refusals_are_counted_once_by_reason(astack: Stack, workload: Workload) -> None:
    _, by_key = reader(astack).usage(*today(astack), "key")
    refused = by_key[workload.caller(astack, "refused")]
    assert refused.refusals_by_reason == {"budget_exceeded": 2}
    assert refused.requests == 0 and refused.spend_nano == 0
    loop = by_key[workload.caller(astack, "loop")]
    assert loop.refusals_by_reason == {"recursive_loop_detected": 2}
    assert loop.requests == 5
    cut = by_key[workload.caller(astack, "cut")]
    assert cut.refusals_by_reason == {"stream_cut_budget_exceeded": 1}
    assert cut.requests == 1 and cut.tokens["output"] > 100


def test_minute_hour_and_day_buckets_agree(astack: Stack, workload: Workload) -> None:
    start, end = today(astack)
    r = reader(astack)
    day, _ = r.usage(start, end)
    assert tiling_resolution(start, end) == "day"
    for resolution in ("minute", "hour"):
        series = r.series(resolution, start, end, "model")
        assert len(series) == {"minute": 2 * 1440, "hour": 2 * 24}[resolution]
        assert sum(t.spend_nano for _, t, _ in series) == day.spend_nano > 0
        assert sum(t.requests for _, t, _ in series) == day.requests
        assert sum(t.latency.count for _, t, _ in series) == day.latency.count
        merged: dict[str, int] = {}
        for _, _, groups in series:
            for model, t in groups.items():
                merged[model] = merged.get(model, 0) + t.spend_nano
        assert merged == {m: t.spend_nano for m, t in r.usage(start, end, "model")[1].items()}
    # An hour no call can have reached yet (two hours ahead): one empty bucket.
    ahead = calendar_window("hour", int(time.time() * 1000) + 2 * 3_600_000)
    (bucket, hour, _), = r.series("hour", *ahead, "")
    assert bucket == ahead[0] and hour.requests == 0 and hour.spend_nano == 0


def test_every_bucket_expires_after_its_retention(astack: Stack, workload: Workload) -> None:
    assert astack.redis is not None
    client = astack.redis.client()
    retention = {"minute": (60, 48 * 3600), "hour": (3600, 35 * 86400),
                 "day": (86400, 400 * 86400)}
    for resolution, (size, keep) in retention.items():
        keys = list(client.scan_iter(match=analytics_pattern(resolution)))
        assert keys, resolution
        for key in keys:
            number = int(key.decode().rpartition(":")[2])
            assert client.expiretime(key) == (number + 1) * size + keep, key


def test_live_streams_and_the_calendar(astack: Stack, workload: Workload) -> None:
    assert reader(astack).live_streams() == 0  # everything settled
    # 2026-12-02 is a Wednesday: its ISO week began on Monday 2026-11-30.
    now = 1_796_203_445_000  # 2026-12-02T09:24:05Z
    assert calendar_window("week", now) == (1_795_996_800_000, 1_796_601_600_000)
    assert calendar_window("month", now) == (1_796_083_200_000, 1_798_761_600_000)
    assert calendar_window("day", now) == (1_796_169_600_000, 1_796_256_000_000)
    assert bin_of(50) == 0 and bin_of(51) == 1 and bin_of(60_001) == len(BOUNDS_MS)
    with pytest.raises(ValueError):
        reader(astack).usage(0, 60_000, "colour")


def test_the_switch_turns_every_write_off(redis_server: RedisServer) -> None:
    """TOKENFUSE_ANALYTICS=0: settle, a refusal in reserve and the background recorder
    write no bucket; the money is settled as before."""
    settings = load_settings({"TOKENFUSE_ANALYTICS": "0",
                              "TOKENFUSE_ANALYTICS_MINUTE_RETENTION_HOURS": "2"})
    assert not settings.analytics.enabled
    assert settings.analytics.minute_retention_s == 7200
    assert load_settings({}).analytics.enabled
    facts = CallFacts(group_of("openai", "", MINI), 200, 10, 5, (1, 2, 0, 0, 0))

    async def scenario(enabled: bool, caller: str) -> None:
        store = BudgetStore.from_url(redis_server.url, 1000, [-1, -1, 5_000, -1, -1, -1],
                                     analytics=AnalyticsPolicy(enabled=enabled))
        recorder = RefusalRecorder(store.decisions, store.analytics, 10, 1.0)
        try:
            assert isinstance(await store.reserve(caller, "a", 4_000, group=facts.group),
                              Reservation)
            assert await store.settle(caller, "a", 3_000, facts=facts)
            assert isinstance(await store.reserve(caller, "b", 4_000), Refusal)
            recorder.record(caller, facts.group, "unknown_model")
            await recorder.flush()
        finally:
            await store.close()

    client = redis_server.client()
    asyncio.run(scenario(False, "off"))
    assert BudgetAdmin(client, [-1] * 6).status("off").windows[2].spent_nano == 3_000
    asyncio.run(scenario(True, "on"))
    _, by_key = AnalyticsReader(client).usage(0, 4_000_000_000_000, "key")
    assert set(by_key) == {"on"}  # nothing of "off" in any bucket
    assert by_key["on"].spend_nano == 3_000
    assert by_key["on"].refusals_by_reason == {"budget_exceeded": 1, "unknown_model": 1}
