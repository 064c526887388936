"""Azure OpenAI: OpenAI's wire format behind a resource's own host, with the model named
by a deployment the operator created (`TOKENFUSE_AZURE_DEPLOYMENTS` maps it to the model
it runs), and two credentials: `api-key`, or a Microsoft Entra ID bearer token.

Paths (learn.microsoft.com/azure/ai-foundry/openai/reference, checked 2026-12):
`/openai/deployments/{deployment}/chat/completions|completions|embeddings?api-version=…`
(the deployment in the path), and `/openai/responses`, `/openai/v1/…` (the deployment as
the body's `model`).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import parse_qs

from tokenfuse.providers.base import Call, Credential, RequestRejected, endpoint_of
from tokenfuse.providers.openai import OpenAI

#: The model of a deployment the operator did not map: never in a price table, so the
#: unknown-model policy decides (refused by default).
UNMAPPED_PREFIX = "deployment:"


class Azure(OpenAI):
    name = "azure"
    genai_provider = "azure.ai.openai"
    default_upstream = ""  # https://{resource}.openai.azure.com: the operator's own
    sdk_base_path = ""  # openai.AzureOpenAI(azure_endpoint=<gateway>/azure) adds /openai/…
    credentials = (Credential("api-key"), Credential("authorization", "bearer"))
    price_dataset_providers = ("azure", "azure_text")  # azure_text: completions models
    price_namespace = "azure"

    def __init__(self) -> None:
        self.deployments: dict[str, str] = {}

    def model_of_deployment(self, deployment: str) -> str:
        return self.deployments.get(deployment) or f"{UNMAPPED_PREFIX}{deployment}"

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        parts = endpoint.strip("/").split("/")
        if len(parts) >= 4 and parts[:2] == ["openai", "deployments"]:
            deployment, rest = parts[2], "/" + "/".join(parts[3:])
        elif parts[:1] == ["openai"] and len(parts) >= 2:
            named = body.get("model")
            if not isinstance(named, str) or not named:
                raise RequestRejected(400, "missing_model",
                                      "the request body has no 'model' (the deployment)")
            deployment, rest = named, "/" + "/".join(p for p in parts[1:] if p != "v1")
        else:
            raise RequestRejected(404, "unsupported_endpoint",
                                  f"tokenfuse does not price {endpoint}; refused (fail-closed)")
        model = self.model_of_deployment(deployment)
        call = super().parse_request(rest, {**body, "model": model})
        if call.hide_usage_chunk and not _accepts_stream_options(path, parts):
            call.new_body, call.hide_usage_chunk = None, False  # an older api-version: 400
        if call.new_body is not None:  # what tokenfuse rewrites keeps the client's model
            if "model" in body:
                call.new_body["model"] = body["model"]
            else:
                call.new_body.pop("model", None)
        return call

    def caller_key(self, headers: dict[str, str]) -> str | None:
        """`api-key`, else the Entra ID token's identity: a token expires every hour, its
        tenant and object id do not (Azure verifies the signature; a forged token is
        refused there, so it never bills)."""
        key = self.credentials[0].read(headers)
        if key:
            return key
        token = self.credentials[1].read(headers)
        if not token:
            return None
        identity = _entra_identity(token)
        return f"entra:{identity}" if identity else token

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("api-key", secret), ("authorization",)

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        return "/openai/models?api-version=2024-10-21", {"api-key": secret}


#: The first api-version that accepts `stream_options.include_usage` (older ones answer 400:
#: openai/openai-python#1469; supported from 2024-09-01-preview and GA 2024-10-21).
STREAM_OPTIONS_SINCE = "2024-09-01"


def _accepts_stream_options(path: str, parts: list[str]) -> bool:
    if parts[:2] == ["openai", "v1"]:
        return True  # the v1 API: no api-version, OpenAI's current surface
    query = parse_qs(path.partition("?")[2])
    version = (query.get("api-version") or [""])[0]
    return version[:10] >= STREAM_OPTIONS_SINCE


def _entra_identity(token: str) -> str | None:
    """`<tid>/<oid>` of a JWT's claims (not verified: Azure does), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(claims, dict):
        return None
    tid, oid = claims.get("tid"), claims.get("oid")
    if isinstance(tid, str) and isinstance(oid, str) and tid and oid:
        return f"{tid}/{oid}"
    return None
