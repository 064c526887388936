"""Reservation arithmetic, pure: what a call may cost, what to reserve, when a stream
needs more, and what an unfinished call is charged. No I/O, no processor state.

The reservation is an upper bound of what the provider can bill (docs/design.md, "The
sound pre-call bound"):
- input: every string of the body (keys too) counted, long strings by their byte length,
  media by the provider's largest charge, at the highest input rate; never more than the
  model's context window, and the whole window when the request refers to content whose
  size it does not show (server-side context, files, PDFs); server tools: their fee per
  use and a window per use;
- output: a call whose output may be invisible in a stream (not streamed, or a reasoning
  model, or thinking) reserves its whole cap (the request's, else the model's maximum)
  and, when the budget covers less, is clamped: its cap is rewritten to what the grant
  covers, so the provider enforces the bound (`clamp`). A stream of visible output starts
  with an allowance and extends in steps before it forwards tokens the reservation does
  not cover (`extension`), keeping the grace for what the provider generates after a cut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tokenfuse.config import EstimateSettings, Settings, StreamSettings
from tokenfuse.metering.tokens import bound_input
from tokenfuse.pricing import TOKENS_PER_PRICE_UNIT, ModelPrice, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import PROVIDERS, Call, Provider

UNLIMITED_TOKENS = 1 << 62  # the allowance of a model whose output is free
#: The context window assumed for a model whose window is not known.
FALLBACK_CONTEXT_WINDOW = 2_000_000
#: The window of a model whose price has a tier above its listed window: Claude's
#: 1M-token context beta (platform.claude.com/docs, "Context windows": 1,000,000 tokens).
LONG_CONTEXT_WINDOW = 1_000_000
#: A clamp never leaves a call fewer output tokens than this per choice (else 402).
MIN_CLAMPED_OUTPUT_TOKENS = 16


def price_for(prices: PriceTable, model: str, settings: EstimateSettings,
              provider: Provider | None = None) -> ModelPrice | None:
    """The model's price (at `provider`'s own ids, when it has a namespace); an unknown
    model gets the configured prices under TOKENFUSE_UNKNOWN_MODEL=price, else None
    (refused)."""
    ids = provider.price_ids(model) if provider else ((None, model),)
    price = next((p for namespace, name in ids
                  if (p := prices.lookup(name, namespace)) is not None), None)
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


def input_tokens(call: Call, price: ModelPrice, margin_percent: int,
                 provider: Provider) -> int:
    """Upper bound of the input tokens the provider can bill for the call."""
    model = call.model
    bound = bound_input(call.prompt_parts, call.messages, margin_percent,
                        lambda block: provider.media_bound(block, model), call.framing_tokens,
                        provider.tokenizer(model))
    window = price.context_window or FALLBACK_CONTEXT_WINDOW
    if any(tier.above_tokens >= window for tier in price.tiers):
        # A price tier above the window says the model takes more than it in some mode
        # (Claude's 1M-context beta, asked in a header or a body field): the window is
        # not the model's limit.
        window = max(window, LONG_CONTEXT_WINDOW)
    if call.server_tool_uses:
        # Each server-tool use samples again over a context of at most one window.
        return window * (call.server_tool_uses + 1)
    if bound.unbounded or call.server_context:
        return window * call.inputs
    # A longer request is refused, not billed; the window holds each input of a list
    # (embeddings) on its own.
    return min(bound.tokens, window * call.inputs)


def bound_price(call: Call, price: ModelPrice, margin_percent: int,
                provider: Provider) -> tuple[int, ModelPrice]:
    """(the input bound, the flat price of the tier that bound selects). A long-context
    tier prices the whole call higher, so a bound above its threshold is priced there
    (never under the bill: the provider's tier is chosen by the actual input, at most
    the bound)."""
    tokens = input_tokens(call, price, margin_percent, provider)
    return tokens, price.at_input(tokens)


def input_cost(call: Call, price: ModelPrice, margin_percent: int, provider: Provider) -> int:
    """Input tokens at the highest input rate of the tier (it may be billed as cache
    writes; at the 1-hour rate when the request asks for that lifetime), plus the fees of
    the server-tool uses the request allows."""
    tokens, flat = bound_price(call, price, margin_percent, provider)
    return _input_nano(call, tokens, flat)


def _input_nano(call: Call, tokens: int, flat: ModelPrice) -> int:
    rate = max(flat.input, flat.cache_write, flat.cache_read,
               flat.write_1h if call.long_cache_writes else 0)
    fee = max(call.server_tool_fee_nano, flat.web_search)
    return (-(-tokens * rate // TOKENS_PER_PRICE_UNIT) + call.server_tool_uses * fee
            + call.request_fee_nano)


def output_cap(call: Call, price: ModelPrice, default_output_tokens: int) -> int:
    """Output tokens per choice the call may generate: its own cap, else the model's
    maximum (the default only for a model whose maximum is not known)."""
    if call.max_output_tokens is not None:
        return call.max_output_tokens
    return price.max_output_tokens or default_output_tokens


def estimate(call: Call, price: ModelPrice, settings: EstimateSettings,
             provider: Provider) -> int:
    """Upper bound of a call's cost with its whole output cap."""
    tokens, flat = bound_price(call, price, settings.input_margin_percent, provider)
    output = output_cap(call, flat, settings.default_output_tokens) * call.choices
    return _input_nano(call, tokens, flat) + cost_nano(flat, TokenUsage(output=output))


