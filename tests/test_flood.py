"""1,000 concurrent requests against a $0.01 budget: no leak, little over-refusal."""

from __future__ import annotations

import asyncio
import json

from tests.support.billing import billed_for, requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.flood import flood_outcomes
from tests.support.harness import Stack

BUDGET_NANO = 10_000_000  # $0.01
REQUESTS = 1000


async def _flood(base_url: str, key: str) -> tuple[int, int, list[str]]:
    outcomes = await flood_outcomes(base_url, key, REQUESTS)
    allowed = outcomes.count("allowed")
    refused = outcomes.count("status_402")
    others = [o for o in outcomes if o not in ("allowed", "status_402")]
    return allowed, refused, others


def test_flood_never_exceeds_the_budget(stack: Stack, fake: FakeProvider,
                                        api_key: str) -> None:
    assert stack.cli("budget", "set", "--key", api_key, "--daily", "0.01").returncode == 0
    allowed, refused, others = asyncio.run(
        _flood(stack.envoy.base_url + "/openai/v1", api_key))
    billed = billed_for(fake, api_key)
    doc = json.loads(stack.cli("budget", "status", "--key", api_key, "--json").stdout)
    day = doc["windows"]["day"]
    print(f"\nflood: {allowed} allowed, {refused} refused (402), other={len(others)}, "
          f"billed {billed} of {BUDGET_NANO} nano-USD ({100 * billed / BUDGET_NANO:.2f} %)")
    assert others == []
    assert allowed + refused == REQUESTS
    assert requests_for(fake, api_key) == allowed  # refused ones never reached the provider
    assert billed <= BUDGET_NANO  # not a nano-dollar over
    assert billed >= BUDGET_NANO * 9 // 10  # at least 90 % usable
    assert day["spent_nano_usd"] == billed
    assert day["reserved_nano_usd"] == 0
