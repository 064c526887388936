"""Responses a provider compressed although tokenfuse asked for identity.

Envoy asks every provider for `accept-encoding: identity` and compresses toward the client
itself, so the processor normally reads plain bytes. An upstream that compresses anyway
(RFC 9110 lets a server ignore the preference) would otherwise be unmetered: its stream
could not be counted or cut. The processor recognises gzip and zstd by their magic bytes,
decodes what it meters, and re-encodes what it forwards in the same coding (the client's
`content-encoding` header came from the provider and stays true), its own events included.
Brotli has no magic number and is not recognised: such a stream is counted as unreadable
(no events), and settled as a stream without usage.
"""

from __future__ import annotations

import zlib

import zstandard

MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
#: Bytes needed to tell a coding from its magic number.
SNIFF_BYTES = max(len(m) for m in MAGIC)


def sniff(first_bytes: bytes) -> str | None:
    """The coding the body starts with; "" for none; None while too few bytes are known."""
    for magic, coding in MAGIC.items():
        if first_bytes.startswith(magic):
            return coding
        if len(first_bytes) < len(magic) and magic.startswith(first_bytes):
            return None
    return ""


class CorruptBody(ValueError):
    """The upstream's compressed bytes do not decode."""


class Transcoder:
    """Decodes an upstream's compressed response as it arrives and encodes what the client
    gets in the same coding, flushed at every call (a stream stays a stream)."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding == "gzip":
            self._gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._gzip = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        elif coding == "zstd":
            self._unzstd = zstandard.ZstdDecompressor().decompressobj()
            self._zstd = zstandard.ZstdCompressor().compressobj()
        else:
            raise ValueError(f"no transcoder for {coding!r}")

    def decode(self, data: bytes) -> bytes:
        try:
            if self.coding == "gzip":
                return self._gunzip.decompress(data)
            return self._unzstd.decompress(data)
        except (zlib.error, zstandard.ZstdError) as exc:
            raise CorruptBody(f"{self.coding}: {exc}") from None

    def encode(self, data: bytes, final: bool) -> bytes:
        if self.coding == "gzip":
            return self._gzip.compress(data) + self._gzip.flush(
                zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
        return self._zstd.compress(data) + self._zstd.flush(
            zstandard.COMPRESSOBJ_FLUSH_FINISH if final else zstandard.COMPRESSOBJ_FLUSH_BLOCK)


def decode_whole(data: bytes, coding: str, limit: int) -> bytes:
    """A whole compressed JSON body, at most `limit` bytes decoded (CorruptBody if not)."""
    if coding == "gzip":
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = decoder.decompress(data, limit + 1)
        except zlib.error as exc:
            raise CorruptBody(f"gzip: {exc}") from None
    else:
        try:
            out = zstandard.ZstdDecompressor().stream_reader(data).read(limit + 1)
        except zstandard.ZstdError as exc:
            raise CorruptBody(f"zstd: {exc}") from None
    if len(out) > limit:
        raise CorruptBody(f"decoded body above {limit} bytes")
    return out
