"""TOKENFUSE_EVENT_LOOP: uvloop by default, the standard asyncio loop on request."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import openai_client
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack


def test_default_stack_runs_uvloop(stack: Stack) -> None:
    assert "uvloop event loop" in stack.processor.log_text()


def test_asyncio_loop_serves_the_same(fake: FakeProvider) -> None:
    s = Stack(fake.base_url, {"TOKENFUSE_EVENT_LOOP": "asyncio"}).start()
    try:
        assert "asyncio event loop" in s.processor.log_text()
        reply = openai_client(s, "sk-asyncio-loop").chat.completions.create(
            model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert reply.usage is not None and reply.usage.completion_tokens == 3
    finally:
        s.cleanup()


def test_unknown_event_loop_is_a_configuration_error(tmp_path) -> None:
    env = {**os.environ, "TOKENFUSE_EVENT_LOOP": "twisted", "TOKENFUSE_SECRET": "s" * 32,
           "TOKENFUSE_STATE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "tokenfuse.server"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "TOKENFUSE_EVENT_LOOP must be one of uvloop, asyncio" in done.stderr
