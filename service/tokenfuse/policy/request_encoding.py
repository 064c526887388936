"""Compressed request bodies (`Content-Encoding`): decoded before pricing, within a bound.

Clients compress what they send (the Codex CLI sends zstd or gzip bodies to
`/v1/responses`). tokenfuse prices the decoded JSON and forwards the decoded bytes with
`content-encoding` removed, so the provider receives the same document it would have
received without tokenfuse. Decoding stops one byte past the bound (a decompression bomb
costs at most the bound); an encoding tokenfuse cannot decode is refused, never forwarded
unpriced.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli
import zstandard

from tokenfuse.providers.base import RequestRejected


class EncodingRejected(RequestRejected):
    """The body cannot be decoded: `status` 400 (corrupt), 413 (too large), 415 (unknown)."""


def _too_large(limit: int) -> EncodingRejected:
    return EncodingRejected(413, "request_too_large",
                            f"the decoded request body is larger than {limit} bytes "
                            "(TOKENFUSE_MAX_REQUEST_BYTES); nothing was forwarded")


def _corrupt(encoding: str, detail: str) -> EncodingRejected:
    return EncodingRejected(400, "invalid_content_encoding",
                            f"the request body is not valid {encoding} data ({detail}); "
                            "nothing was forwarded")


def _zlib(data: bytes, limit: int, wbits: int, name: str) -> bytes:
    out = b""
    rest = data
    while rest:  # a gzip body may hold several members: their concatenation (RFC 1952)
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise _corrupt(name, str(exc)) from None
        if len(out) > limit:
            raise _too_large(limit)
        if not decoder.eof:
            raise _corrupt(name, "truncated")
        rest = decoder.unused_data
    return out


def _gzip(data: bytes, limit: int) -> bytes:
    return _zlib(data, limit, 16 + zlib.MAX_WBITS, "gzip")


def _deflate(data: bytes, limit: int) -> bytes:
    # HTTP "deflate" is zlib-wrapped (RFC 9110); some clients send a raw deflate stream.
    try:
        return _zlib(data, limit, zlib.MAX_WBITS, "deflate")
    except EncodingRejected as exc:
        if exc.status == 413:
            raise
        return _zlib(data, limit, -zlib.MAX_WBITS, "deflate")


def _brotli(data: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    try:
        out = decoder.process(data, output_buffer_limit=limit + 1)
    except brotli.error as exc:
        raise _corrupt("br", str(exc) or "corrupt stream") from None
    if len(out) > limit or (not decoder.is_finished() and not decoder.can_accept_more_data()):
        raise _too_large(limit)
    if not decoder.is_finished():
        raise _corrupt("br", "truncated")
    return out


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        # Bounded first (a bomb stops one byte past the limit) ...
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        out = reader.read(limit + 1)
        if len(out) > limit:
            raise _too_large(limit)
        # ... then complete: every frame must end (the reader returns a truncated frame's
        # prefix without complaint); its output is known to be within the limit now.
        rest = data
        while rest:
            frame = zstandard.ZstdDecompressor().decompressobj()
            frame.decompress(rest)
            if not frame.eof:
                raise _corrupt("zstd", "truncated")
            rest = frame.unused_data
    except zstandard.ZstdError as exc:
        raise _corrupt("zstd", str(exc)) from None
    return out


DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip, "x-gzip": _gzip, "deflate": _deflate, "br": _brotli, "zstd": _zstd,
}
#: Encodings stacked on one body beyond this are refused (no client stacks more than one).
MAX_LAYERS = 3


def encodings(header_values: list[str]) -> list[str]:
    """The codings applied to a body, in the order they were applied (`identity` dropped)."""
    names = [name.strip().lower() for value in header_values for name in value.split(",")]
    return [name for name in names if name and name != "identity"]


def decode(body: bytes, applied: list[str], limit: int) -> bytes:
    """The body with every coding undone (the last applied first), at most `limit` bytes."""
    if len(applied) > MAX_LAYERS:
        raise EncodingRejected(415, "unsupported_content_encoding",
                               f"more than {MAX_LAYERS} content codings on one body")
    unknown = [name for name in applied if name not in DECODERS]
    if unknown:
        raise EncodingRejected(
            415, "unsupported_content_encoding",
            f"content-encoding {unknown[0]!r} is not supported (send identity, gzip, "
            "deflate, br or zstd); nothing was forwarded")
    for name in reversed(applied):
        body = DECODERS[name](body, limit)
    return body
