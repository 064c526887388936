"""Runs last (file order): after everything the session sent, no API key is anywhere."""

from __future__ import annotations

from tests.support.billing import key_of
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack


def test_caller_keys_appear_nowhere(stack: Stack, fake: FakeProvider) -> None:
    keys = {key_of(r.headers) for r in list(fake.records)} - {""}
    keys |= {"sk-raw"}
    assert len(keys) > 5, "the session should have used many keys"
    haystacks = {
        "redis": stack.redis.dump_text(),
        "logs": stack.logs(),
        "metrics": stack.processor.metrics(),
    }
    assert len(haystacks["redis"]) > 0 and len(haystacks["logs"]) > 0
    for key in keys:
        for where, text in haystacks.items():
            assert key not in text, f"an API key leaked into {where}"
            assert key.removeprefix("sk-") not in text, f"an API key leaked into {where}"
