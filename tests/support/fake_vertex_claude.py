"""The fake provider's Claude on Vertex AI: `/vertex/v1[beta1]/projects/{p}/locations/{l}/
publishers/anthropic/models/{model}:rawPredict|streamRawPredict` and
`…/models/count-tokens:rawPredict` (the test stack points TOKENFUSE_UPSTREAM_VERTEX at
`<fake>/vertex`). `FakeProvider` hands these requests here; the answer, its bill, its
stream (hidden thinking, cache writes, compression, a client that goes away) are the fake
Anthropic's own (`FakeProvider._messages`), as on Vertex, where Claude's body and stream
are Anthropic's.

Vertex's envelope, as anthropic 2.15.0's AnthropicVertex sends it and the docs describe
it (platform.claude.com/docs/en/build-with-claude/claude-on-vertex-ai):

- the model is in the path (`claude-sonnet-4-5@20250929`), not in the body; the counter
  takes it in the body;
- `anthropic_version` is in the body (any value; no `anthropic-version` header);
- identity `Authorization: Bearer <OAuth token>`; none: Google's 401
  (`{"error": {"code": 401, "status": "UNAUTHENTICATED", ...}}`); a failing key's 429 is
  Google's quota error shape (`RESOURCE_EXHAUSTED`, cline/cline #651).
"""

from __future__ import annotations

import re

from aiohttp import web

from tests.support import fake_provider as fp

PREFIX = "/vertex/"
_PATH = re.compile(r"^/vertex/v1(?:beta1)?/projects/[^/]+/locations/[^/]+/publishers/"
                   r"anthropic/models/(?P<model>[^/:]+):(?P<verb>rawPredict|streamRawPredict)$")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def is_vertex_claude(path: str) -> bool:
    return path.startswith(PREFIX) and "/publishers/anthropic/" in path


def google_error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    """Google's front-end error (auth, quota, unknown paths)."""
    body = {"error": {"code": status, "message": message,
                      "status": _STATUS.get(status, "UNKNOWN")}}
    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
    return web.json_response(body, status=status, headers=headers)


def _billing_model(model: str) -> str:
    """`claude-sonnet-4-5@20250929` as the fake Anthropic knows it (date suffix)."""
    return model.replace("@", "-")


async def dispatch(fake: fp.FakeProvider, request: web.Request, record: fp.RequestRecord
                   ) -> tuple[web.StreamResponse, fp.Usage | None, bool]:
    record.body = await request.read()
    encoding = request.headers.get("content-encoding", "")
    if encoding:
        record.body = fp.decompress_body(record.body, encoding)
    match = _PATH.match(request.path)
    key = record.api_key
    if not key or key in fake.revoked_keys:
        return google_error(401, "Request had invalid authentication credentials. Expected "
                                 "OAuth 2 access token, login cookie or other valid "
                                 "authentication credential."), None, False
    failure = fake.key_failures.get(key)
    if failure is not None:
        return google_error(failure[0], "Quota exceeded for aiplatform.googleapis.com/"
                                        "online_prediction_requests_per_base_model",
                            failure[1]), None, False
    if request.method == "GET" and request.path.endswith("/publishers/anthropic/models"):
        # Model Garden's publisher model list (the pool's probe).
        return web.json_response({"publisherModels": [
            {"name": "publishers/anthropic/models/claude-haiku-4-5"}]}), None, False
    if match is None:
        return google_error(404, f"The requested URL {request.path} was not found."), \
            None, False
    data = fake._peek(record)
    if not isinstance(data, dict):
        return fp.error_response("anthropic", 400, "We could not parse the JSON body of "
                                                    "your request."), None, False
    model, verb = match["model"], match["verb"]
    counting = model == "count-tokens"
    if not counting and "model" in data:
        return fp.error_response("anthropic", 400, "model: Extra inputs are not permitted"), \
            None, False
    if "anthropic_version" not in data:
        return fp.error_response("anthropic", 400, "anthropic_version: Field required"), \
            None, False
    if counting:
        model = data.get("model") if isinstance(data.get("model"), str) else ""
    body = {k: v for k, v in data.items() if k != "anthropic_version"}
    body["model"] = _billing_model(model)
    record.model = model
    record.stream = verb == "streamRawPredict" or data.get("stream") is True
    controls = fp.Controls.from_headers(request.headers, fake.default_output_tokens)
    endpoint = "/v1/messages/count_tokens" if counting else "/v1/messages"
    try:
        bill = fp.bill_for("anthropic", endpoint, body, controls, dict(fake.contexts))
    except fp.ProviderError as exc:
        return fp.error_response("anthropic", exc.status, exc.message), None, False
    record.bill = bill
    if counting:
        return web.json_response({"input_tokens": bill.prompt_tokens}), None, False
    return await fake._messages(request, record, bill)
