"""(f) A flood of every attack at once, against one small budget."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import httpx

from tests.adversarial.helpers import (
    ANTHROPIC_VERSION,
    HAIKU,
    SONNET,
    anthropic_headers,
    big_schema,
    big_text,
    new_key,
    openai_headers,
    set_daily,
    word,
)
from tests.adversarial.invariant import assert_bound_held
from tests.support.fake_provider import FakeProvider, data_url, make_pdf, make_png
from tests.support.harness import Stack

LIMIT = 50_000_000  # $0.05 for the flooding key
OTHER_LIMIT = 10_000_000
CHAT = "/openai/v1/chat/completions"
MESSAGES = "/anthropic/v1/messages"
PNG = data_url(make_png(2048, 2048), "image/png")
PDF = base64.b64encode(make_pdf(10)).decode()
SHARED_ID = f"flood-{uuid.uuid4()}"
SLOW = {"x-fake-chunk-delay-ms": "2"}  # streams at a provider's pace (500 tokens/s)


def attack(i: int, key: str, other: str) -> tuple[str, bytes | str, list[tuple[str, str]]]:
    """The i-th request of the flood: (path, body, headers)."""
    w = word(i)
    say = [{"role": "user", "content": f"flood {w}"}]
    oa = list(openai_headers(key).items())
    an = list(anthropic_headers(key).items())
    kind = i % 12
    if kind == 0:  # (a) a shared client request id
        return CHAT, json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "messages": say}), \
            [*oa, ("x-request-id", SHARED_ID)]
    if kind == 1:  # (a) the same, streamed
        return CHAT, json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "stream": True,
                                 "messages": say}), [*oa, ("x-request-id", SHARED_ID)]
    if kind == 2:  # (b) x-api-key of the flooding key next to another key's Bearer
        return MESSAGES, json.dumps({"model": HAIKU, "max_tokens": 50, "messages": say}), \
            [("content-type", "application/json"), ("anthropic-version", ANTHROPIC_VERSION),
             ("x-api-key", key), ("authorization", f"Bearer {other}")]
    if kind == 3:  # (b) two Authorization headers
        return CHAT, json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "messages": say}), \
            [("content-type", "application/json"), ("authorization", f"Bearer {key}"),
             ("authorization", f"Bearer {other}")]
    if kind == 4:  # (d) priced as one model, billed as another
        return CHAT, ('{"model": "o1-pro", "max_completion_tokens": 1000, "messages": '
                      + json.dumps(say) + ', "model": "gpt-4o-mini"}'), oa
    if kind == 5:  # (d) nested beyond any parser
        return CHAT, ('{"model": "gpt-4o-mini", "max_tokens": 5, "messages": '
                      + json.dumps(say) + ', "x": ' + "[" * 1000 + "]" * 1000 + "}"), oa
    if kind == 6:  # (c) a tool schema under binary-looking keys
        tools = [{"type": "function", "function": {"name": f"t_{w}",
                                                   "parameters": big_schema(4000, w)}}]
        return CHAT, json.dumps({"model": "gpt-4o", "max_tokens": 20, "tools": tools,
                                 "messages": say}), oa
    if kind == 7:  # (c) a high-detail image
        content = [{"type": "text", "text": f"look {w}"},
                   {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}}]
        return CHAT, json.dumps({"model": "gpt-4o-mini", "max_tokens": 10,
                                 "messages": [{"role": "user", "content": content}]}), oa
    if kind == 8:  # (c) hidden reasoning in a stream
        return CHAT, json.dumps({"model": "gpt-5", "max_completion_tokens": 2000,
                                 "stream": True, "messages": say}), \
            [*oa, ("x-fake-output-tokens", "20")]
    if kind == 9:  # (c) Claude thinking, streamed
        return MESSAGES, json.dumps({"model": SONNET, "max_tokens": 3000, "stream": True,
                                     "thinking": {"type": "enabled", "budget_tokens": 2000},
                                     "messages": say}), \
            [*an, ("x-fake-output-tokens", "20")]
    if kind == 10:  # (c) documents: text and PDF
        content = [{"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                   "data": big_text(5000)}},
                   {"type": "document", "source": {"type": "base64",
                                                   "media_type": "application/pdf",
                                                   "data": PDF}},
                   {"type": "text", "text": f"read {w}"}]
        return MESSAGES, json.dumps({"model": HAIKU, "max_tokens": 20,
                                     "messages": [{"role": "user", "content": content}]}), an
    # (c) no output cap on a model with a large maximum, streamed and not
    return CHAT, json.dumps({"model": "gpt-4.1", "stream": i % 24 == 11, "messages": say}), \
        [*oa, ("x-fake-output-tokens", "3000"), *SLOW.items()]


def test_two_hundred_mixed_attacks(stack: Stack, fake: FakeProvider) -> None:
    key, other = new_key("flood"), new_key("other")
    set_daily(stack, key, LIMIT)
    set_daily(stack, other, OTHER_LIMIT)

    async def one(client: httpx.AsyncClient, i: int) -> int | str:
        path, body, headers = attack(i, key, other)
        try:
            async with client.stream("POST", path, content=body, headers=headers) as reply:
                await reply.aread()
                return reply.status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    async def run() -> list[Any]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=stack.envoy.base_url, timeout=90,
                                     limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    outcomes = asyncio.run(run())
    assert all(isinstance(o, int) and o < 500 for o in outcomes), sorted(map(str, outcomes))
    assert 400 in outcomes  # the malformed ones, at least, were refused
    assert_bound_held(stack, fake, key, LIMIT)
    assert_bound_held(stack, fake, other, OTHER_LIMIT)
