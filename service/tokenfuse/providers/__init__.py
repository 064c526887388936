"""The provider registry: one line per wire format (see `base.Provider`).

Adding a provider = one module implementing `Provider`, one line in `PROVIDERS`, and its
fixtures in the fake provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tokenfuse.identity import VIRTUAL_KEY_PREFIX
from tokenfuse.providers.anthropic import Anthropic
from tokenfuse.providers.azure import Azure
from tokenfuse.providers.base import Call, Provider, RequestRejected
from tokenfuse.providers.bedrock import bedrock
from tokenfuse.providers.cohere import Cohere
from tokenfuse.providers.compatible import VENDORS, declared
from tokenfuse.providers.ollama import ollama
from tokenfuse.providers.openai import ENCODINGS_PACKAGE, OpenAI
from tokenfuse.providers.vertex_claude import VertexClaude

_AZURE = Azure()
#: The providers tokenfuse ships, by route name.
BUILTIN: dict[str, Provider] = {
    "openai": OpenAI(), "anthropic": Anthropic(), "azure": _AZURE,
    **{vendor.name: vendor for vendor in VENDORS},
    # Ollama's OpenAI-compatible API (/v1/*) and its native NDJSON API (/api/*).
    "ollama": ollama(),
    # AWS Bedrock: Converse (any model) and InvokeModel (Anthropic models), eventstreams.
    "bedrock": bedrock(),
    "cohere": Cohere(),
    "vertex": VertexClaude(),  # TEMP: the Gemini route's `claude` once it lands
}
#: Every provider a route may name: the built-in ones, then those the operator declares
#: (`declare`, from TOKENFUSE_OPENAI_COMPATIBLE when the settings are read).
PROVIDERS: dict[str, Provider] = dict(BUILTIN)
#: What a declared name must look like (it names an Envoy cluster and a path segment).
DECLARED_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
#: Route names that are not providers.
RESERVED_NAMES = frozenset({"direct", "healthz", "api", "admin"})
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


def declare(compatible: Mapping[str, str], azure_deployments: Mapping[str, str]) -> None:
    """The operator's part of the registry: OpenAI-compatible upstreams by name (their
    URLs are the settings' business), and Azure's deployment → model map. Replaces any
    earlier declaration. Raises ValueError for a name that cannot be a route."""
    for name in [n for n in PROVIDERS if n not in BUILTIN]:
        del PROVIDERS[name]
    for name in compatible:
        if name in BUILTIN or name in RESERVED_NAMES or not DECLARED_NAME.match(name):
            raise ValueError(f"'{name}' cannot name an OpenAI-compatible upstream: use "
                             "lowercase letters, digits, '-' or '_', not a built-in "
                             f"provider ({', '.join(sorted(BUILTIN))})")
        PROVIDERS[name] = declared(name)
    _AZURE.deployments = dict(azure_deployments)


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


#: One reader per tool-call shape (the OpenAI-compatible family shares OpenAI's): a call
#: is counted once, whichever providers read its shape.
_TOOL_CALL_READERS = tuple({type(p).tool_calls: p.tool_calls for p in BUILTIN.values()}.values())


def tool_calls(message: Any) -> list[tuple[str, Any]]:
    """Tool calls recorded in one history message, in any provider's shape (an agent may
    replay another provider's history)."""
    return [call for read in _TOOL_CALL_READERS for call in read(message)]


__all__ = ["BUILTIN", "CREDENTIAL_HEADERS", "DEFAULT_PROVIDER", "ENCODING_DATA_PACKAGE",
           "MEDIA_BLOCK_TYPES", "PROVIDERS", "Call", "Provider", "RequestRejected",
           "caller_credential", "declare", "provider_for_path", "tool_calls",
           "unrouted_error_body"]
