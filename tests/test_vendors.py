"""Every OpenAI-compatible vendor (and Azure OpenAI) through Envoy with the vendor's own
SDK where there is one (groq, mistralai, openai.AzureOpenAI; openai.OpenAI with the
vendor's base URL for the rest): settled exactly, cut at the budget, held to it under a
flood, loops refused, pooled keys failing over. The fake speaks each vendor's dialect
(tests/support/fake_vendors.py) and bills from its own price list; the stack prices from a
price file of the same figures (`<vendor>/<model>`), except where the vendor reports its own
bill (OpenRouter's `cost`, Perplexity's `cost.total_cost`), whose file price differs on
purpose: the settled spend must be the vendor's bill, not the table's.

After every scenario the invariant is checked: nothing stays reserved, the spend is within
the limit, and it equals the vendor's bill for completed calls (covers it for cut ones).
(Eleven vendors through each scenario, hence its length. The floods are in
tests/test_vendor_floods.py; the vendors and the accounting in tests/support/vendors.py.)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import groq
import openai
import pytest
from mistralai.client import errors as mistral_errors

from tests.support import fake_vendors
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tests.support.vendors import (
    ASKED,
    AZURE_VERSION,
    BY_NAME,
    POOLS,
    REPORTED_COST_FILE_PRICES,
    UNASKED,
    Vendor,
    assert_invariant,
    complete,
    day,
    new_key,
    one_record,
    records,
    set_budget,
    stream,
    text_of,
    vendor_bill,
    vendor_params,
    vendor_stack,
)
from tokenfuse.identity import key_id


@pytest.fixture(scope="module")
def vstack(fake: FakeProvider) -> Iterator[Stack]:
    yield from vendor_stack(fake)


@pytest.mark.parametrize("vendor", vendor_params({}))
def test_a_call_without_a_cap_settles_exactly(vstack: Stack, fake: FakeProvider,
                                              vendor: Vendor) -> None:
    """A non-streamed call with no output cap (the SDKs' default): the vendor's path and
    credential, answered, spend == the vendor's bill to the nano-dollar."""
    key = new_key(vendor)
    answer = complete(vstack, vendor, key, f"settle {vendor.name}",
                      {"x-fake-output-tokens": "9", "x-fake-cached-tokens": "3"})
    assert answer.choices[0].message.content
    record = one_record(fake, key)
    assert record.vendor == vendor.name and record.path == vendor.chat_path
    if vendor.name == "azure":
        assert record.headers["api-key"] == key and "authorization" not in record.headers
    assert_invariant(vstack, fake, key, 1)


@pytest.mark.parametrize("vendor", vendor_params({}))
def test_a_capped_call_settles_exactly(vstack: Stack, fake: FakeProvider,
                                       vendor: Vendor) -> None:
    key = new_key(vendor)
    answer = complete(vstack, vendor, key, f"capped {vendor.name}", max_tokens=7)
    assert answer.usage.completion_tokens == 7
    record = one_record(fake, key)
    assert record.json.get("max_tokens") == 7
    assert_invariant(vstack, fake, key, 1)


@pytest.mark.parametrize("vendor", vendor_params({}))
def test_a_stream_settles_exactly(vstack: Stack, fake: FakeProvider, vendor: Vendor) -> None:
    """Streamed: settled from the vendor's own usage wherever it puts it; stream_options
    added only for a vendor that needs asking, and then its usage chunk hidden."""
    key = new_key(vendor)
    chunks = list(stream(vstack, vendor, key, f"stream {vendor.name}", max_tokens=11))
    assert text_of(chunks)
    record = one_record(fake, key)
    assert record.path == vendor.chat_path
    sent = record.json
    if vendor.name in UNASKED:
        assert "stream_options" not in sent  # the vendor reports usage unasked
    if vendor.name in ASKED:
        assert sent["stream_options"] == {"include_usage": True}
        assert not any(c.usage for c in chunks if not c.choices)  # the extra chunk hidden
    assert_invariant(vstack, fake, key, 1)


@pytest.mark.parametrize("vendor", [BY_NAME["azure"], BY_NAME["ollama"], BY_NAME["groq"]],
                         ids=["azure", "ollama", "groq"])
def test_usage_asked_by_the_client_is_shown(vstack: Stack, fake: FakeProvider,
                                            vendor: Vendor) -> None:
    key = new_key(vendor)
    params: dict[str, Any] = {"stream_options": {"include_usage": True}}
    if vendor.sdk == "groq":
        params = {"extra_body": params}
    chunks = list(stream(vstack, vendor, key, "usage please", max_tokens=5, **params))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert_invariant(vstack, fake, key, 1)


# ---------------------------------------------------------------- the budget cut


def _out_nano_per_token(vendor: Vendor, model: str) -> int:
    prices = {**fake_vendors.PRICES, **REPORTED_COST_FILE_PRICES}
    found = prices.get(f"{vendor.name}/{model}") or prices[f"{vendor.name}/*"]
    return fake_vendors._nano_per_million(found[2]) // 1_000_000 or 1


def _cut_message(vendor: Vendor, exc: BaseException) -> str:
    if isinstance(exc, mistral_errors.ResponseValidationError):
        return str(exc.body)  # mistralai has no in-stream error path: the raw event
    return str(exc)


#: Tokens the vendor generates after the cut before it notices the client left (within
#: tokenfuse's grace, TOKENFUSE_STREAM_GRACE_TOKENS = 32): billed, never delivered.
LATE_TOKENS = 8


@pytest.mark.parametrize("vendor", vendor_params({}))
def test_a_stream_is_cut_at_its_budget(vstack: Stack, fake: FakeProvider,
                                       vendor: Vendor) -> None:
    """A stream that would run for 4,000 tokens on a budget worth ~150: the vendor's SDK
    raises with tokenfuse's message; the vendor billed no more than the budget."""
    key = new_key(vendor)
    # Perplexity: tokenfuse reserves its bound of the request fee ($0.014) and learns the
    # real one from the first chunk's cost; sonar-pro's output price makes the rest of the
    # budget worth a few hundred tokens.
    model = "sonar-pro" if vendor.name == "perplexity" else vendor.model
    fee = 14_000_000 if vendor.name == "perplexity" else 0  # tokenfuse's bound of its fee
    budget = fee + 150 * _out_nano_per_token(vendor, model) + 40_000
    set_budget(vstack, key, budget)
    delivered = 0
    raised: BaseException | None = None
    try:
        for chunk in stream(vstack, vendor, key, "write a novel", max_tokens=4000, model=model,
                            headers={"x-fake-chunk-delay-ms": "2",
                                     "x-fake-output-tokens": "4000",
                                     "x-fake-late-tokens": str(LATE_TOKENS)}):
            if chunk.choices and chunk.choices[0].delta.content:
                delivered += 1
    except (openai.APIError, groq.APIError, mistral_errors.ResponseValidationError) as exc:
        raised = exc
    assert raised is not None, f"the stream was not cut ({delivered} chunks)"
    assert "budget exhausted" in _cut_message(vendor, raised), raised
    assert 0 < delivered < 1000
    wait_until(lambda: any(not r.completed and r.finished for r in records(fake, key)),
               what="the vendor to see the disconnect")
    state = assert_invariant(vstack, fake, key, 1, limit=budget, exact=False)
    assert vendor_bill(fake, key, completed_only=False) <= budget
    print(f"\n{vendor.name}: {delivered} chunks, billed "
          f"{vendor_bill(fake, key, completed_only=False)} charged {state['spent_nano_usd']} "
          f"budget {budget}", end=" ")


# ---------------------------------------------------------------- loop guard

LOOP_MESSAGE = "identical request sent 6 times in 60 seconds"


def _refusal(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, mistral_errors.SDKError):
        return exc.status_code, exc.body
    assert isinstance(exc, openai.APIStatusError | groq.APIStatusError), exc
    return exc.status_code, exc.response.text


@pytest.mark.parametrize("vendor", vendor_params({}))
def test_the_sixth_identical_request_is_refused(vstack: Stack, fake: FakeProvider,
                                                vendor: Vendor) -> None:
    key = new_key(vendor)
    for _ in range(5):
        complete(vstack, vendor, key, "Summarise the logs", max_tokens=3)
    with pytest.raises((openai.APIStatusError, groq.APIStatusError,
                        mistral_errors.SDKError)) as raised:
        complete(vstack, vendor, key, "Summarise the logs", max_tokens=3)
    status, body = _refusal(raised.value)
    assert status == 429
    assert json.loads(body)["error"]["code"] == "recursive_loop_detected"
    assert LOOP_MESSAGE in body
    assert len(records(fake, key)) == 5  # the sixth never reached the vendor
    assert_invariant(vstack, fake, key, 5)


# ---------------------------------------------------------------- pools


def _key_rows(stack: Stack, pool: str) -> dict[str, dict]:
    out = json.loads(stack.cli("keys", "list", "--pool", pool, "--json").stdout)
    return {r["id"]: r for r in out}


@pytest.mark.parametrize("vendor", vendor_params({}))
def test_a_pooled_key_fails_over(vstack: Stack, fake: FakeProvider, vendor: Vendor) -> None:
    """The pool's first key answers 429 with the vendor's reset headers: the next key
    serves, the client sees no error, the bill lands on the key that served (and once on
    the gateway key)."""
    pool, secrets = f"{vendor.name}-main", POOLS[vendor.name]
    vkey = vstack.cli("vkey", "create", "--name", f"{vendor.name}-failover", "--pool",
                      pool).stdout.strip()
    assert vkey.startswith("tfk-")
    set_budget(vstack, vkey, 5 * 10**9)
    before = _key_rows(vstack, pool)
    failing, serving = secrets
    fake.key_failures[failing] = (429, 30)
    since = len(fake.records)
    try:
        answers = [complete(vstack, vendor, vkey, f"pooled {vendor.name} {i}", max_tokens=4)
                   for i in range(3)]
    finally:
        del fake.key_failures[failing]
    assert all(a.choices[0].message.content for a in answers)
    sent = [r for r in list(fake.records)[since:] if r.method == "POST"]
    assert [r.status for r in sent if r.api_key == failing] == [429]  # tried once
    served = [r for r in sent if r.api_key == serving]
    assert [r.status for r in served] == [200] * 3
    if vendor.name == "azure":  # the pooled secret goes out as api-key, nothing else
        assert all("authorization" not in r.headers for r in served)
    bill = sum(fake_vendors.bill_nano(r.usage) for r in served)
    kid = key_id(vstack.secret.encode(), serving)
    wait_until(lambda: _key_rows(vstack, pool)[kid]["spend_nano_usd"]
               - before[kid]["spend_nano_usd"] == bill, what="the serving key's spend")
    fid = key_id(vstack.secret.encode(), failing)
    assert _key_rows(vstack, pool)[fid]["spend_nano_usd"] == before[fid]["spend_nano_usd"]
    state = day(vstack, vkey)
    assert state["spent_nano_usd"] == bill and state["reserved_nano_usd"] == 0
    vstack.cli("keys", "enable", "--pool", pool, f"{pool}-0")


# ---------------------------------------------------------------- vendor quirks


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_xai_hidden_reasoning_is_settled(vstack: Stack, fake: FakeProvider,
                                         streamed: bool) -> None:
    """grok-4 reasons unasked and unstreamed; xAI reports the reasoning tokens beside
    completion_tokens (total = prompt + completion + reasoning) and bills them as output."""
    vendor, key = BY_NAME["xai"], new_key(BY_NAME["xai"])
    headers = {"x-fake-reasoning-tokens": "60", "x-fake-output-tokens": "6"}
    if streamed:
        chunks = list(stream(vstack, vendor, key, "think hard", headers, model="grok-4",
                             max_tokens=100))
        assert text_of(chunks)
    else:
        answer = complete(vstack, vendor, key, "think hard", headers, model="grok-4",
                          max_tokens=100)
        usage = answer.usage
        assert usage.completion_tokens == 6
        assert usage.completion_tokens_details.reasoning_tokens == 60
        assert usage.total_tokens == usage.prompt_tokens + 66
    record = one_record(fake, key)
    assert record.usage.output_tokens == 66  # billed: visible and reasoning
    assert_invariant(vstack, fake, key, 1)


def test_deepseek_reasoner_streams_its_reasoning(vstack: Stack, fake: FakeProvider) -> None:
    """deepseek-reasoner streams `reasoning_content` before the answer, billed inside
    completion_tokens; cache hits come as prompt_cache_hit_tokens."""
    vendor, key = BY_NAME["deepseek"], new_key(BY_NAME["deepseek"])
    chunks = list(stream(vstack, vendor, key, "reason", {"x-fake-reasoning-tokens": "20",
                                                         "x-fake-output-tokens": "5",
                                                         "x-fake-cached-tokens": "4"},
                         model="deepseek-reasoner", max_tokens=50))
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                      for c in chunks if c.choices)
    assert thought and text_of(chunks)
    record = one_record(fake, key)
    assert record.usage.output_tokens == 25 and record.usage.cached_input_tokens == 4
    assert_invariant(vstack, fake, key, 1)


