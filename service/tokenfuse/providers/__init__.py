"""The provider registry: one line per wire format (see `base.Provider`).

Adding a provider = one module implementing `Provider`, one line in `PROVIDERS`, and its
fixtures in the fake provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from tokenfuse.identity import VIRTUAL_KEY_PREFIX
from tokenfuse.providers.anthropic import Anthropic
from tokenfuse.providers.azure import Azure
from tokenfuse.providers.base import Call, Provider, RequestRejected
from tokenfuse.providers.bedrock import bedrock
from tokenfuse.providers.cohere import Cohere
from tokenfuse.providers.compatible import VENDORS, declared
from tokenfuse.providers.gemini import gemini, vertex
from tokenfuse.providers.ollama import ollama
from tokenfuse.providers.openai import ENCODINGS_PACKAGE, OpenAI
from tokenfuse.providers.vertex_claude import VertexClaude

_AZURE = Azure()
#: Vertex AI: Gemini, and Claude (`_VERTEX.claude`, Anthropic's wire format) on one route.
_VERTEX = vertex()
_VERTEX.claude = VertexClaude()
#: The providers tokenfuse ships, by route name.
BUILTIN: dict[str, Provider] = {
    "openai": OpenAI(), "anthropic": Anthropic(), "azure": _AZURE,
    **{vendor.name: vendor for vendor in VENDORS},
    # Ollama's OpenAI-compatible API (/v1/*) and its native NDJSON API (/api/*).
    "ollama": ollama(),
    # AWS Bedrock: Converse (any model) and InvokeModel (Anthropic models), eventstreams.
    "bedrock": bedrock(),
    "cohere": Cohere(),
    # Google: the Gemini API and Vertex AI (Gemini; Claude under publishers/anthropic).
    "gemini": gemini(), "vertex": _VERTEX,
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

    Refused: a credential header (or query parameter) sent twice (or merged by Envoy into
    `a,b`), two different keys in any combination of credential headers and query
    parameters, a gateway key next to any other credential. No key where the provider
    reads one: (None, None)."""
    values: list[str] = []
    for header in CREDENTIAL_HEADERS:
        sent = headers.get(header, ())
        if len(sent) > 1 or any("," in v for v in sent):
            return None, "duplicate_credential"
        values.extend(v for v in sent if v.strip())
    in_query = _query_credentials(provider, (headers.get(":path") or [""])[-1])
    if len({name for name, _ in in_query}) < len(in_query):
        return None, "duplicate_credential"
    queried = [value for _, value in in_query if value.strip()]
    values.extend(queried)
    keys = {_bare_key(v) for v in values}
    if any(k.startswith(VIRTUAL_KEY_PREFIX) for k in keys) and len(values) > 1:
        return None, "gateway_key_with_credential"
    if len(keys) > 1:
        return None, "conflicting_credentials"
    single = {h: v[0] for h, v in headers.items() if len(v) == 1}
    return provider.caller_key(single) or (queried[0].strip() if queried else None), None


def _query_credentials(provider: Provider, path: str) -> list[tuple[str, str]]:
    """(parameter, value) of each credential in the query (`$key` is `key`)."""
    names = {name for name, _ in provider.query_credentials}
    _, _, query = path.partition("?")
    if not names or not query:
        return []
    return [(name.lstrip("$"), value) for name, value in parse_qsl(query, keep_blank_values=True)
            if name.lstrip("$") in names]


def moved_query_credentials(provider: Provider, path: str
                            ) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(the path without its credential parameters, the headers that carry them instead),
    or None when the query has none: a key in a URL would reach access logs and the
    provider's path; the provider reads the header alike."""
    if not _query_credentials(provider, path):
        return None
    route, _, query = path.partition("?")
    by_name = dict(provider.query_credentials)
    kept, moved = [], []
    for raw in query.split("&"):
        name, _, value = raw.partition("=")
        decoded = unquote_plus(name).lstrip("$")
        if decoded not in by_name:
            kept.append(raw)
            continue
        key = unquote_plus(value).strip()
        credential = by_name[decoded]
        if key:
            moved.append((credential.header, key if credential.scheme is None
                          else f"{credential.scheme.title()} {key}"))
    return (route + ("?" + "&".join(kept) if kept else ""), tuple(moved))


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
    replay another provider's history). Two readers of one shape (Cohere v2 writes
    OpenAI's `tool_calls`) find the same calls: they are counted once."""
    found: list[list[tuple[str, Any]]] = []
    for read in _TOOL_CALL_READERS:
        calls = read(message)
        if calls and calls not in found:
            found.append(calls)
    return [call for calls in found for call in calls]


__all__ = ["BUILTIN", "CREDENTIAL_HEADERS", "DEFAULT_PROVIDER", "ENCODING_DATA_PACKAGE",
           "MEDIA_BLOCK_TYPES", "PROVIDERS", "Call", "Provider", "RequestRejected",
           "caller_credential", "declare", "moved_query_credentials", "provider_for_path",
           "tool_calls",
           "unrouted_error_body"]
