"""What the adversarial tests share: keys with budgets, raw requests through Envoy,
distinct prompts (the loop guard must not be what stops them), big schemas and texts."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anthropic
import httpx
import openai

from tests.adversarial.invariant import budget_status
from tests.support.billing import usage_cost
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack

HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-6"  # $3 / $15 per M tokens
ANTHROPIC_VERSION = "2023-06-01"
USD = 1_000_000_000  # nano-USD per USD
LOREM = "lorem ipsum dolor sit amet consectetur adipiscing elit "
LOREM_TOKENS = 8  # cl100k tokens per repetition of LOREM in a run of them


def new_key(tag: str = "adv") -> str:
    return f"sk-{tag}-{uuid.uuid4().hex}"


def usd(nano: int) -> str:
    return f"{nano // USD}.{nano % USD:09d}"


def set_daily(stack: Stack, key: str, limit_nano: int) -> None:
    done = stack.cli("budget", "set", "--key", key, "--daily", usd(limit_nano))
    assert done.returncode == 0, done.stderr


def day(stack: Stack, key: str) -> dict:
    return budget_status(stack, key)["windows"]["day"]


def word(i: int) -> str:
    """A distinct lower-case word per i, with no digits and no hex-only run (the loop
    guard's normalisation replaces numbers and hex ids)."""
    letters = "ghijklmnopqrstuvwxyz"
    return "q" + "".join(letters[int(d)] for d in str(i))


def openai_client(stack: Stack, key: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.envoy.base_url + "/openai/v1", api_key=key,
                         max_retries=0, timeout=timeout)


def async_openai(stack: Stack, key: str, timeout: float = 60) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.envoy.base_url + "/openai/v1", api_key=key,
                              max_retries=0, timeout=timeout)


def anthropic_client(stack: Stack, key: str, timeout: float = 60) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.envoy.base_url + "/anthropic", api_key=key,
                               max_retries=0, timeout=timeout)


def async_anthropic(stack: Stack, key: str, timeout: float = 60) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stack.envoy.base_url + "/anthropic", api_key=key,
                                    max_retries=0, timeout=timeout)


def openai_headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


def anthropic_headers(key: str) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION,
            "content-type": "application/json"}


def post(stack: Stack, path: str, body: Any, headers: Any,
         timeout: float = 60) -> httpx.Response:
    """POST through Envoy; ``body`` raw (bytes/str) or JSON; ``headers`` a dict or a list of
    pairs (duplicates kept)."""
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(stack.envoy.base_url + path, content=content, headers=headers,
                      timeout=timeout)


def error_code(response: httpx.Response) -> str | None:
    """``error.code`` of a refusal, in either provider's shape."""
    try:
        doc = response.json()
    except ValueError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def assert_provider_shape(response: httpx.Response, provider: str, code: str) -> None:
    """A refusal in the provider's own error shape, with the code in ``error.code``."""
    doc = response.json()
    if provider == "anthropic":
        assert doc["type"] == "error", doc
    assert isinstance(doc["error"], dict) and doc["error"]["code"] == code, doc
    assert doc["error"]["message"], doc


def records_mentioning(fake: FakeProvider, *secrets: str) -> list:
    """Requests the provider received that carried any of these keys in any header."""
    return [r for r in list(fake.records)
            if any(s in value for _, value in r.raw_headers for s in secrets)]


def prepare_budget(stack: Stack, key: str, limit_nano: int, remainder_nano: int) -> int:
    """A daily limit, nearly spent: one honest call through tokenfuse spends all but about
    ``remainder_nano``. Returns what is left."""
    set_daily(stack, key, limit_nano)
    spend = limit_nano - remainder_nano
    if spend > 100_000:
        # claude-haiku-4-5: $1/M input, $5/M output; the fake answers up to the cap.
        tokens = (spend - 60_000) // 5_000
        anthropic_client(stack, key).messages.create(
            model=HAIKU, max_tokens=tokens,
            messages=[{"role": "user", "content": f"warm up the budget {word(tokens)}"}])
    left = day(stack, key)
    remaining = limit_nano - left["spent_nano_usd"] - left["reserved_nano_usd"]
    assert remainder_nano <= remaining <= remainder_nano + 100_000, (left, remainder_nano)
    return remaining


def big_text(tokens: int) -> str:
    return LOREM * (tokens // LOREM_TOKENS + 1)


def big_schema(tokens: int, tag: str = "") -> dict[str, Any]:
    """A JSON schema whose text is about ``tokens`` tokens, most of it under the keys a
    binary-field skip would miss (data, url, source) and in long property names."""
    share = big_text(tokens // 4)
    long_name = "field_" + "_".join(["name"] * (tokens // 8)) + tag
    return {"type": "object", "properties": {
        "data": {"type": "string", "description": share},
        "url": {"type": "string", "description": share},
        "source": {"type": "object", "properties": {"data": {"type": "string",
                                                              "description": share}}},
        long_name: {"type": "string", "description": tag or "x"},
    }, "required": ["data"]}


def cost_of(fake: FakeProvider, key: str) -> list[int]:
    """What the provider billed for each of this key's calls, in order."""
    from tests.support.billing import key_of

    return [usage_cost(r.usage) for r in list(fake.records)
            if r.usage is not None and key_of(r) == key]
