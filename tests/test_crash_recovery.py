"""Processor killed mid-stream: the orphaned reservation is charged as spent once the
reaper finds it expired, and nothing is charged twice when the processor comes back."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import openai_client
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tokenfuse.identity import key_id
from tokenfuse.state.keys import reservations_key


@pytest.fixture(scope="module")
def reaping_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_RESERVATION_TTL_SECONDS": "2",
                              "TOKENFUSE_REAPER_INTERVAL_MS": "200"}).start()
    yield s
    s.cleanup()


def total(stack: Stack, key: str) -> dict:
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return doc["windows"]["total"]


def test_killed_mid_stream_is_charged_the_reservation_once(reaping_stack: Stack,
                                                           api_key: str) -> None:
    stack = reaping_stack
    caller = key_id(stack.secret.encode(), api_key)
    redis_client = stack.redis.client()
    started, outcome = threading.Event(), {}

    def consume() -> None:
        try:
            for chunk in openai_client(stack, api_key).chat.completions.create(
                    model="gpt-4o-mini", stream=True, max_tokens=5000,
                    extra_headers={"x-fake-chunk-delay-ms": "20"},
                    messages=[{"role": "user", "content": "long"}]):
                if chunk.choices:
                    started.set()
            outcome["result"] = "completed"
        except (openai.APIError, Exception) as exc:  # the stream breaks when we kill
            outcome["result"] = type(exc).__name__

    worker = threading.Thread(target=consume)
    worker.start()
    assert started.wait(20)
    stack.processor.kill()
    worker.join(30)
    assert outcome["result"] != "completed"
    records = redis_client.hgetall(reservations_key(caller))
    assert len(records) == 1  # the reservation outlived the processor
    reserved = int(next(iter(records.values())).decode().split("|")[0])
    assert total(stack, api_key)["reserved_nano_usd"] == reserved

    stack.processor.start()
    wait_until(lambda: total(stack, api_key)["reserved_nano_usd"] == 0,
               what="the reaper to charge the orphan")
    assert total(stack, api_key)["spent_nano_usd"] == reserved
    assert "tokenfuse_reservations_reaped_total 1.0" in stack.processor.metrics()
    # Later passes change nothing: the orphan is charged exactly once.
    runs = reaper_runs(stack)
    wait_until(lambda: reaper_runs(stack) >= runs + 3, what="three more reaper passes")
    assert redis_client.hlen(reservations_key(caller)) == 0
    assert total(stack, api_key)["spent_nano_usd"] == reserved
    assert f"tokenfuse_reaped_nano_usd_total {float(reserved)}" in stack.processor.metrics()


def reaper_runs(stack: Stack) -> float:
    match = re.search(r"^tokenfuse_reaper_runs_total (\S+)$", stack.processor.metrics(), re.M)
    return float(match.group(1)) if match else 0.0
