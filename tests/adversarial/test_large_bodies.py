"""(e) Bodies near the size limit, sent at once, must not starve other callers, and a
request that never reached the provider must leave nothing charged or reserved."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.adversarial.helpers import (
    HAIKU,
    LOREM,
    anthropic_headers,
    day,
    new_key,
    openai_client,
    openai_headers,
    set_daily,
)
from tests.adversarial.invariant import assert_bound_held
from tests.support.billing import requests_for
from tests.support.fake_provider import FakeProvider, data_url, make_pdf, make_png
from tests.support.harness import Stack, wait_until

LIMIT = 10_000_000
SIZE = 29 * 1024 * 1024


@pytest.fixture(scope="module")
def big_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_MAX_REQUEST_BYTES": str(64 * 1024 * 1024)}).start()
    yield s
    s.cleanup()


def padded(head: bytes, size: int) -> bytes:
    """``head`` followed by zero bytes, so that its base64 is about ``size`` long."""
    return head + b"\0" * max(0, size * 3 // 4 - len(head))


def bodies() -> list[tuple[str, bytes, str]]:
    """(path, body, provider) of three ~29 MB requests: text, an image, a PDF."""
    text = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [
        {"role": "user", "content": LOREM * (SIZE // len(LOREM))}]}).encode()
    image = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}, {
            "type": "image_url", "image_url": {
                "url": data_url(padded(make_png(2048, 2048), SIZE), "image/png"),
                "detail": "high"}}]}]}).encode()
    pdf = base64.b64encode(padded(make_pdf(3), SIZE)).decode()
    document = json.dumps({"model": HAIKU, "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf", "data": pdf}},
            {"type": "text", "text": "read it"}]}]}).encode()
    return [("/openai/v1/chat/completions", text, "openai"),
            ("/openai/v1/chat/completions", image, "openai"),
            ("/anthropic/v1/messages", document, "anthropic")]


def test_big_bodies_do_not_starve_a_small_request(big_stack: Stack, fake: FakeProvider) -> None:
    stack = big_stack
    sends = bodies()
    keys = [new_key("big") for _ in sends]
    small = new_key("small")
    for key in [*keys, small]:
        set_daily(stack, key, LIMIT)
    statuses: dict[str, int | str] = {}

    def send(key: str, path: str, body: bytes, provider: str) -> None:
        headers = anthropic_headers(key) if provider == "anthropic" else openai_headers(key)
        try:
            statuses[key] = httpx.post(stack.envoy.base_url + path, content=body,
                                       headers=headers, timeout=120).status_code
        except httpx.HTTPError as exc:
            statuses[key] = type(exc).__name__

    received = "http.tokenfuse.downstream_cx_rx_bytes_total"
    before = stack.envoy.stat(received)
    threads = [threading.Thread(target=send, args=(key, path, body, provider))
               for key, (path, body, provider) in zip(keys, sends, strict=True)]
    for thread in threads:
        thread.start()
    total = sum(len(body) for _, body, _ in sends)
    # Envoy has (nearly) all of the three bodies: the processor has them to judge now.
    wait_until(lambda: stack.envoy.stat(received) - before >= total * 0.95, timeout=60,
               what="the big bodies to be uploaded")
    started = time.monotonic()
    try:
        reply = openai_client(stack, small, timeout=30).chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        elapsed = time.monotonic() - started
    finally:
        for thread in threads:
            thread.join(120)
    assert reply.usage is not None
    assert elapsed < 5, f"a small request took {elapsed:.1f} s behind three big bodies"
    assert len(statuses) == 3, statuses
    for key in keys:
        if requests_for(fake, key) == 0:  # never forwarded: nothing charged, nothing held
            wait_until(lambda key=key: day(stack, key)["reserved_nano_usd"] == 0, timeout=15,
                       what="the reservation of a request never forwarded to be released")
            assert day(stack, key)["spent_nano_usd"] == 0, (statuses[key], day(stack, key))
    for key in [*keys, small]:
        assert_bound_held(stack, fake, key, LIMIT)
