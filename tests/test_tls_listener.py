"""HTTPS on the listener (TOKENFUSE_TLS_CERT_FILE / TOKENFUSE_TLS_KEY_FILE): clients that
send keys only over TLS (boto3's Bedrock API keys) reach the gateway; the decision and the
settlement are the same as over plain HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.billing import billed_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tests.support.pki import ServerCertificate, server_certificate
from tokenfuse.config import ConfigError, load_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ServerCertificate:
    return server_certificate(tmp_path_factory.mktemp("listener-pki"))


@pytest.fixture(scope="module")
def tls_stack(fake: FakeProvider, pki: ServerCertificate) -> Iterator[Stack]:
    stack = Stack(fake.base_url, {"TOKENFUSE_TLS_CERT_FILE": str(pki.cert),
                                      "TOKENFUSE_TLS_KEY_FILE": str(pki.key)}).start()
    yield stack
    stack.cleanup()


def test_https_call_is_decided_and_settled(tls_stack: Stack, pki: ServerCertificate,
                                           fake: FakeProvider, api_key: str) -> None:
    assert tls_stack.envoy.base_url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(pki.ca))
    client = openai.OpenAI(base_url=tls_stack.envoy.base_url + "/openai/v1", api_key=api_key,
                           max_retries=0, http_client=httpx.Client(verify=trust))
    reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                           messages=[{"role": "user", "content": "over tls"}])
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    wait_until(lambda: billed_for(fake, api_key) > 0, what="the fake to bill the call")

    def day() -> dict:
        status = tls_stack.cli("budget", "status", "--key", api_key, "--json")
        return json.loads(status.stdout)["windows"]["day"]

    wait_until(lambda: day()["reserved_nano_usd"] == 0, what="the call to settle")
    assert day()["spent_nano_usd"] == billed_for(fake, api_key)


def test_plain_http_on_the_tls_port_gets_nothing_through(tls_stack: Stack,
                                                         fake: FakeProvider,
                                                         api_key: str) -> None:
    before = len(fake.records)
    conn = http.client.HTTPConnection("127.0.0.1", tls_stack.envoy.port, timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("POST", "/openai/v1/chat/completions", body=b"{}",
                     headers={"authorization": f"Bearer {api_key}"})
        conn.getresponse().read()
    conn.close()
    assert len(fake.records) == before


def test_untrusted_client_cannot_complete_the_handshake(tls_stack: Stack) -> None:
    context = ssl.create_default_context()  # system CAs: the private CA is not among them
    raw = socket.create_connection(("127.0.0.1", tls_stack.envoy.port), timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(raw, server_hostname="localhost")
    raw.close()


def test_certificate_without_key_is_a_config_error(pki: ServerCertificate,
                                                   tmp_path_factory: pytest.TempPathFactory
                                                   ) -> None:
    state = str(tmp_path_factory.mktemp("state"))
    with pytest.raises(ConfigError, match="are a pair"):
        load_settings({"TOKENFUSE_STATE_DIR": state, "TOKENFUSE_TLS_CERT_FILE": str(pki.cert)})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings({"TOKENFUSE_STATE_DIR": state, "TOKENFUSE_TLS_CERT_FILE": "/nonexistent",
                       "TOKENFUSE_TLS_KEY_FILE": str(pki.key)})
