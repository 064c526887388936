"""(b) Exactly one credential per request, in a header the provider authenticates: a
second key must not pick who is billed while another is charged."""

from __future__ import annotations

from typing import Any

import pytest

from tests.adversarial.conftest import POOL_KEY
from tests.adversarial.helpers import (
    ANTHROPIC_VERSION,
    HAIKU,
    assert_provider_shape,
    new_key,
    post,
    records_mentioning,
    set_daily,
    word,
)
from tests.adversarial.invariant import assert_bound_held
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack

LIMIT = 10_000_000
ROUTES = {
    "anthropic": ("/anthropic/v1/messages",
                  {"model": HAIKU, "max_tokens": 20,
                   "messages": [{"role": "user", "content": "who pays for this?"}]}),
    "openai": ("/openai/v1/chat/completions",
               {"model": "gpt-4o-mini", "max_tokens": 20,
                "messages": [{"role": "user", "content": "who pays for this?"}]}),
}
BASE = [("content-type", "application/json"), ("anthropic-version", ANTHROPIC_VERSION)]


def keys(stack: Stack, n: int) -> list[str]:
    out = [new_key("cred") for _ in range(n)]
    for key in out:
        set_daily(stack, key, LIMIT)
    return out


def send(stack: Stack, route: str, headers: list[tuple[str, str]], tag: str) -> Any:
    path, body = ROUTES[route]
    body = {**body, "messages": [{"role": "user", "content": f"who pays {word(len(tag))}"}]}
    return post(stack, path, body, BASE + headers)


def test_x_api_key_with_a_different_bearer_is_refused(stack: Stack, fake: FakeProvider) -> None:
    left, right = keys(stack, 2)
    response = send(stack, "anthropic", [("x-api-key", left),
                                         ("authorization", f"Bearer {right}")], "conflict")
    assert response.status_code == 400, response.text
    assert_provider_shape(response, "anthropic", "conflicting_credentials")
    assert records_mentioning(fake, left, right) == []  # never forwarded
    for key in (left, right):
        assert_bound_held(stack, fake, key, LIMIT)


def test_two_x_api_keys_are_refused(stack: Stack, fake: FakeProvider) -> None:
    left, right = keys(stack, 2)
    response = send(stack, "anthropic", [("x-api-key", left), ("x-api-key", right)], "dup")
    assert response.status_code == 400, response.text
    assert_provider_shape(response, "anthropic", "duplicate_credential")
    assert records_mentioning(fake, left, right) == []
    for key in (left, right):
        assert_bound_held(stack, fake, key, LIMIT)


@pytest.mark.parametrize("route", ["openai", "anthropic"])
@pytest.mark.parametrize("merged", [False, True], ids=["two-headers", "comma-merged"])
def test_duplicate_authorization_is_refused(stack: Stack, fake: FakeProvider, route: str,
                                            merged: bool) -> None:
    left, right = keys(stack, 2)
    # Envoy merges two Authorization headers into one value, `Bearer L,Bearer R`; a
    # provider reading the first value bills L.
    headers = ([("authorization", f"Bearer {left},Bearer {right}")] if merged else
               [("authorization", f"Bearer {left}"), ("authorization", f"Bearer {right}")])
    response = send(stack, route, headers, f"{route}{merged}")
    assert response.status_code == 400, response.text
    assert_provider_shape(response, route, "duplicate_credential")
    assert records_mentioning(fake, left, right) == []
    for key in (left, right):
        assert_bound_held(stack, fake, key, LIMIT)


@pytest.mark.parametrize(("route", "gateway_header"), [
    ("anthropic", "x-api-key"), ("anthropic", "authorization"), ("openai", "authorization")])
def test_gateway_key_next_to_a_credential_is_refused(
        stack: Stack, fake: FakeProvider, gateway_key: str, route: str,
        gateway_header: str) -> None:
    (other,) = keys(stack, 1)
    set_daily(stack, gateway_key, LIMIT)
    def forwarded() -> int:  # POSTs with any of these keys (the pool's probes are GETs)
        return sum(1 for r in records_mentioning(fake, POOL_KEY, other, gateway_key)
                   if r.method == "POST")

    before = forwarded()
    if gateway_header == "x-api-key":
        headers = [("x-api-key", gateway_key), ("authorization", f"Bearer {other}")]
    else:
        headers = [("authorization", f"Bearer {gateway_key}"), ("x-api-key", other)]
    response = send(stack, route, headers, f"gw{route}{gateway_header}")
    assert response.status_code == 400, response.text
    assert_provider_shape(response, route, "gateway_key_with_credential")
    assert forwarded() == before  # nothing forwarded: not with the pool's key, nor the other
    assert_bound_held(stack, fake, other, LIMIT)
    assert_bound_held(stack, fake, gateway_key, LIMIT)


def test_a_killed_key_cannot_hide_behind_another(stack: Stack, fake: FakeProvider) -> None:
    killed, other = keys(stack, 2)
    assert stack.cli("kill", "--key", killed).returncode == 0
    # Anthropic bills the x-api-key: the killed key must not get through behind a Bearer.
    response = send(stack, "anthropic", [("x-api-key", killed),
                                         ("authorization", f"Bearer {other}")], "killed-a")
    assert response.status_code in (400, 402), response.text
    assert response.json()["error"]["code"] in ("conflicting_credentials", "killed")
    assert records_mentioning(fake, killed) == []
    # OpenAI bills the Bearer: either refused, or billed to (and charged to) that key.
    response = send(stack, "openai", [("x-api-key", killed),
                                      ("authorization", f"Bearer {other}")], "killed-o")
    assert response.status_code in (200, 400, 402), response.text
    assert records_mentioning(fake, killed) == [] or response.status_code == 200
    assert all(r.api_key == other for r in records_mentioning(fake, killed, other))
    response = send(stack, "openai", [("authorization", f"Bearer {killed}")], "killed-alone")
    assert response.status_code == 402 and response.json()["error"]["code"] == "killed"
    for key in (killed, other):
        assert_bound_held(stack, fake, key, LIMIT)
