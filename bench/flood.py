"""The budget flood: N concurrent requests on one key with a small budget, through any
OpenAI-compatible gateway, against the fake provider (tests/fake_provider.py), which bills
what it answers. Leakage = what the provider billed beyond the budget."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from load import spell  # noqa: E402

from tests.billing import key_of, usage_cost  # noqa: E402
from tests.fake_provider import FakeProvider  # noqa: E402


async def _flood(base_url: str, key: str, requests: int) -> dict[str, int]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)

    async def one(i: int) -> str:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=40,
                messages=[{"role": "user", "content": f"flood request {spell(i)}"}])
            return "allowed"
        except openai.APIStatusError as exc:
            return f"status_{exc.status_code}"
        except openai.APIConnectionError:
            return "connection_error"

    outcomes = await asyncio.gather(*(one(i) for i in range(requests)))
    await client.close()
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def flood(base_url: str, key: str, provider_key: str, fake: FakeProvider, budget_nano: int,
          requests: int = 1000) -> dict[str, Any]:
    """Run the flood; `provider_key` is the key the provider sees (the client's own key
    through tokenfuse, the configured upstream key behind LiteLLM)."""
    since = len(fake.records)
    outcomes = asyncio.run(_flood(base_url, key, requests))
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
