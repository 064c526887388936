"""The provider registry: one line per wire format (see `base.Provider`).

Adding a provider = one module implementing `Provider`, one line in `PROVIDERS`, and its
fixtures in the fake provider.
"""

from __future__ import annotations

from typing import Any

from tokenfuse.providers.anthropic import Anthropic
from tokenfuse.providers.base import Call, Provider, RequestRejected
from tokenfuse.providers.openai import OpenAI

PROVIDERS: dict[str, Provider] = {"openai": OpenAI(), "anthropic": Anthropic()}
#: Whose error shape answers a request that no provider is routed for.
DEFAULT_PROVIDER = "openai"

#: Content-part types whose tokens are not their text (images, documents), and the fields
#: holding their bytes, in any provider's shape (the estimator bounds them separately).
MEDIA_BLOCK_TYPES: frozenset[str] = frozenset().union(
    *(p.media_block_types for p in PROVIDERS.values()))
BINARY_FIELDS: frozenset[str] = frozenset().union(*(p.binary_fields for p in PROVIDERS.values()))


def provider_for_path(path: str) -> tuple[str, str] | None:
    """('openai', '/v1/chat/completions') for '/openai/v1/chat/completions', else None."""
    for name in PROVIDERS:
        prefix = f"/{name}/"
        if path.startswith(prefix):
            return name, path[len(prefix) - 1 :]
    return None


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


__all__ = ["BINARY_FIELDS", "DEFAULT_PROVIDER", "MEDIA_BLOCK_TYPES", "PROVIDERS", "Call",
           "Provider", "RequestRejected", "pooled_provider", "provider_for_path",
           "tool_calls", "unrouted_error_body"]