@dataclass(frozen=True)
class Plan:
    """What to reserve for one call (nano-USD) and what its output is bounded by."""

    input_nano: int  # the input bound inside the reservation
    desired_nano: int
    minimum_nano: int
    output_cap: int | None  # the call's total output limit (cap x choices)
    whole: bool = True  # the whole output is reserved up front (clamped to the grant)
    #: The flat price (long-context tier) the bound used: extensions and allowances of
    #: this call use it too; settlement prices the provider's usage at its own tier.
    price: ModelPrice | None = None


def plan(call: Call, price: ModelPrice, settings: EstimateSettings,
         streams: StreamSettings, provider: Provider) -> Plan:
    """Calls whose output may not be seen reserve it whole (at least a minimum, then
    clamped to what was granted); visible streams start with an allowance (or what fits,
    down to the grace) and extend."""
    tokens, flat = bound_price(call, price, settings.input_margin_percent, provider)
    input_nano = _input_nano(call, tokens, flat)
    per_choice = output_cap(call, flat, settings.default_output_tokens)
    cap = per_choice * call.choices
    if not call.stream or call.hidden_output:
        least = min(per_choice, MIN_CLAMPED_OUTPUT_TOKENS) * call.choices
        return Plan(input_nano, input_nano + cost_nano(flat, TokenUsage(output=cap)),
                    input_nano + cost_nano(flat, TokenUsage(output=least)), cap, price=flat)
    initial, minimum = min(streams.initial_tokens, cap), min(streams.grace_tokens + 1, cap)
    return Plan(input_nano, input_nano + cost_nano(flat, TokenUsage(output=initial)),
                input_nano + cost_nano(flat, TokenUsage(output=minimum)), cap, whole=False,
                price=flat)


def clamp(plan: Plan, call: Call, granted_nano: int, price: ModelPrice) -> int | None:
    """The output cap per choice to write into the request so the provider cannot bill
    beyond the grant, or None when the request's own cap is already within it."""
    if not plan.whole:
        return None
    covered = allowance(granted_nano, plan.input_nano, plan.price or price) // call.choices
    per_choice = (plan.output_cap or 0) // call.choices
    if call.max_output_tokens is not None and covered >= per_choice:
        return None
    return min(covered, per_choice)


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
    if known is not None and known.billed_nano is not None:
        # The provider's own running bill (Perplexity, xAI, OpenRouter) covers the tokens
        # it had reported; what it generated after them is priced on top.
        more = max(0, output - known.output)
        actual = known.billed_nano + cost_nano(price, TokenUsage(output=more))
    elif known is not None and known.total_input:
        actual = cost_nano(price, replace(known, output=max(known.output, output)))
    else:
        actual = input_nano + cost_nano(price, TokenUsage(output=output))
    return min(actual, reserved_nano)


def upper_bound_nano(provider_name: str, path: str, body: dict[str, Any],
                     prices: PriceTable, settings: Settings) -> int | None:
    """What tokenfuse reserves for this request with an unlimited budget, or None when
    it refuses the request (unknown model, unpriced endpoint)."""
    provider = PROVIDERS[provider_name].for_path(path)
    call = provider.parse_request(path, body)
    price = price_for(prices, call.model, settings.estimate, provider)
    if price is None or not call.priced:
        return None
    call.hidden_output = call.hidden_output or (price.reasoning and provider.reasoning_by_model)
    return estimate(call, price, settings.estimate, provider)
