"""Metering of a streamed response: which bytes make up each event, how many
output tokens it carries, and what usage it reports. No I/O: the processor decides.

Bytes are held until the event they belong to is complete, so every forwarding decision
is made per whole event (a partial event is useless to a client anyway).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from decimal import Decimal

from tokenfuse.metering.tokens import count_text
from tokenfuse.policy.loopguard import answer_digest
from tokenfuse.pricing import TokenUsage
from tokenfuse.providers import PROVIDERS
from tokenfuse.providers.base import DEFAULT_TOKENIZER, Provider, Tokenizer
from tokenfuse.providers.sse import SseEvent

log = logging.getLogger("tokenfuse.streaming")


@dataclass(frozen=True)
class MeteredEvent:
    start: int  # absolute offset of the event's first byte (after the previous event)
    end: int  # absolute offset just past its terminating blank line
    output_tokens: int
    usage: TokenUsage | None
    hidden: bool  # not for the client (the usage chunk tokenfuse asked for)
    final: bool = False  # the provider's last event ([DONE], message_stop, ...)
    #: (model, finish reasons) the event names (`Provider.response_facts`), when asked
    facts: tuple[str, tuple[str, ...]] | None = None


class StreamMeter:
    """`tokenizer`: how the model's tokens are counted (`Provider.tokenizer`). A scaled
    tokenizer scales the running total, not each delta, so rounding up does not add a
    token per delta. `hash_answer`: keep the fingerprint of the generated text (only the
    near-duplicate loop tier reads it). `facts`: read each event's model and finish
    reasons (for traces)."""

    def __init__(self, provider: str | Provider, hide_usage_chunk: bool,
                 tokenizer: Tokenizer = DEFAULT_TOKENIZER, hash_answer: bool = True,
                 facts: bool = False) -> None:
        # a name, or the wire format of the request's path (`Provider.for_path`)
        self._provider = PROVIDERS[provider] if isinstance(provider, str) else provider
        self._usage_marker = self._provider.usage_marker
        self._tokenizer = tokenizer
        self._raw_tokens = 0  # output tokens of the encoding so far
        self._scaled_tokens = 0  # ... scaled: what the events reported so far
        self._hide_usage_chunk = hide_usage_chunk
        self._parser = self._provider.stream_decoder()  # the provider's framing
        self._pending = bytearray()
        self._pending_start = 0  # absolute offset of self._pending[0]
        self._last_end = 0
        self.malformed_events = 0
        # the generated text so far (the loop guard's), when it is wanted
        self._answer = answer_digest() if hash_answer else None
        self._answered = False
        self._facts = facts

    @property
    def answer_fingerprint(self) -> str:
        """Fingerprint of the text generated so far ("" before any)."""
        return self._answer.hexdigest() if self._answer is not None and self._answered else ""

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> list[MeteredEvent]:
        """Take one chunk; return the events it completed, in order."""
        self._pending += chunk
        events = self._parser.feed(chunk)
        if end_of_stream:
            events += self._parser.finish()
        return [self._meter(e) for e in events]

    def take(self, upto: int) -> bytes:
        """Release the held bytes up to absolute offset `upto` (for forwarding)."""
        count = max(0, upto - self._pending_start)
        out = bytes(self._pending[:count])
        del self._pending[:count]
        self._pending_start += count
        return out

    def drop(self, upto: int) -> None:
        """Discard the held bytes up to absolute offset `upto`."""
        self.take(upto)

    @property
    def complete_end(self) -> int:
        """Absolute offset just past the last complete event seen so far."""
        return self._last_end

    def rest(self) -> bytes:
        """Everything still held (at the end of the stream: comments, a partial event)."""
        return self.take(self._pending_start + len(self._pending))

    def _meter(self, event: SseEvent) -> MeteredEvent:
        start, self._last_end = self._last_end, event.end
        data = event.data
        final = self._provider.is_final_event(event.event, data)
        if not data.startswith("{"):
            return MeteredEvent(start, event.end, 0, None, False, final)
        try:
            payload = json.loads(data, parse_float=Decimal)
        except ValueError:
            # Garbage from upstream: forwarded untouched (the client decides), counted as
            # one token so accounting stays conservative, and logged.
            self.malformed_events += 1
            log.warning("unparseable SSE event from upstream (%d bytes)", len(data))
            return MeteredEvent(start, event.end, self._scaled(1), None, False)
        if not isinstance(payload, dict):
            return MeteredEvent(start, event.end, 0, None, False)
        encoding = self._tokenizer.encoding
        texts = [t for t in self._provider.stream_output(event.event, payload) if t]
        if self._answer is not None:
            for text in texts:
                self._answer.update(text.encode())
                self._answered = True
        tokens = self._scaled(sum(max(1, count_text(t, encoding)) for t in texts))
        usage = self._provider.usage(payload) if self._usage_marker in data else None
        hidden = self._hide_usage_chunk and self._provider.is_usage_only_chunk(payload)
        facts = self._provider.response_facts(payload) if self._facts else None
        return MeteredEvent(start, event.end, tokens, usage, hidden, final, facts)

    def _scaled(self, raw: int) -> int:
        """The scaled count of `raw` more tokens: the growth of the scaled running total."""
        if not raw:
            return 0
        self._raw_tokens += raw
        total = self._tokenizer.scale(self._raw_tokens)
        tokens, self._scaled_tokens = total - self._scaled_tokens, total
        return tokens
