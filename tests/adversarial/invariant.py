"""The spending bound, checked after every adversarial scenario.

(1) What the provider billed for a key, in all (completed calls and whatever aborted
    streams generated), is within the key's limit.
(2) What tokenfuse recorded for the key (spent + reserved of the window the limit is on)
    is at least what the provider billed for the key's completed calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tests.support.billing import billed_for, billed_total_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack


@dataclass(frozen=True)
class Bound:
    billed_nano: int  # everything the provider billed for the key
    billed_completed_nano: int
    spent_nano: int
    reserved_nano: int


def budget_status(stack: Stack, api_key: str) -> dict:
    """`tokenfuse budget status --key … --json`."""
    result = stack.cli("budget", "status", "--key", api_key, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_bound_held(stack: Stack, fake: FakeProvider, api_key: str, limit_nano: int,
                      window: str = "day", timeout: float = 30.0) -> Bound:
    """Both halves of the bound for one key, once the provider has finished its calls."""
    assert fake.wait_idle(api_key, timeout), f"the provider is still answering {api_key}"
    doc = budget_status(stack, api_key)["windows"][window]
    assert doc["limit_nano_usd"] == limit_nano, (doc, limit_nano)
    bound = Bound(billed_total_for(fake, api_key), billed_for(fake, api_key),
                  doc["spent_nano_usd"], doc["reserved_nano_usd"])
    assert bound.billed_nano <= limit_nano, (
        f"the provider billed {bound.billed_nano} nano-USD for the key, over its limit "
        f"of {limit_nano}: {bound}")
    assert bound.spent_nano + bound.reserved_nano >= bound.billed_completed_nano, (
        f"tokenfuse recorded {bound.spent_nano} spent + {bound.reserved_nano} reserved, "
        f"less than the {bound.billed_completed_nano} the provider billed: {bound}")
    return bound
