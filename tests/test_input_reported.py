"""A stream whose provider reports the input first (Anthropic `message_start`): the output
allowance is recomputed from the real input, so Claude's input bound (cl100k x 2.05) does
not cut the stream early; never when server-side work can still add input."""

from __future__ import annotations

from tokenfuse.extproc.exchange import Exchange
from tokenfuse.extproc.response import _input_reported
from tokenfuse.policy import reservation
from tokenfuse.pricing import PriceTable, TokenUsage, cost_nano
from tokenfuse.providers import Call

PRICE = PriceTable.load().lookup("claude-haiku-4-5")


def exchange(**call: object) -> Exchange:
    assert PRICE is not None
    ex = Exchange(call=Call(endpoint="messages", model="claude-haiku-4-5", stream=True,
                            max_output_tokens=1000, **call),  # type: ignore[arg-type]
                  price=PRICE, reserved_nano=10_000_000, input_nano=8_600_000)
    ex.output_allowance = reservation.allowance(ex.reserved_nano, ex.input_nano, PRICE)
    ex.usage = TokenUsage(input=3_000, cache_read=1_000, output=1)  # message_start
    return ex


def test_the_reported_input_replaces_the_bound() -> None:
    ex = exchange()
    before = ex.output_allowance
    _input_reported(ex)
    assert PRICE is not None
    assert ex.input_nano == cost_nano(PRICE, TokenUsage(input=3_000, cache_read=1_000))
    assert ex.input_nano < 8_600_000
    assert ex.output_allowance == reservation.allowance(10_000_000, ex.input_nano, PRICE)
    assert ex.output_allowance > before
    ex.usage = TokenUsage(input=9_000, output=1)  # a later report never raises it again
    _input_reported(ex)
    assert ex.input_nano == cost_nano(PRICE, TokenUsage(input=3_000, cache_read=1_000))


def test_server_side_work_keeps_the_bound() -> None:
    for ex in (exchange(server_context=True), exchange(server_tool_uses=5)):
        _input_reported(ex)
        assert ex.input_nano == 8_600_000


def test_a_final_usage_is_not_a_start_report() -> None:
    ex = exchange()
    ex.usage = TokenUsage(input=3_000, output=400)
    _input_reported(ex)
    assert ex.input_nano == 8_600_000