def test_openrouter_error_inside_a_200_stream(vstack: Stack, fake: FakeProvider) -> None:
    """OpenRouter reports a failure after the stream started as a chunk with `error` and
    finish_reason "error": the SDK raises it; what was generated is covered."""
    vendor, key = BY_NAME["openrouter"], new_key(BY_NAME["openrouter"])
    with pytest.raises(openai.APIError) as raised:
        list(stream(vstack, vendor, key, "fail midway", {"x-fake-stream-error": "5"},
                    max_tokens=40))
    assert "fake upstream error" in str(raised.value)
    assert_invariant(vstack, fake, key, 1, exact=False)


def test_perplexity_request_fee_is_in_the_spend(vstack: Stack, fake: FakeProvider) -> None:
    """Perplexity bills a fee per request by search context size on top of the tokens;
    its `cost.total_cost` includes it, and so does the spend."""
    vendor, key = BY_NAME["perplexity"], new_key(BY_NAME["perplexity"])
    answer = complete(vstack, vendor, key, "search", max_tokens=5,
                      extra_body={"web_search_options": {"search_context_size": "high"}})
    assert answer.model_extra["citations"]
    record = one_record(fake, key)
    assert record.usage.request_fee_nano == 12_000_000
    state = assert_invariant(vstack, fake, key, 1)
    assert state["spent_nano_usd"] > 12_000_000


