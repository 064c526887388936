"""Reservation arithmetic, pure: what a call may cost, what to reserve, when a stream
needs more, and what an unfinished call is charged. No I/O, no processor state.

A non-streamed call reserves its whole estimate: input (counted, with a margin, at the
highest input rate) plus the output cap (the request's own, or the default capped at the
model's maximum) times the choices. A stream reserves the input plus an initial output
allowance, at least the grace, and extends in steps before it forwards tokens the
reservation does not cover (`extension`), keeping the grace for what the provider
generates after a cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenfuse.config import EstimateSettings, StreamSettings
from tokenfuse.metering.tokens import estimate_input_tokens
from tokenfuse.pricing import TOKENS_PER_PRICE_UNIT, ModelPrice, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import Call

UNLIMITED_TOKENS = 1 << 62  # the allowance of a model whose output is free


def price_for(prices: PriceTable, model: str, settings: EstimateSettings) -> ModelPrice | None:
    """The model's price; an unknown model gets the configured prices under
    TOKENFUSE_UNKNOWN_MODEL=price, else None (refused)."""
    price = prices.lookup(model)
    if price is None and settings.unknown_model_policy == "price":
        price = ModelPrice(
            model=model,
            input=settings.unknown_input_nano_per_mtok,
            output=settings.unknown_output_nano_per_mtok,
            cache_read=settings.unknown_input_nano_per_mtok,
            cache_write=settings.unknown_input_nano_per_mtok,
            max_output_tokens=0,
        )
    return price


def input_cost(call: Call, price: ModelPrice, margin_percent: int) -> int:
    tokens = estimate_input_tokens(call.prompt_parts, call.messages, margin_percent)
    # Input may be billed at the cache-write rate, which can exceed the input rate.
    rate_usage = (TokenUsage(cache_write=tokens) if price.cache_write > price.input
                  else TokenUsage(input=tokens))
    return cost_nano(price, rate_usage)


def output_cap(call: Call, price: ModelPrice, default_output_tokens: int) -> int:
    """Output tokens per choice the call may generate."""
    if call.max_output_tokens is not None:
        return call.max_output_tokens
    cap = default_output_tokens
    return min(cap, price.max_output_tokens) if price.max_output_tokens else cap


def estimate(call: Call, price: ModelPrice, settings: EstimateSettings) -> int:
    """Upper bound of a non-streamed call's cost: input plus the whole output cap."""
    output = output_cap(call, price, settings.default_output_tokens) * call.choices
    return (input_cost(call, price, settings.input_margin_percent)
            + cost_nano(price, TokenUsage(output=output)))


@dataclass(frozen=True)
class Plan:
    """What to reserve for one call (nano-USD) and what its output is bounded by."""

    input_nano: int  # the input estimate inside the reservation
    desired_nano: int
    minimum_nano: int
    output_cap: int | None  # a stream's total output limit (cap x choices), None = none


def plan(call: Call, price: ModelPrice, settings: EstimateSettings,
         streams: StreamSettings) -> Plan:
    """Non-streamed calls need their whole estimate; streams start with an allowance (or
    what fits, down to the grace) and extend."""
    input_nano = input_cost(call, price, settings.input_margin_percent)
    if not call.stream:
        whole = estimate(call, price, settings)
        return Plan(input_nano, whole, whole, None)
    cap = (call.max_output_tokens * call.choices
           if call.max_output_tokens is not None else None)
    initial, minimum = streams.initial_tokens, streams.grace_tokens + 1
    if cap is not None:
        initial, minimum = min(initial, cap), min(minimum, cap)
    return Plan(input_nano, input_nano + cost_nano(price, TokenUsage(output=initial)),
                input_nano + cost_nano(price, TokenUsage(output=minimum)), cap)


def allowance(reserved_nano: int, input_nano: int, price: ModelPrice) -> int:
    """Output tokens the reservation covers beyond the input estimate."""
    if price.output == 0:
        return UNLIMITED_TOKENS
    return (reserved_nano - input_nano) * TOKENS_PER_PRICE_UNIT // price.output


def covered(counted: int, tokens: int, allowance_tokens: int, cap: int | None,
            grace: int) -> bool:
    """Does the reservation cover `tokens` more output plus the grace (or the whole cap)?"""
    if cap is not None and allowance_tokens >= cap:
        return True  # the provider cannot generate beyond the cap already held
    return counted + tokens + grace <= allowance_tokens


@dataclass(frozen=True)
class Extension:
    desired_nano: int  # grow the reservation by this much if the budget allows
    minimum_nano: int  # at least this much, or the stream ends


def extension(counted: int, tokens: int, cap: int | None, reserved_nano: int,
              input_nano: int, price: ModelPrice, streams: StreamSettings) -> Extension | None:
    """How much more to reserve before forwarding `tokens`: one step ahead, at least
    enough for them and the grace (never beyond the cap). None when nothing is needed."""
    needed = counted + tokens + streams.grace_tokens
    target = needed + streams.step_tokens
    if cap is not None:
        target, needed = min(target, cap), min(needed, cap)
    desired = input_nano + cost_nano(price, TokenUsage(output=target)) - reserved_nano
    minimum = input_nano + cost_nano(price, TokenUsage(output=needed)) - reserved_nano
    if minimum <= 0:
        return None
    return Extension(max(desired, minimum), minimum)


def unfinished_cost(counted: int, cap: int | None, known: TokenUsage | None,
                    input_nano: int, reserved_nano: int, price: ModelPrice,
                    grace: int) -> int:
    """A stream that ended without final usage: what was counted plus the grace for
    tokens generated after the last one seen, with any input the provider reported;
    never more than the reservation."""
    output = counted + grace
    if cap is not None:
        output = min(output, cap)
    if known is not None and (known.input or known.cache_read or known.cache_write):
        actual = cost_nano(price, TokenUsage(known.input, max(known.output, output),
                                             known.cache_read, known.cache_write))
    else:
        actual = input_nano + cost_nano(price, TokenUsage(output=output))
    return min(actual, reserved_nano)
