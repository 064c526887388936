"""Recursive-loop detection: request fingerprints and tool-call repetition.

Fingerprint = SHA-256 over the caller's key-id prefix, the model and the contents of the
last 3 messages, lower-cased and whitespace-collapsed. With normalisation on (default),
volatile tokens are replaced first, so prompts that differ only in counters, timestamps,
UUIDs, request ids or retry numbers ("attempt 3 of 5") are the same loop.

The counting (true sliding window, cooldown) happens in Redis, inside the same Lua call
as the budget decision (lua/reserve.lua). Tool-call loops need no state: the request's
own history shows the repetition.
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


def normalise(text: str, volatile: bool) -> str:
    if len(text) > VOLATILE_MAX_CHARS:
        return text
    text = text.lower()
    if volatile:
        for pattern in _VOLATILE:
            text = pattern.sub("#", text)
    return _WHITESPACE.sub(" ", text).strip()


def fingerprint(caller: str, model: str, messages: list[Any], volatile: bool) -> str:
    """Hex SHA-256 identifying 'the same request' for loop detection."""
    digest = hashlib.sha256()
    digest.update(caller[:PREFIX_CHARS].encode())
    digest.update(b"\0" + model.encode())
    for message in messages[-LAST_MESSAGES:]:
        digest.update(b"\0" + normalise(_message_text(message), volatile).encode())
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