def test_azure_stream_on_an_older_api_version(vstack: Stack, fake: FakeProvider) -> None:
    vendor, key = BY_NAME["azure"], new_key(BY_NAME["azure"])
    chunks = list(stream(vstack, vendor, key, "old version", max_tokens=6,
                         api_version="2024-06-01"))
    assert text_of(chunks)
    assert_invariant(vstack, fake, key, 1, exact=False)


def test_azure_entra_token_is_the_caller(vstack: Stack, fake: FakeProvider) -> None:
    """An Entra ID bearer token (no api-key): Azure bills it; tokenfuse charges the
    token's tenant/object identity, so a refreshed token is the same caller."""
    import base64

    def token(n: int) -> str:
        claims = {"tid": "tenant-1", "oid": f"object-{uuid.uuid4().hex}", "n": n}
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"eyJhbGciOiJub25lIn0.{body}.c2ln"

    first = token(1)
    oid = json.loads(base64.urlsafe_b64decode(first.split(".")[1] + "==="))["oid"]
    second = first.replace(first.split(".")[1], base64.urlsafe_b64encode(json.dumps(
        {"tid": "tenant-1", "oid": oid, "n": 2}).encode()).decode().rstrip("="))
    gw = vstack.envoy.base_url
    for tok in (first, second):
        c = openai.AzureOpenAI(azure_endpoint=f"{gw}/azure", azure_ad_token=tok,
                               api_version=AZURE_VERSION, azure_deployment="prod-4o",
                               max_retries=0, timeout=30)
        c.chat.completions.create(model="gpt-4o", max_tokens=3,
                                  messages=[{"role": "user", "content": f"entra {tok[-8:]}"}])
    sent = [r for r in list(fake.records) if r.api_key in (first, second)]
    assert len(sent) == 2 and all("api-key" not in r.headers for r in sent)
    caller = f"entra:tenant-1/{oid}"
    state = day(vstack, caller)
    bill = sum(fake_vendors.bill_nano(r.usage) for r in sent)
    assert state["spent_nano_usd"] == bill > 0 and state["reserved_nano_usd"] == 0


