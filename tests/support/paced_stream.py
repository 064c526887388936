"""A long, slow OpenAI stream consumed in a thread: for tests that act on a stream while it
runs (kill switch, budget changes, failovers)."""

from __future__ import annotations

import threading

import openai

from tests.conftest import openai_client
from tests.support.harness import Stack


class PacedStream:
    """Streams 3,000 tokens at 20 ms a chunk (the fake's pacing); `started` is set once 5
    content chunks arrived (or the stream ended), `error` holds what the SDK raised."""

    def __init__(self, stack: Stack, key: str) -> None:
        self.stack, self.key = stack, key
        self.chunks = 0
        self.error: openai.APIError | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            for chunk in openai_client(self.stack, self.key).chat.completions.create(
                    model="gpt-4o-mini", stream=True, max_tokens=3000,
                    extra_headers={"x-fake-chunk-delay-ms": "20"},
                    messages=[{"role": "user", "content": "slow and long"}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    self.chunks += 1
                    if self.chunks == 5:
                        self.started.set()
        except openai.APIError as exc:
            self.error = exc
        self.started.set()
