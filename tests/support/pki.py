"""A private CA and a server certificate for TLS tests (openssl, in a temporary dir)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerCertificate:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server's certificate (signed by the CA)
    key: Path  # its private key


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def server_certificate(directory: Path,
                       names: str = "DNS:localhost,IP:127.0.0.1") -> ServerCertificate:
    """A CA and a certificate for `names` (subjectAltName) signed by it."""
    d = directory
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=tokenfuse test CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    (d / "san.ext").write_text(f"subjectAltName={names}\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
             "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
             "-extfile", str(d / "san.ext"), "-out", str(d / "server.pem"))
    return ServerCertificate(d / "ca.pem", d / "server.pem", d / "server.key")
