"""The secrets check: after a session's traffic, no caller key is in Redis, logs or metrics."""

from __future__ import annotations

from tests.support.billing import key_of
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack


def keys_sent(fake: FakeProvider) -> set[str]:
    """Every caller key the fake provider was sent (and one the suite sends raw)."""
    return ({key_of(r.headers) for r in list(fake.records)} - {""}) | {"sk-raw"}


def assert_no_key_leaked(stack: Stack, keys: set[str], *, after_traffic: bool = True) -> None:
    """`after_traffic`: the session sent requests, so Redis and the logs must hold
    something (else the check would pass on nothing)."""
    haystacks = {
        "redis": stack.redis.dump_text(),
        "logs": stack.logs(),
        "metrics": stack.processor.metrics(),
    }
    if after_traffic:
        assert len(haystacks["redis"]) > 0 and len(haystacks["logs"]) > 0
    for key in keys:
        for where, text in haystacks.items():
            assert key not in text, f"an API key leaked into {where}"
            assert key.removeprefix("sk-") not in text, f"an API key leaked into {where}"
