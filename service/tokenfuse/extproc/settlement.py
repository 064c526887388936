"""Settlement: replace a call's reservation by what it cost, once, and credit the pool key
that served it. Provider usage when the call finished (always: it is the bill; tokenfuse's
own counts only decide mid-stream); what was counted (plus the grace) for a stream that
did not; the whole reservation when nothing is known; zero for a provider error."""

from __future__ import annotations

import asyncio
import time

from tokenfuse import metrics
from tokenfuse.extproc.exchange import Exchange
from tokenfuse.extproc.runtime import Runtime, log
from tokenfuse.identity import PREFIX_CHARS
from tokenfuse.policy import reservation
from tokenfuse.pricing import TokenUsage, cost_nano
from tokenfuse.state.analytics import CallFacts
from tokenfuse.state.connection import REDIS_FAILURES


def may_be_success(status: int) -> bool:
    """2xx, or unknown (0): a call is billed as failed only on a known error status."""
    return status == 0 or 200 <= status < 300


class Settlement:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def settle_from(self, ex: Exchange) -> None:
        """End of a response: settle to the provider's usage; a failed call bills nothing."""
        if not ex.open_reservation:
            return
        if not may_be_success(ex.status):
            await self._settle(ex, 0, "failed")
        elif ex.usage is not None and ex.price is not None and (
                ex.meter is None or ex.final_seen):
            # The provider's usage of a call that completed is its bill, whatever tokenfuse
            # counted (its tokenizer may differ: docs/design.md, "Tokenizers").
            await self._settle_usage(ex, ex.usage)
        else:
            log.warning("no usage in response%s (rid=%s)",
                        "" if ex.meter is None else " before the stream's last event",
                        ex.request_id)
            await self.settle_unfinished(ex)

    async def settle_unfinished(self, ex: Exchange) -> None:
        """No final usage: a stream is charged what was counted (plus the grace for tokens
        generated after the last one seen), anything else its whole reservation."""
        if not ex.open_reservation:
            return
        if ex.meter is None or ex.price is None or ex.hidden_output:
            # Nothing counted, or output the stream never showed: the whole reservation.
            await self._settle(ex, ex.reserved_nano, "reservation")
            return
        actual = reservation.unfinished_cost(
            ex.counted_output, ex.output_cap, ex.usage, ex.input_nano, ex.reserved_nano,
            ex.price, self._rt.settings.streams.grace_tokens)
        await self._settle(ex, actual, "counted")

    async def _settle_usage(self, ex: Exchange, usage: TokenUsage) -> None:
        assert ex.price is not None
        actual = cost_nano(ex.price, usage)
        # A completed answer: the near-duplicate loop tier records what it said.
        answer = ex.meter.answer_fingerprint if ex.meter is not None else ex.answer
        if await self._settle(ex, actual, "usage", answer):
            model = ex.price.model
            metrics.SPEND_NANO.labels(ex.provider_name, model).inc(actual)
            for kind in ("input", "output", "cache_read", "cache_write"):
                count = getattr(usage, kind)
                if count:
                    metrics.TOKENS.labels(ex.provider_name, model, kind).inc(count)

    async def _settle(self, ex: Exchange, actual_nano: int, basis: str,
                      answer: str = "") -> bool:
        rt = self._rt
        ex.open_reservation = False
        traced = time.time_ns() if ex.trace is not None else 0
        if ex.pool_key and 200 <= ex.status < 300:
            await self._credit_pool_key(ex, actual_nano)
        try:
            async with asyncio.timeout(rt.redis_timeout * 4):
                await rt.store.settle(ex.caller, ex.request_id, actual_nano,
                                      ex.near_fingerprint, answer, facts_of(ex, basis))
        except REDIS_FAILURES as exc:
            # The reservation stays counted against the budget: the wallet is protected.
            metrics.REDIS_ERRORS.labels("settle").inc()
            log.warning("settlement failed (rid=%s): %s", ex.request_id, type(exc).__name__)
            if ex.trace is not None:
                ex.trace.settled(traced, basis, actual_nano, False)
            return False
        if ex.trace is not None:
            ex.trace.settled(traced, basis, actual_nano, True)
        metrics.SETTLEMENTS.labels(basis).inc()
        log.debug("settled rid=%s basis=%s nano=%d of %d reserved", ex.request_id, basis,
                  actual_nano, ex.reserved_nano)
        return True

    async def _credit_pool_key(self, ex: Exchange, spend: int) -> None:
        """Tokens and spend of a successful pooled call, to the key that served it."""
        rt = self._rt
        assert rt.pools is not None
        usage = ex.usage
        tokens = (usage.input + usage.output + usage.cache_read + usage.cache_write
                  if usage else ex.counted_output)
        label = ex.pool_key[:PREFIX_CHARS]
        metrics.POOL_TOKENS.labels(ex.pool, label).inc(tokens)
        metrics.POOL_SPEND.labels(ex.pool, label).inc(spend)
        metrics.POOL_REQUESTS.labels(ex.pool, label, str(ex.status)).inc()
        try:
            async with asyncio.timeout(rt.redis_timeout * 4):
                before, state = await rt.pools.report_change(ex.pool, ex.pool_key, ex.status,
                                                             -1, tokens, spend)
        except REDIS_FAILURES:
            metrics.REDIS_ERRORS.labels("pool_report").inc()
            return
        metrics.set_pool_key_state(ex.pool, label, state)
        if before != state and rt.events is not None:  # about the pool key, not the caller
            rt.events.record("pool_key.state", "", {"pool_key": label, "state": state,
                                                    "before": before, "status": ex.status},
                             ex.provider_name, "", ex.pool)


def facts_of(ex: Exchange, basis: str) -> CallFacts:
    """What the analytics record of a settled call: its status, latency, time to first
    byte and tokens (the provider's usage; for a call settled without it, what was
    counted)."""
    now = time.monotonic_ns()
    latency = (now - ex.started_ns) // 1_000_000 if ex.started_ns else -1
    ttft = (ex.first_byte_ns - ex.started_ns) // 1_000_000 \
        if ex.first_byte_ns and ex.started_ns else -1
    usage = ex.usage or TokenUsage()
    output = usage.output if basis == "usage" else max(usage.output, ex.counted_output)
    return CallFacts(ex.group(), ex.status, latency, ttft,
                     (usage.input, output, usage.cache_read,
                      usage.cache_write + usage.cache_write_1h, usage.reasoning), ex.cut)
