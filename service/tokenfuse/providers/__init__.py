"""The provider registry: one line per wire format (see `base.Provider`).

Adding a provider = one module implementing `Provider`, one line in `PROVIDERS`, and its
fixtures in the fake provider.
"""

from __future__ import annotations

from typing import Any

from tokenfuse.identity import VIRTUAL_KEY_PREFIX
from tokenfuse.providers.anthropic import Anthropic
from tokenfuse.providers.base import Call, Provider, RequestRejected
from tokenfuse.providers.openai import ENCODINGS_PACKAGE, OpenAI

PROVIDERS: dict[str, Provider] = {"openai": OpenAI(), "anthropic": Anthropic()}
#: Where the offline tokenizer's encoding files are (a package located, never imported).
ENCODING_DATA_PACKAGE = ENCODINGS_PACKAGE
#: Whose error shape answers a request that no provider is routed for.
DEFAULT_PROVIDER = "openai"

#: Content-part types whose tokens are not their text (images, documents, files), in any
#: provider's shape (the provider bounds them; the estimator asks).
MEDIA_BLOCK_TYPES: frozenset[str] = frozenset().union(
    *(p.media_block_types for p in PROVIDERS.values()))
#: Every header any provider reads a key from: a request must carry exactly one key.
CREDENTIAL_HEADERS: tuple[str, ...] = tuple(dict.fromkeys(
    c.header for p in PROVIDERS.values() for c in p.credentials))


def provider_for_path(path: str) -> tuple[str, str] | None:
    """('openai', '/v1/chat/completions') for '/openai/v1/chat/completions', else None."""
    for name in PROVIDERS:
        prefix = f"/{name}/"
        if path.startswith(prefix):
            return name, path[len(prefix) - 1 :]
    return None


def caller_credential(provider: Provider,
                      headers: dict[str, list[str]]) -> tuple[str | None, str | None]:
    """(the key to charge, None) or (None, refusal code): exactly one credential, in a
    header the provider authenticates, and it is what the provider will bill.

    Refused: a credential header sent twice (or merged by Envoy into `a,b`), two different
    keys in any combination of credential headers, a gateway key next to any other
    credential. No key in a header the provider reads: (None, None)."""
    values: list[str] = []
    for header in CREDENTIAL_HEADERS:
        sent = headers.get(header, ())
        if len(sent) > 1 or any("," in v for v in sent):
            return None, "duplicate_credential"
        values.extend(v for v in sent if v.strip())
    keys = {_bare_key(v) for v in values}
    if any(k.startswith(VIRTUAL_KEY_PREFIX) for k in keys) and len(values) > 1:
        return None, "gateway_key_with_credential"
    if len(keys) > 1:
        return None, "conflicting_credentials"
    single = {h: v[0] for h, v in headers.items() if len(v) == 1}
    return provider.caller_key(single), None


def _bare_key(value: str) -> str:
    value = value.strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value


def unrouted_error_body(code: str, message: str) -> bytes:
    """The refusal of a path no provider is routed at."""
    return PROVIDERS[DEFAULT_PROVIDER].error_body("invalid_request", code, message)


def tool_calls(message: Any) -> list[tuple[str, Any]]:
    """Tool calls recorded in one history message, in any provider's shape (an agent may
    replay another provider's history)."""
    return [call for provider in PROVIDERS.values() for call in provider.tool_calls(message)]


def pooled_provider(headers: dict[str, str]) -> str | None:
    """The provider a retried pooled attempt is for: the one whose pooled credential header
    the first attempt set (it removed the others)."""
    for name, provider in PROVIDERS.items():
        header = provider.pooled_credential("")[0][0]
        others = {p.pooled_credential("")[0][0] for n, p in PROVIDERS.items() if n != name}
        if header in headers and not others & headers.keys():
            return name
    return None


__all__ = ["CREDENTIAL_HEADERS", "DEFAULT_PROVIDER", "ENCODING_DATA_PACKAGE", "MEDIA_BLOCK_TYPES",
           "PROVIDERS", "Call", "Provider", "RequestRejected", "caller_credential",
           "pooled_provider", "provider_for_path", "tool_calls", "unrouted_error_body"]
