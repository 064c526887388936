"""Issue 14's providers (Gemini, Vertex, Bedrock, Cohere) attacked by a caller who controls
the request: its path, query, headers and body. A real finding is an xfail(strict) test
(the measured leak in its reason: the lead fixes and unmarks it); an attack the gateway
refuses is a passing test that documents the defence.

Through the package's stack (every built-in provider pointed at the fake); the bound and
the provider's bill as tests/test_gemini.py computes them (`google_cost`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.adversarial.helpers import day, post, set_daily
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack
from tests.test_gemini import google_cost
from tokenfuse.config import load_settings
from tokenfuse.policy.reservation import upper_bound_nano
from tokenfuse.pricing import PriceTable
from tokenfuse.providers import PROVIDERS
from tokenfuse.providers.base import RequestRejected

PRICES = PriceTable.load()
SETTINGS = load_settings()
JSON = {"content-type": "application/json"}
THINKING_OFF = {"thinkingConfig": {"thinkingBudget": 0}}


def google_key() -> str:
    return "AIzaAdv" + uuid.uuid4().hex


def google_billed(fake: FakeProvider, key: str) -> int:
    """What the fake Google billed this key, completed calls and cut streams alike."""
    assert fake.wait_idle(key, 30)
    return sum(google_cost(r.usage) for r in list(fake.records)
               if r.api_key == key and r.usage is not None)


def gemini_story() -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": "tell me a long story"}]}],
            "generationConfig": dict(THINKING_OFF)}


# ------------------------------------------------------------------ findings (xfail)


@pytest.mark.parametrize("alt", ["alt=SSE", "$alt=sse"])
def test_gemini_alt_spelling_streams_past_the_meter(stack: Stack, fake: FakeProvider,
                                                    alt: str) -> None:
    key, limit = google_key(), 2_000_000
    set_daily(stack, key, limit)
    response = post(stack, "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"
                    f"?{alt}", gemini_story(),
                    {**JSON, "x-goog-api-key": key, "x-fake-output-tokens": "3000"})
    billed, window = google_billed(fake, key), day(stack, key)
    # Either refused, or metered: never billed past the limit, never charged below the bill.
    assert response.status_code != 200 or (
        billed <= limit and window["spent_nano_usd"] >= billed), (billed, window)


def test_vertex_project_number_is_not_a_second_budget(stack: Stack, fake: FakeProvider) -> None:
    token, project, number = ("ya29.adv-" + uuid.uuid4().hex, "proj-" + uuid.uuid4().hex[:8],
                              str(100_000_000_000 + uuid.uuid4().int % 10**11))
    set_daily(stack, f"vertex-project:{project}", 1_000)  # below any call's bound
    body = {"contents": [{"role": "user", "parts": [{"text": "which project pays?"}]}],
            "generationConfig": {"maxOutputTokens": 50}}

    def call(segment: str) -> int:
        path = (f"/vertex/v1/projects/{segment}/locations/us-central1/publishers/google/"
                "models/gemini-2.5-flash:generateContent")
        return post(stack, path, body, {**JSON, "authorization": f"Bearer {token}",
                                        "x-fake-output-tokens": "5"}).status_code

    assert call(project) == 402  # the project's budget holds by id...
    assert call(number) == 400  # ...and by number: refused (one name, one budget)
    assert call(project.upper()) == 402  # a project id in capitals is the same project


def test_bedrock_audio_from_s3_reserves_the_window() -> None:
    path = "/model/amazon.nova-2-lite-v1:0/converse"
    source = {"s3Location": {"uri": "s3://bucket/ten-hours-of-speech.mp3"}}

    def bound(block: dict) -> int:
        body = {"messages": [{"role": "user", "content": [block, {"text": "transcribe"}]}],
                "inferenceConfig": {"maxTokens": 100}}
        result = upper_bound_nano("bedrock", path, body, PRICES, SETTINGS)
        assert result is not None
        return result

    video = bound({"video": {"format": "mp4", "source": source}})
    assert bound({"image": {"format": "png", "source": source}}) == video > 300_000_000
    assert bound({"audio": {"format": "mp3", "source": source}}) >= video


LONG_CONTEXT_BETA = ["context-1m-2025-08-07"]
SONNET_BEDROCK = "anthropic.claude-sonnet-4-5-20250929-v1:0"
#: (provider, path, body) of one Claude call of ~400k cl100k tokens with the 1M-context beta
#: in the body, on each route issue 14 added (Converse, InvokeModel, Vertex rawPredict).
LONG_TEXT = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 50_000
LONG_CONTEXT_CALLS = {
    "converse": ("bedrock", f"/model/{SONNET_BEDROCK}/converse", {
        "messages": [{"role": "user", "content": [{"text": LONG_TEXT}]}],
        "inferenceConfig": {"maxTokens": 100},
        "additionalModelRequestFields": {"anthropic_beta": LONG_CONTEXT_BETA}}),
    "invoke": ("bedrock", f"/model/{SONNET_BEDROCK}/invoke", {
        "anthropic_version": "bedrock-2023-05-31", "anthropic_beta": LONG_CONTEXT_BETA,
        "max_tokens": 100, "messages": [{"role": "user", "content": LONG_TEXT}]}),
    "vertex": ("vertex", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/"
               "claude-sonnet-4-5@20250929:rawPredict", {
                   "anthropic_version": "vertex-2023-10-16", "anthropic_beta": LONG_CONTEXT_BETA,
                   "max_tokens": 100, "messages": [{"role": "user", "content": LONG_TEXT}]}),
}


@pytest.mark.parametrize("route", list(LONG_CONTEXT_CALLS))
def test_claude_long_context_beta_reserves_its_tier(route: str) -> None:
    provider, path, body = LONG_CONTEXT_CALLS[route]
    bound = upper_bound_nano(provider, path, body, PRICES, SETTINGS)
    assert bound is not None
    # A prompt above 200k tokens is billed entirely at the tier: 200k x $6/M at the least.
    assert bound >= 200_000 * 6_000, bound


# ------------------------------------------------------------------ defences (pass)


def test_gemini_alt_sse_lower_case_is_metered(stack: Stack, fake: FakeProvider) -> None:
    """The spelling google-genai sends is cut at the limit (the control for the xfail)."""
    key, limit = google_key(), 2_000_000
    set_daily(stack, key, limit)
    response = post(stack, "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"
                    "?alt=sse", gemini_story(),
                    {**JSON, "x-goog-api-key": key, "x-fake-output-tokens": "3000",
                     "x-fake-chunk-delay-ms": "1"})
    assert response.status_code == 200 and b'"code": 402' in response.content
    assert fake.wait_idle(key, 30)
    window = day(stack, key)
    assert window["spent_nano_usd"] <= limit and window["reserved_nano_usd"] == 0


@pytest.mark.parametrize("query", ["key={k}", "$key={k}", "k%65y={k}", "alt=sse&key={k}"])
def test_gemini_query_key_moved_and_kept_out_of_logs(stack: Stack, fake: FakeProvider,
                                                     query: str) -> None:
    key = google_key()
    since = len(fake.records)
    response = post(stack, "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?"
                    + query.format(k=key), gemini_story(),
                    {**JSON, "x-fake-output-tokens": "5"})
    assert response.status_code == 200, response.text
    assert fake.wait_idle(key, 30)
    (record,) = [r for r in list(fake.records)[since:] if r.api_key == key]
    assert key not in record.query and record.headers.get("x-goog-api-key") == key
    assert day(stack, key)["spent_nano_usd"] == google_billed(fake, key) > 0
    for where, text in (("logs", stack.logs()), ("redis", stack.redis.dump_text()),
                        ("metrics", stack.processor.metrics())):
        assert key not in text, f"a ?key= credential reached the {where}"


@pytest.mark.parametrize("query", ["key={k}&key=", "key=&$key={k}", "KEY={k}"])
def test_gemini_query_key_twice_or_misspelt_is_refused(stack: Stack, fake: FakeProvider,
                                                       query: str) -> None:
    key = google_key()
    response = post(stack, "/gemini/v1beta/models/gemini-2.5-flash:generateContent?"
                    + query.format(k=key), gemini_story(), JSON)
    assert response.status_code in (400, 401), response.text
    assert not [r for r in list(fake.records) if key in (r.api_key or "") or key in (r.query or "")]


def test_gemini_key_in_query_and_another_in_header_is_refused(stack: Stack,
                                                              fake: FakeProvider) -> None:
    left, right = google_key(), google_key()
    response = post(stack, f"/gemini/v1beta/models/gemini-2.5-flash:generateContent?key={left}",
                    gemini_story(), {**JSON, "x-goog-api-key": right})
    assert response.status_code == 400 and response.json()["error"]["status"] == \
        "INVALID_ARGUMENT", response.text
    assert not [r for r in list(fake.records) if r.api_key in (left, right)]


def test_vertex_bearer_and_api_key_together_are_refused(stack: Stack,
                                                        fake: FakeProvider) -> None:
    token, key = "ya29.adv-" + uuid.uuid4().hex, google_key()
    response = post(stack, "/vertex/v1/projects/p-adv/locations/us-central1/publishers/"
                    "google/models/gemini-2.5-flash:generateContent", gemini_story(),
                    {**JSON, "authorization": f"Bearer {token}", "x-goog-api-key": key})
    assert response.status_code == 400, response.text
    assert not [r for r in list(fake.records) if r.api_key in (token, key)]


@pytest.mark.parametrize("path", [
    "/gemini/v1beta/models/gemini-2.5-flash-lite/../gemini-2.5-pro:generateContent",
    "/gemini/v1beta/models/gemini-2.5-flash-lite/%2E%2E/gemini-2.5-pro:generateContent",
    "/gemini/v1beta/models/gemini-2.5-flash-lite:generateContent;/../../models/"
    "gemini-2.5-pro:generateContent",
])
def test_gemini_dot_segments_are_priced_as_the_model_billed(stack: Stack, fake: FakeProvider,
                                                            path: str) -> None:
    """A cheap model in the path, an expensive one after `..`: Envoy normalises the path
    before tokenfuse reads it, so the model charged is the model the provider runs."""
    key = google_key()
    response = post(stack, path, {**gemini_story(), "generationConfig": {
        "maxOutputTokens": 20}}, {**JSON, "x-goog-api-key": key})
    assert response.status_code == 200, response.text
    billed = google_billed(fake, key)
    assert [r.model for r in list(fake.records) if r.api_key == key] == ["gemini-2.5-pro"]
    assert day(stack, key)["spent_nano_usd"] == billed > 0


@pytest.mark.parametrize("path", [
    "/gemini/v1beta/models/gemini-2.5-flash-lite%2F..%2Fgemini-2.5-pro:generateContent",
    "/gemini/v1beta/models/gemini-2.5-flash%3AgenerateContent",
    "/vertex/v1/projects/a/locations/b/publishers/google/models/gemini-2.5-flash:"
    "generateContent/../../../../../publishers/anthropic/models/x:rawPredict",
    "/bedrock/model/amazon.nova-micro-v1%253A0/converse",
    "/bedrock/model/arn:aws:bedrock:us-east-1::foundation-model%2F..%2F"
    "anthropic.claude-opus-4-1-20250805-v1:0/converse",
])
def test_encoded_path_tricks_are_refused(stack: Stack, fake: FakeProvider, path: str) -> None:
    key = google_key()
    response = post(stack, path, gemini_story(), {**JSON, "x-goog-api-key": key,
                                                   "authorization": f"Bearer {key}"})
    assert response.status_code in (400, 404), response.text
    assert not [r for r in list(fake.records) if r.api_key == key]


@pytest.mark.parametrize("model", [
    "amazon.nova-micro-v1%253A0",  # double-encoded: decoded once, '%' is no model id
    "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-micro-v1:0/"
    "anthropic.claude-opus-4-1-20250805-v1:0",
])
def test_bedrock_model_id_confusions_are_refused(model: str) -> None:
    with pytest.raises(RequestRejected):
        PROVIDERS["bedrock"].parse_request(f"/model/{model}/converse", {"messages": []})


def test_bedrock_sigv4_from_the_caller_is_refused(stack: Stack, fake: FakeProvider) -> None:
    marker = "AKIAADVERSARY" + uuid.uuid4().hex[:7].upper()
    since = len(fake.records)
    for headers, path in (
            ({"authorization": f"AWS4-HMAC-SHA256 Credential={marker}/20261201/us-east-1/"
              "bedrock/aws4_request, SignedHeaders=host, Signature=" + "0" * 64}, ""),
            ({}, f"?X-Amz-Credential={marker}&X-Amz-Signature={'0' * 64}")):
        response = post(stack, f"/bedrock/model/amazon.nova-micro-v1:0/converse{path}",
                        {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                        {**JSON, **headers})
        assert response.status_code == 400, response.text
        assert marker not in response.text
    assert not [r for r in list(fake.records)[since:] if marker in str(r.headers)
                or marker in (r.query or "")]


BIG = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 12_500  # ~100k tokens
#: nano-USD: an honest small call fits (its bound: 131,250 to 245,000), 100k more tokens do not
SMALL_LIMIT = 300_000
GEMINI_PRO = "/gemini/v1beta/models/gemini-2.5-pro:generateContent"
HAIKU_BEDROCK = "/bedrock/model/anthropic.claude-haiku-4-5-20251001-v1:0/converse"
ASK = [{"role": "user", "parts": [{"text": "short answer please"}]}]
CAPPED = {"generationConfig": {"maxOutputTokens": 20}}
BEDROCK_ASK = [{"role": "user", "content": [{"text": "short answer please"}]}]
COHERE_ASK = {"model": "command-a-03-2025", "max_tokens": 20, "stream": False,
              "messages": [{"role": "user", "content": "short answer please"}]}
#: name: (path, credential header, body). "control" bodies are the honest call (allowed);
#: every other one hides ~100k tokens in a field the provider bills as input.
HIDDEN_INPUT = {
    "gemini-control": (GEMINI_PRO, "x-goog-api-key", {"contents": ASK, **CAPPED}),
    "gemini-systemInstruction": (GEMINI_PRO, "x-goog-api-key", {
        "contents": ASK, **CAPPED, "systemInstruction": {"parts": [{"text": BIG}]}}),
    "gemini-system_instruction": (GEMINI_PRO, "x-goog-api-key", {
        "contents": ASK, **CAPPED, "system_instruction": {"parts": [{"text": BIG}]}}),
    "gemini-toolConfig": (GEMINI_PRO, "x-goog-api-key", {
        "contents": ASK, **CAPPED, "toolConfig": {"functionCallingConfig": {
            "mode": "ANY", "allowedFunctionNames": [BIG]}}}),
    "gemini-functionResponse": (GEMINI_PRO, "x-goog-api-key", {**CAPPED, "contents": [
        *ASK, {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "f",
                                                         "response": {"result": BIG}}}]}]}),
    "gemini-executableCode": (GEMINI_PRO, "x-goog-api-key", {**CAPPED, "contents": [
        *ASK, {"role": "model", "parts": [{"executableCode": {"language": "PYTHON",
                                                              "code": BIG}}]}, *ASK]}),
    "bedrock-control": (HAIKU_BEDROCK, "authorization", {
        "messages": BEDROCK_ASK, "inferenceConfig": {"maxTokens": 20}}),
    "bedrock-system": (HAIKU_BEDROCK, "authorization", {
        "messages": BEDROCK_ASK, "inferenceConfig": {"maxTokens": 20},
        "system": [{"text": BIG}]}),
    "bedrock-toolConfig": (HAIKU_BEDROCK, "authorization", {
        "messages": BEDROCK_ASK, "inferenceConfig": {"maxTokens": 20},
        "toolConfig": {"tools": [{"toolSpec": {"name": "t", "description": BIG,
                                               "inputSchema": {"json": {}}}}]}}),
    "bedrock-toolResult": (HAIKU_BEDROCK, "authorization", {
        "inferenceConfig": {"maxTokens": 20}, "messages": [
            *BEDROCK_ASK, {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": "u1", "name": "t", "input": {}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "u1", "content": [
                {"json": {"rows": BIG}}]}}]}]}),
    "cohere-control": ("/cohere/v2/chat", "authorization", COHERE_ASK),
    "cohere-documents": ("/cohere/v2/chat", "authorization", {
        **COHERE_ASK, "documents": [{"id": "d", "data": {"text": BIG}}]}),
    "cohere-tools": ("/cohere/v2/chat", "authorization", {
        **COHERE_ASK, "tools": [{"type": "function", "function": {
            "name": "t", "description": BIG, "parameters": {"type": "object"}}}]}),
    "cohere-response_format": ("/cohere/v2/chat", "authorization", {
        **COHERE_ASK, "response_format": {"type": "json_object", "json_schema": {
            "type": "object", "description": BIG}}}),
}


@pytest.mark.parametrize("case", list(HIDDEN_INPUT))
def test_input_in_side_fields_is_counted(stack: Stack, fake: FakeProvider, case: str) -> None:
    """System prompts, tool configs, tool results, RAG documents and schemas are billed as
    input: each is in the bound, so a small budget refuses them before the provider."""
    path, header, body = HIDDEN_INPUT[case]
    key = f"adv14-{uuid.uuid4().hex}"
    set_daily(stack, key, SMALL_LIMIT)
    value = f"Bearer {key}" if header == "authorization" else key
    response = post(stack, path, body, {**JSON, header: value, "x-fake-output-tokens": "5"})
    reached = [r for r in list(fake.records) if r.api_key == key]
    if case.endswith("-control"):
        assert response.status_code == 200, response.text
        assert len(reached) == 1
    else:
        assert response.status_code == 402, response.text
        assert reached == []
    assert fake.wait_idle(key, 30)
    assert day(stack, key)["spent_nano_usd"] <= SMALL_LIMIT


GROUNDING_FEE_NANO = 35_000_000  # gemini-2.5-flash web_search_per_call $0.035 (prices.json)


@pytest.mark.parametrize("tool,method", [("googleSearch", "generateContent"),
                                         ("google_search", "streamGenerateContent?alt=sse")])
def test_gemini_grounding_fee_is_charged(stack: Stack, fake: FakeProvider, tool: str,
                                         method: str) -> None:
    key = google_key()
    response = post(stack, f"/gemini/v1beta/models/gemini-2.5-flash:{method}", {
        "contents": [{"role": "user", "parts": [{"text": "what happened today?"}]}],
        "generationConfig": {"maxOutputTokens": 50, **THINKING_OFF},
        "tools": [{tool: {}}]}, {**JSON, "x-goog-api-key": key, "x-fake-output-tokens": "5"})
    assert response.status_code == 200, response.text
    # Grounding bills a fee per grounded prompt beside the tokens (the fake bills it, and
    # says so in groundingMetadata): reserved before the call, settled from the answer.
    billed = google_billed(fake, key)
    assert billed > GROUNDING_FEE_NANO
    assert day(stack, key)["spent_nano_usd"] == billed


AWS_ACCESS = "AKIAADV" + uuid.uuid4().hex[:13].upper()
AWS_SECRET = "adv/secret+" + uuid.uuid4().hex
AWS_TOKEN = "IQoJadvsession" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def aws_stack(fake: FakeProvider) -> Iterator[Stack]:
    """A stack whose pool holds AWS credentials (the processor reads pools at start)."""
    s = Stack(fake.base_url)
    s.add_pool("adv14-aws", "bedrock",
               "aws_access_key_id,aws_secret_access_key,region,session_token,label\n"
               f"{AWS_ACCESS},{AWS_SECRET},us-east-1,{AWS_TOKEN},adv14-aws\n")
    fake.aws_credentials[AWS_ACCESS] = (AWS_SECRET, AWS_TOKEN)
    s.start()
    yield s
    s.cleanup()


def test_pooled_aws_secrets_stay_out_of_logs_redis_metrics_and_errors(
        aws_stack: Stack, fake: FakeProvider) -> None:
    """A pool of AWS credentials signs each attempt: the secret key, the session token and
    the signatures reach the provider only, also when an attempt is refused upstream."""
    stack = aws_stack
    vkey = stack.cli("vkey", "create", "--name", "adv14-aws", "--pool", "adv14-aws"
                     ).stdout.strip()
    since = len(fake.records)
    body = {"messages": BEDROCK_ASK, "inferenceConfig": {"maxTokens": 20}}
    headers = {**JSON, "authorization": f"Bearer {vkey}", "x-fake-output-tokens": "5"}
    ok = post(stack, HAIKU_BEDROCK, body, headers)
    assert ok.status_code == 200, ok.text
    fake.key_failures[AWS_ACCESS] = (403, 30)
    try:
        refused = post(stack, HAIKU_BEDROCK, body, headers)
    finally:
        del fake.key_failures[AWS_ACCESS]
    assert refused.status_code >= 400
    signed = [r for r in list(fake.records)[since:] if r.api_key == AWS_ACCESS]
    assert len(signed) == 2 and all(
        r.headers["authorization"].startswith("AWS4-HMAC-SHA256") for r in signed)
    signatures = [r.headers["authorization"].rsplit("Signature=", 1)[1] for r in signed]
    haystacks = {"logs": stack.logs(), "redis": stack.redis.dump_text(),
                 "metrics": stack.processor.metrics(), "answers": ok.text + refused.text}
    leaks = [f"the pooled {name} reached the {where}" for where, text in haystacks.items()
             for name, value in (("secret key", AWS_SECRET), ("session token", AWS_TOKEN),
                                 *(("signature", s) for s in signatures)) if value in text]
    assert leaks == []


@pytest.mark.parametrize("where", ["header", "fields", "$fields"])
def test_gemini_response_field_mask_is_refused(stack: Stack, fake: FakeProvider,
                                               where: str) -> None:
    key = google_key()
    query = "" if where == "header" else f"&{where}=usageMetadata"
    extra = {"x-goog-fieldmask": "usageMetadata"} if where == "header" else {}
    response = post(stack, "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent"
                    f"?alt=sse{query}", gemini_story(),
                    {**JSON, **extra, "x-goog-api-key": key, "x-fake-output-tokens": "5"})
    assert fake.wait_idle(key, 30)
    assert response.status_code == 400, response.status_code
