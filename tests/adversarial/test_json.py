"""(d) The body tokenfuse prices is the body the provider reads: duplicate keys (the
provider keeps the first, Python's json the last) and bodies nested beyond any parser are
refused, never forwarded."""

from __future__ import annotations

import pytest

from tests.adversarial.helpers import (
    HAIKU,
    anthropic_headers,
    assert_provider_shape,
    new_key,
    openai_headers,
    post,
    set_daily,
)
from tests.adversarial.invariant import assert_bound_held
from tests.support.billing import requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack

LIMIT = 10_000_000
MESSAGES = '[{"role": "user", "content": "hello there"}]'

DUPLICATES = {
    # Priced as gpt-4o-mini ($0.60/M out), billed as o1-pro ($600/M out).
    "model": ("openai", '{"model": "o1-pro", "messages": ' + MESSAGES
              + ', "max_completion_tokens": 2000, "model": "gpt-4o-mini"}'),
    # Reserved for 1 token, generating 16,000.
    "max_tokens": ("openai", '{"model": "gpt-4o-mini", "max_tokens": 16000, "messages": '
                   + MESSAGES + ', "max_tokens": 1}'),
    "nested-content": ("openai", '{"model": "gpt-4o-mini", "max_tokens": 5, "messages": '
                       '[{"role": "user", "content": "' + "expensive " * 2000
                       + '", "content": "cheap"}]}'),
    "anthropic-model": ("anthropic", '{"model": "claude-fable-5", "max_tokens": 3000, '
                        '"messages": ' + MESSAGES + ', "model": "' + HAIKU + '"}'),
}
PATHS = {"openai": "/openai/v1/chat/completions", "anthropic": "/anthropic/v1/messages"}


def headers(provider: str, key: str) -> dict[str, str]:
    return anthropic_headers(key) if provider == "anthropic" else openai_headers(key)


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_keys_are_refused(stack: Stack, fake: FakeProvider, case: str) -> None:
    provider, raw = DUPLICATES[case]
    key = new_key("json")
    set_daily(stack, key, LIMIT)
    response = post(stack, PATHS[provider], raw, headers(provider, key))
    assert response.status_code == 400, response.text
    assert_provider_shape(response, provider, "duplicate_key")
    assert requests_for(fake, key) == 0
    assert_bound_held(stack, fake, key, LIMIT)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_deep_nesting_is_a_400_not_a_503(stack: Stack, fake: FakeProvider,
                                         provider: str) -> None:
    key = new_key("json")
    set_daily(stack, key, LIMIT)
    model = HAIKU if provider == "anthropic" else "gpt-4o-mini"
    raw = (f'{{"model": "{model}", "max_tokens": 5, "messages": {MESSAGES}, "metadata": '
           + "[" * 1000 + "]" * 1000 + "}")
    response = post(stack, PATHS[provider], raw, headers(provider, key))
    assert response.status_code == 400, response.text
    assert_provider_shape(response, provider, "nesting_too_deep")
    assert requests_for(fake, key) == 0
    assert_bound_held(stack, fake, key, LIMIT)
