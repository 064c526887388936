"""The budget flood's client side, shared by tests/test_flood.py and bench/flood.py:
N concurrent chat completions on one key, each with a distinct prompt."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import openai


def spell(n: int) -> str:
    """A number in letters g..z: distinct prompts that stay distinct to the loop guard,
    which normalises digits away (number-only differences are one near-duplicate loop)."""
    out = ""
    while True:
        n, r = divmod(n, 20)
        out += "ghijklmnopqrstuvwxyz"[r]
        if n == 0:
            return out


async def flood_outcomes(base_url: str | Sequence[str], key: str, requests: int,
                         timeout_s: float = 120) -> list[str]:
    """One outcome per request: "allowed", "status_402", "status_<code>:<body start>" or
    "connection_error". Several base URLs (gateways): request i goes to the i-th modulo
    their number, so they are flooded interleaved, at the same time."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    clients = [openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout_s)
               for url in urls]

    async def one(i: int) -> str:
        try:
            await clients[i % len(clients)].chat.completions.create(
                model="gpt-4o-mini", max_tokens=40,
                messages=[{"role": "user", "content": f"flood request {spell(i)}"}])
            return "allowed"
        except openai.APIStatusError as exc:
            if exc.status_code == 402:
                return "status_402"
            return f"status_{exc.status_code}:{exc.response.text[:160]}"
        except openai.APIConnectionError:
            return "connection_error"

    try:
        return await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        for client in clients:
            await client.close()
