"""Recursive-loop detection: request fingerprints, answer fingerprints and tool-call
repetition.

Two tiers, each with its own fingerprint:

- exact: SHA-256 over the caller's key-id prefix, the model and the contents of the last
  3 messages, lower-cased and whitespace-collapsed (nothing else is normalised);
- near-duplicate: the same, after volatile tokens are replaced, so prompts that differ only
  in counters, timestamps, UUIDs, request ids or retry numbers ("attempt 3 of 5") share
  it. Templated batches share it too, so this tier counts a request only when its answer
  repeated as well (`answer_fingerprint`, recorded at settlement).

The counting (sliding windows, cooldowns, the answer streak) happens in Redis, inside the
Lua calls that reserve and settle (lua/reserve.lua, lua/settle.lua). Tool-call loops need
no state: the request's own history shows the repetition.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

from tokenfuse.identity import PREFIX_CHARS
from tokenfuse.providers import tool_calls

LAST_MESSAGES = 3
_WHITESPACE = re.compile(r"\s+")
# Order matters: whole volatile tokens first, then any remaining digit runs.
_VOLATILE = [
    re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),  # UUID
    re.compile(r"\b\d{4}-\d{2}-\d{2}[t ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(z|[+-]\d{2}:?\d{2})?"),
    re.compile(r"\b\d{1,2}:\d{2}(:\d{2})?\b"),  # clock times
    re.compile(r"\b(req|request|msg|run|call|trace|span|id)[_-]?[0-9a-z]{6,}\b"),  # ids
    re.compile(r"\b[0-9a-f]*\d[0-9a-f]*[a-f][0-9a-f]*\b|\b[0-9a-f]*[a-f][0-9a-f]*\d[0-9a-f]*\b"),
    re.compile(r"\d+(\.\d+)?"),  # counters, retry numbers, epoch timestamps
]


def _content_text(content: Any) -> str:
    """Text of a message's content: strings, text parts, tool calls and results."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_content_text(part) for part in content)
    if isinstance(content, dict):
        if isinstance(content.get("text"), str):
            return content["text"]
        if "content" in content:
            return _content_text(content["content"])
        return json.dumps(content, sort_keys=True, separators=(",", ":"))
    return str(content)


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return _content_text(message)
    text = _content_text(message.get("content"))
    for name, arguments in tool_calls(message):
        text += " " + name + " " + _canonical_arguments(arguments)
    return text


#: Longer texts are fingerprinted as they are: normalising megabytes (regexes, case,
#: whitespace) holds the interpreter for seconds, while hashing them does not (hashlib
#: releases the GIL). A document that differs only in case or numbers is another request.
VOLATILE_MAX_CHARS = 20_000


def normalise(text: str) -> str:
    """Lower-cased, whitespace runs collapsed to one space, trimmed (the exact tier)."""
    if len(text) > VOLATILE_MAX_CHARS:
        return text
    return _WHITESPACE.sub(" ", text.lower()).strip()


def without_volatile(normalised: str) -> str:
    """A normalised text with numbers, UUIDs, timestamps and ids replaced by `#`."""
    if len(normalised) > VOLATILE_MAX_CHARS:
        return normalised
    for pattern in _VOLATILE:
        normalised = pattern.sub("#", normalised)
    return normalised


def _digest(caller: str, model: str, texts: list[str], tier: bytes) -> str:
    digest = hashlib.sha256(tier)
    digest.update(caller[:PREFIX_CHARS].encode())
    digest.update(b"\0" + model.encode())
    for text in texts:
        digest.update(b"\0" + text.encode())
    return digest.hexdigest()


def fingerprints(caller: str, model: str, messages: list[Any],
                 near_duplicates: bool = True) -> tuple[str, str | None]:
    """(exact fingerprint, near-duplicate fingerprint or None): hex SHA-256s identifying
    'the same request' and 'the same request but for its volatile tokens'."""
    texts = [normalise(_message_text(m)) for m in messages[-LAST_MESSAGES:]]
    exact = _digest(caller, model, texts, b"")
    if not near_duplicates:
        return exact, None
    return exact, _digest(caller, model, [without_volatile(t) for t in texts], b"near\0")


def fingerprint(caller: str, model: str, messages: list[Any]) -> str:
    """The exact tier's fingerprint (the documented one)."""
    return fingerprints(caller, model, messages, near_duplicates=False)[0]


def near_duplicate_fingerprint(caller: str, model: str, messages: list[Any]) -> str:
    near = fingerprints(caller, model, messages)[1]
    assert near is not None
    return near


#: Answer fingerprints: 64 bits of BLAKE2b over the answer's generated text, in order (the
#: same bytes whether the answer came whole or as stream deltas).
ANSWER_DIGEST_BYTES = 8


def answer_digest() -> Any:
    """An incremental answer fingerprint: `update(text.encode())`, then `hexdigest()`."""
    return hashlib.blake2b(digest_size=ANSWER_DIGEST_BYTES)


def answer_fingerprint(texts: list[str]) -> str:
    """The fingerprint of an answer given whole (its text pieces, in order); "" for an
    answer without generated text (nothing to compare)."""
    if not any(texts):
        return ""
    digest = answer_digest()
    for text in texts:
        digest.update(text.encode())
    return digest.hexdigest()


def _canonical_arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments.strip()
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"))


def repeated_tool_call(messages: list[Any]) -> tuple[str, int] | None:
    """The most repeated (tool, arguments) call in the history: (tool name, times)."""
    calls: Counter[tuple[str, str]] = Counter(
        (name, _canonical_arguments(arguments))
        for message in messages for name, arguments in tool_calls(message))
    if not calls:
        return None
    (name, _args), times = calls.most_common(1)[0]
    return name, times
