"""The budget flood: N concurrent requests on one key with a small budget, through any
OpenAI-compatible gateway, against the fake provider (tests/fake_provider.py), which bills
what it answers. Leakage = what the provider billed beyond the budget."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.billing import key_of, usage_cost  # noqa: E402
from tests.support.fake_provider import FakeProvider  # noqa: E402
from tests.support.flood import flood_outcomes  # noqa: E402


def flood(base_url: str, key: str, provider_key: str, fake: FakeProvider, budget_nano: int,
          requests: int = 1000) -> dict[str, Any]:
    """Run the flood; `provider_key` is the key the provider sees (the client's own key
    through tokenfuse, the configured upstream key behind LiteLLM)."""
    since = len(fake.records)
    outcomes: dict[str, int] = {}
    for outcome in asyncio.run(flood_outcomes(base_url, key, requests, timeout_s=300)):
        kind = outcome.split(":", 1)[0]
        outcomes[kind] = outcomes.get(kind, 0) + 1
    served = [r for r in list(fake.records)[since:]
              if r.method == "POST" and key_of(r.headers) == provider_key]
    billed = sum(usage_cost(r.usage) for r in served if r.usage is not None and r.completed)
    return {
        "requests": requests, "outcomes": outcomes,
        "allowed": outcomes.get("allowed", 0), "forwarded": len(served),
        "budget_nano_usd": budget_nano, "billed_nano_usd": billed,
        "leak_nano_usd": max(0, billed - budget_nano),
        "budget_used_percent": 100 * billed / budget_nano,
    }
