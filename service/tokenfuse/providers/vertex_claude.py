"""Claude on Vertex AI: Anthropic's Messages API behind Google's publisher-model paths.

The Vertex route (`/vertex/`, Gemini's) hands `…/publishers/anthropic/…` paths to this
provider (`for_path`). Everything but the envelope is Anthropic's, so this is the
Anthropic provider with the model read from the path. Facts from anthropic 2.15.0
(`anthropic/lib/vertex/_client.py`, checked against a fake server) and
platform.claude.com/docs/en/build-with-claude/claude-on-vertex-ai:

- `POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:rawPredict`
  (`:streamRawPredict` to stream; `v1beta1` too; `l` may be `global`, `us`, `eu`); the
  model is in the path with its `@version` (`claude-sonnet-4-5@20250929`), popped from the
  body by the SDK (a `;` in it is sent as `%3B`);
- the body is Anthropic's without `model`, with `anthropic_version` in it (the docs say
  `vertex-2023-10-16`, SDK 2.15.0 sends `2026-10-21`: never validated here);
- the token counter is `…/publishers/anthropic/models/count-tokens:rawPredict`, model in
  the BODY (free);
- identity: `Authorization: Bearer <Google OAuth access token>`, passed through (Google
  authenticates it);
- a failed stream ends with Anthropic's `event: error` (AnthropicVertex raises
  APIStatusError on it; a Google-shape `data: {"error": …}` is silently ignored by it).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from tokenfuse.providers.anthropic import Anthropic
from tokenfuse.providers.base import Call, Credential, RequestRejected, endpoint_of, unsupported
from tokenfuse.providers.gemini import (
    QUERY_CREDENTIALS,
    vertex_caller,
    vertex_identity_refusal,
)

#: `/{v1|v1beta1}/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:{verb}`
_PATH = re.compile(r"^/v1(?:beta1)?/projects/[^/]+/locations/[^/]+/publishers/anthropic/"
                   r"models/(?P<model>[^/:]+):(?P<verb>rawPredict|streamRawPredict)$")
#: The model segment of the token counter.
COUNT_TOKENS = "count-tokens"
#: Where Claude models are in the price dataset (keys `vertex_ai/claude-…@ver`).
_DATASET_PREFIX = "vertex_ai"


class VertexClaude(Anthropic):
    name = "vertex"
    genai_provider = "gcp.vertex_ai"
    default_upstream = "https://aiplatform.googleapis.com"  # the global endpoint
    sdk_base_path = "/v1"  # AnthropicVertex(base_url=<gateway>/vertex/v1)
    credentials = (Credential("authorization", "bearer"),)
    # A Google `?key=` / `?access_token=` is read and moved into its header, as on the
    # Gemini paths of the route (never left in the path).
    query_credentials = QUERY_CREDENTIALS
    # `vertex_ai` so that the dataset's `vertex_ai/claude-…` keys read as prefixed ones
    # (price_refresh.table_key): its other (non-Claude) models are not this provider's.
    price_dataset_providers = ("vertex_ai-anthropic_models", _DATASET_PREFIX)
    price_namespace = "vertex"

    def price_model_id(self, model: str, mode: str, prefixed: bool) -> str | None:
        """`claude-sonnet-4-5@20250929` for the dataset's `vertex_ai/claude-sonnet-4-5@…`."""
        return model if model.startswith("claude-") and mode == "chat" else None

    def price_ids(self, model: str) -> tuple[tuple[str | None, str], ...]:
        return ((self.price_namespace, model),)

    def parse_request(self, path: str, body: dict[str, Any]) -> Call:
        endpoint = endpoint_of(path)
        match = _PATH.match(endpoint)
        if match is None:
            raise unsupported(endpoint)
        model, verb = unquote(match["model"]), match["verb"]
        if model == COUNT_TOKENS:
            if verb != "rawPredict":
                raise unsupported(endpoint)
            return super().parse_request("/v1/messages/count_tokens", body)
        if "model" in body:
            raise RequestRejected(400, "invalid_request",
                                  "the model is in the path on Vertex AI, not in the body")
        call = super().parse_request("/v1/messages", {**body, "model": model})
        call.stream = call.stream or verb == "streamRawPredict"
        if call.new_body is not None:
            call.new_body.pop("model", None)
        return call

    def caller_key(self, headers: dict[str, str]) -> str | None:
        """The project of the path, as on the route's Gemini paths (`vertex_caller`)."""
        return vertex_caller(self, headers)

    def header_refusal(self, headers: dict[str, str]) -> RequestRejected | None:
        return vertex_identity_refusal(self, headers)

    def pooled_credential(self, secret: str) -> tuple[tuple[str, str], tuple[str, ...]]:
        return ("authorization", f"Bearer {secret}"), ("x-api-key",)

    def probe(self, secret: str) -> tuple[str, dict[str, str]]:
        # Model Garden's publisher model list (free, no project in the path).
        return "/v1beta1/publishers/anthropic/models", {"authorization": f"Bearer {secret}"}
