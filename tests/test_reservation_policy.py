"""The reservation arithmetic, pure: plans, allowances, extensions, unfinished costs."""

from __future__ import annotations

from tokenfuse.config import EstimateSettings, StreamSettings
from tokenfuse.policy import reservation
from tokenfuse.pricing import ModelPrice, PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import PROVIDERS, Call

OPENAI = PROVIDERS["openai"]

PRICE = ModelPrice("m", input=1_000_000_000, output=4_000_000_000, cache_read=100_000_000,
                   cache_write=1_250_000_000, max_output_tokens=8000)
ESTIMATE = EstimateSettings(default_output_tokens=4096, input_margin_percent=0)
STREAMS = StreamSettings(initial_tokens=256, step_tokens=256, grace_tokens=32)


def _call(stream: bool, cap: int | None, choices: int = 1) -> Call:
    return Call(endpoint="chat.completions", model="m", stream=stream, max_output_tokens=cap,
                choices=choices, messages=[{"role": "user", "content": "hello there"}])


def test_non_streamed_plan_reserves_the_whole_cap_at_the_highest_input_rate() -> None:
    call = _call(False, 100, choices=2)
    plan = reservation.plan(call, PRICE, ESTIMATE, STREAMS, OPENAI)
    # cache writes (1.25 $/M) cost more than input (1 $/M): the input is priced at them
    assert plan.input_nano == reservation.input_cost(call, PRICE, 0, OPENAI)
    assert plan.input_nano % 1250 == 0
    assert plan.desired_nano == plan.input_nano + 200 * 4000
    # at least a usable answer (16 tokens per choice), else refused; between the two the
    # cap is clamped to the grant
    assert plan.minimum_nano == plan.input_nano + 32 * 4000
    assert plan.output_cap == 200 and plan.whole


def test_clamp_rewrites_the_cap_to_what_the_grant_covers() -> None:
    call = _call(False, 100, choices=2)
    plan = reservation.plan(call, PRICE, ESTIMATE, STREAMS, OPENAI)
    assert reservation.clamp(plan, call, plan.desired_nano, PRICE) is None  # covered
    assert reservation.clamp(plan, call, plan.input_nano + 60 * 4000, PRICE) == 30
    uncapped = _call(False, None)
    whole = reservation.plan(uncapped, PRICE, ESTIMATE, STREAMS, OPENAI)
    # no cap in the request: the model's maximum is reserved and written down
    assert reservation.clamp(whole, uncapped, whole.desired_nano, PRICE) == 8000
    visible = _call(True, 100)
    stream = reservation.plan(visible, PRICE, ESTIMATE, STREAMS, OPENAI)
    assert not stream.whole and reservation.clamp(stream, visible, 1, PRICE) is None
    thinking = _call(True, 100)
    thinking.hidden_output = True
    assert reservation.plan(thinking, PRICE, ESTIMATE, STREAMS, OPENAI).whole


def test_input_bound_covers_every_field_and_falls_back_to_the_window() -> None:
    windowed = ModelPrice("w", 1_000_000_000, 1, 1, 1, 0, context_window=1000)
    call = _call(False, 1)
    call.prompt_parts = [{"tools": [{"parameters": {"properties": {
        "data": {"type": "string", "description": "word " * 300}}}}]}]
    assert reservation.input_tokens(call, windowed, 0, OPENAI) > 300
    call.prompt_parts = [{"x": "word " * 5000}]
    assert reservation.input_tokens(call, windowed, 0, OPENAI) == 1000  # at most a window
    call.prompt_parts = []
    call.server_context = True
    assert reservation.input_tokens(call, windowed, 0, OPENAI) == 1000
    call.server_tool_uses, call.server_tool_fee_nano = 3, 10_000_000
    assert reservation.input_tokens(call, windowed, 0, OPENAI) == 4000
    assert reservation.input_cost(call, windowed, 0, OPENAI) == 4000 * 1000 + 3 * 10_000_000


def test_server_tools_are_bounded_and_capped() -> None:
    anthropic = PROVIDERS["anthropic"]
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    call = anthropic.parse_request("/v1/messages", body)
    assert (call.server_tool_uses, call.server_tool_fee_nano) == (5, 10_000_000)
    assert call.new_body is not None and call.new_body["tools"][0]["max_uses"] == 5
    responses = {"model": "gpt-4.1", "input": "hi", "tools": [{"type": "web_search"}],
                 "max_tool_calls": 2}
    call = OPENAI.parse_request("/v1/responses", responses)
    assert (call.server_tool_uses, call.server_tool_fee_nano) == (2, 25_000_000)
    assert call.server_context and call.new_body is None
    done = {"model": "gpt-4.1", "output": [{"type": "web_search_call"}, {"type": "message"}],
            "usage": {"input_tokens": 10, "output_tokens": 2}}
    usage = OPENAI.usage(done)
    # One search, at the dataset's per-call price for gpt-4.1 ($25 / 1,000).
    assert usage is not None and (usage.web_searches, usage.tool_fees_nano) == (1, 0)
    table = PriceTable.load()
    gpt41 = table.lookup("gpt-4.1")
    assert gpt41 is not None and gpt41.web_search == 25_000_000
    assert cost_nano(gpt41, usage) == cost_nano(gpt41, TokenUsage(10, 2)) + 25_000_000
    searched = anthropic.usage({"usage": {"input_tokens": 5, "output_tokens": 1,
                                          "server_tool_use": {"web_search_requests": 3}}})
    assert searched is not None and searched.web_searches == 3
    # claude-haiku-4-5 has no per-call price in the dataset: the documented $10 / 1,000.
    haiku = table.lookup("claude-haiku-4-5")
    assert haiku is not None and haiku.web_search == 0
    assert cost_nano(haiku, searched) == cost_nano(haiku, TokenUsage(5, 1)) + 30_000_000


