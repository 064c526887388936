"""Runs last in its session (file order; with pytest-xdist, last on its worker): after
everything the session sent, no API key is anywhere. The session's `stack` fixture runs
the same check when it is torn down, so every worker's stack is checked."""

from __future__ import annotations

from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack
from tests.support.leaks import assert_no_key_leaked, keys_sent


def test_caller_keys_appear_nowhere(stack: Stack, fake: FakeProvider) -> None:
    keys = keys_sent(fake)
    assert len(keys) > 5, "the session should have used many keys"
    assert_no_key_leaked(stack, keys)
