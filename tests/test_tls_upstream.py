"""HTTPS upstreams: Envoy sends SNI and verifies the certificate against
TOKENFUSE_CA_BUNDLE; an untrusted certificate means nothing is forwarded."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import openai_client
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack
from tests.support.pki import server_certificate


@pytest.fixture(scope="module")
def tls_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeProvider, Path]]:
    pki = server_certificate(tmp_path_factory.mktemp("pki"), "DNS:localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    provider = FakeProvider(ssl_context=context)
    provider.start()
    yield provider, pki.ca
    provider.stop()


def _stack(provider: FakeProvider, ca_bundle: Path | None) -> Stack:
    env = {"TOKENFUSE_CA_BUNDLE": str(ca_bundle)} if ca_bundle else {}
    return Stack(f"https://localhost:{provider.port}", env).start()


def test_trusted_certificate_works(tls_provider: tuple[FakeProvider, Path],
                                   api_key: str) -> None:
    provider, ca = tls_provider
    stack = _stack(provider, ca)
    try:
        reply = openai_client(stack, api_key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "tls"}])
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        assert provider.records[-1].headers["host"].startswith("localhost")
    finally:
        stack.cleanup()


def test_untrusted_certificate_is_refused(tls_provider: tuple[FakeProvider, Path],
                                          api_key: str) -> None:
    provider, _ = tls_provider
    before = len(provider.records)
    stack = _stack(provider, None)  # system CAs only: our private CA is not among them
    try:
        with pytest.raises(openai.APIStatusError) as raised:
            openai_client(stack, api_key).chat.completions.create(
                model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "x"}])
        assert raised.value.status_code == 503
        assert raised.value.response.json()["error"]["code"] == "upstream_unavailable"
        assert len(provider.records) == before
    finally:
        stack.cleanup()
