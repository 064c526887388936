"""Request rules that need no network: one credential per request, strict JSON."""

from __future__ import annotations

import pytest

from tokenfuse.policy.request_body import MAX_DEPTH, BodyRejected, parse
from tokenfuse.providers import PROVIDERS, caller_credential

OPENAI, ANTHROPIC = PROVIDERS["openai"], PROVIDERS["anthropic"]


@pytest.mark.parametrize(("provider", "headers", "expected"), [
    (OPENAI, {"authorization": ["Bearer sk-a"]}, ("sk-a", None)),
    (ANTHROPIC, {"x-api-key": ["sk-a"]}, ("sk-a", None)),
    (ANTHROPIC, {"authorization": ["Bearer sk-a"]}, ("sk-a", None)),
    # the same key twice in different headers is one credential
    (ANTHROPIC, {"x-api-key": ["sk-a"], "authorization": ["Bearer sk-a"]}, ("sk-a", None)),
    # OpenAI authenticates only Authorization: a key elsewhere is no key
    (OPENAI, {"x-api-key": ["sk-a"]}, (None, None)),
    (ANTHROPIC, {"x-api-key": ["sk-l"], "authorization": ["Bearer sk-r"]},
     (None, "conflicting_credentials")),
    (OPENAI, {"x-api-key": ["sk-l"], "authorization": ["Bearer sk-r"]},
     (None, "conflicting_credentials")),
    (ANTHROPIC, {"x-api-key": ["sk-l", "sk-r"]}, (None, "duplicate_credential")),
    (ANTHROPIC, {"x-api-key": ["sk-l", "sk-l"]}, (None, "duplicate_credential")),
    (OPENAI, {"authorization": ["Bearer sk-l,Bearer sk-r"]}, (None, "duplicate_credential")),
    (ANTHROPIC, {"x-api-key": ["tfk-gateway"], "authorization": ["Bearer sk-r"]},
     (None, "gateway_key_with_credential")),
    (OPENAI, {"authorization": ["Bearer tfk-gateway"], "x-api-key": ["tfk-gateway"]},
     (None, "gateway_key_with_credential")),
])
def test_exactly_one_credential(provider, headers, expected) -> None:
    assert caller_credential(provider, headers) == expected


@pytest.mark.parametrize(("raw", "code"), [
    (b'{"model": "o1-pro", "messages": [], "model": "gpt-4o-mini"}', "duplicate_key"),
    (b'{"a": {"max_tokens": 1, "max_tokens": 9000}}', "duplicate_key"),
    (b'{"a": [{"k": 1, "k": 1}]}', "duplicate_key"),
    (b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nesting_too_deep"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nesting_too_deep"),
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
])
def test_strict_json_refusals(raw: bytes, code: str) -> None:
    with pytest.raises(BodyRejected) as refused:
        parse(raw)
    assert refused.value.code == code


def test_strict_json_accepts_deep_enough_bodies() -> None:
    nested = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    assert parse(nested)["a"]
    assert parse(b'{"model": "m", "tools": [{"a": 1}, {"a": 2}]}')["tools"][1]["a"] == 2


def test_two_cap_fields_are_priced_at_the_larger_and_both_clamped() -> None:
    body = {"model": "gpt-4o", "messages": [], "max_completion_tokens": 10,
            "max_tokens": 100_000}
    call = OPENAI.parse_request("/v1/chat/completions", body)
    assert call.max_output_tokens == 100_000
    clamped = OPENAI.with_output_cap(body, call, 50)
    assert (clamped["max_completion_tokens"], clamped["max_tokens"]) == (50, 50)