def test_azure_v1_api_with_the_key_as_bearer(vstack: Stack, fake: FakeProvider) -> None:
    """Azure's v1 API: plain openai.OpenAI at `<resource>/openai/v1/`, the deployment as
    the model, the API key as a Bearer token; streamed, settled exactly at the deployment's
    model price."""
    key = new_key(BY_NAME["azure"])
    c = openai.OpenAI(base_url=f"{vstack.envoy.base_url}/azure/openai/v1", api_key=key,
                      max_retries=0, timeout=30)
    chunks = list(c.chat.completions.create(
        model="prod-4o", max_tokens=6, stream=True,
        messages=[{"role": "user", "content": "azure v1"}]))
    assert text_of(chunks)
    record = one_record(fake, key)
    assert record.path == "/openai/v1/chat/completions" and record.model == "gpt-4o"
    assert record.json["model"] == "prod-4o"  # the client's body, as sent
    assert_invariant(vstack, fake, key, 1)


def test_azure_unmapped_deployment_is_refused(vstack: Stack, fake: FakeProvider) -> None:
    """A deployment the operator did not map to a model has no price: refused before it
    reaches Azure (fail-closed)."""
    key = new_key(BY_NAME["azure"])
    c = openai.AzureOpenAI(azure_endpoint=f"{vstack.envoy.base_url}/azure", api_key=key,
                           api_version=AZURE_VERSION, azure_deployment="shadow-deploy",
                           max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as raised:
        c.chat.completions.create(model="gpt-4o", max_tokens=3,
                                  messages=[{"role": "user", "content": "unmapped"}])
    assert 400 <= raised.value.status_code < 500
    assert records(fake, key) == []
    assert day(vstack, key)["spent_nano_usd"] == 0
