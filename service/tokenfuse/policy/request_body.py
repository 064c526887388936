"""Strict parsing of a request body: one JSON object, no duplicate keys, bounded nesting.

A duplicate key is refused because providers disagree on which copy wins (tokenfuse would
price one `model` or `max_tokens`, a provider that keeps the first could bill another);
deep nesting is refused before any recursive code sees it.
"""

from __future__ import annotations

import json
from typing import Any

#: Deepest nesting of objects and arrays accepted (real requests, tool schemas included,
#: stay far below).
MAX_DEPTH = 64


class BodyRejected(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise BodyRejected("duplicate_key",
                           f"the request body has the key {duplicate!r} more than once")
    return obj


def _depth_ok(node: Any, limit: int) -> bool:
    stack = [(node, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in value
                     if isinstance(child, dict | list))
    return True


def parse(raw: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The body as a dict, or BodyRejected(code, message)."""
    try:
        body = json.loads(raw, object_pairs_hook=_unique)
    except RecursionError as exc:
        raise BodyRejected("nesting_too_deep", "the request body is nested deeper than "
                           f"{max_depth} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, BodyRejected):
            raise
        raise BodyRejected("invalid_json", "the request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise BodyRejected("invalid_json", "the request body must be a JSON object")
    # Fewer brackets than the bound cannot nest deeper than it (a C-speed count).
    if raw.count(b"[") + raw.count(b"{") > max_depth and not _depth_ok(body, max_depth):
        raise BodyRejected("nesting_too_deep",
                           f"the request body is nested deeper than {max_depth} levels")
    return body