def test_default_output_is_capped_at_the_model_maximum() -> None:
    small = ModelPrice("s", 1, 1, 1, 1, max_output_tokens=1000)
    assert reservation.output_cap(_call(False, None), small, 4096) == 1000
    assert reservation.output_cap(_call(False, None), PRICE, 4096) == 8000
    unknown = ModelPrice("u", 1, 1, 1, 1, max_output_tokens=0)
    assert reservation.output_cap(_call(False, None), unknown, 4096) == 4096
    assert reservation.output_cap(_call(False, 77), small, 4096) == 77


def test_stream_plan_starts_small_and_never_beyond_the_cap() -> None:
    plan = reservation.plan(_call(True, None), PRICE, ESTIMATE, STREAMS, OPENAI)
    assert plan.desired_nano - plan.input_nano == 256 * 4000
    assert plan.minimum_nano - plan.input_nano == 33 * 4000
    tiny = reservation.plan(_call(True, 10, choices=2), PRICE, ESTIMATE, STREAMS, OPENAI)
    assert tiny.output_cap == 20
    assert tiny.desired_nano - tiny.input_nano == tiny.minimum_nano - tiny.input_nano == 80000


def test_allowance_and_coverage() -> None:
    assert reservation.allowance(1_000 + 256 * 4000, 1_000, PRICE) == 256
    free = ModelPrice("f", 1, 0, 1, 1, 0)
    assert reservation.allowance(5, 5, free) == reservation.UNLIMITED_TOKENS
    assert reservation.covered(200, 24, 256, None, 32)
    assert not reservation.covered(200, 25, 256, None, 32)
    assert reservation.covered(10_000, 500, 300, 300, 32)  # the cap is held: nothing more


def test_extension_goes_one_step_ahead_and_stops_at_the_cap() -> None:
    reserved = 1_000 + 256 * 4000
    step = reservation.extension(230, 10, None, reserved, 1_000, PRICE, STREAMS)
    assert step is not None
    assert step.minimum_nano == (230 + 10 + 32 - 256) * 4000
    assert step.desired_nano == (230 + 10 + 32 + 256 - 256) * 4000
    capped = reservation.extension(230, 10, 260, reserved, 1_000, PRICE, STREAMS)
    assert capped is not None and capped.desired_nano == capped.minimum_nano == 4 * 4000
    assert reservation.extension(0, 1, None, reserved, 1_000, PRICE, STREAMS) is None


def test_unfinished_cost_counts_plus_grace_and_never_exceeds_the_reservation() -> None:
    assert reservation.unfinished_cost(100, None, None, 1_000, 10**9, PRICE, 32) \
        == 1_000 + 132 * 4000
    assert reservation.unfinished_cost(100, 110, None, 1_000, 10**9, PRICE, 32) \
        == 1_000 + 110 * 4000
    known = TokenUsage(input=50, output=500, cache_read=10)
    assert reservation.unfinished_cost(100, None, known, 1_000, 10**9, PRICE, 32) \
        == cost_nano(PRICE, TokenUsage(50, 500, 10))
    assert reservation.unfinished_cost(100, None, None, 1_000, 5_000, PRICE, 32) == 5_000
    # A running bill the provider reported (Perplexity, xAI): the tokens generated after
    # it (counted + grace beyond what it covered) are priced on top, never dropped.
    billed = TokenUsage(input=50, output=90, billed_nano=777_777)
    assert reservation.unfinished_cost(100, None, billed, 1_000, 10**9, PRICE, 32) \
        == 777_777 + 42 * 4000
    assert reservation.unfinished_cost(10, None, billed, 1_000, 10**9, PRICE, 32) == 777_777


def test_unknown_model_policy() -> None:
    from tokenfuse.pricing import PriceTable

    prices = PriceTable.load()
    assert reservation.price_for(prices, "no-such-model", ESTIMATE) is None
    priced = EstimateSettings(unknown_model_policy="price", unknown_input_nano_per_mtok=3,
                              unknown_output_nano_per_mtok=9)
    price = reservation.price_for(prices, "no-such-model", priced)
    assert price is not None and (price.input, price.output, price.cache_write) == (3, 9, 3)
