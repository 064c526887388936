"""The OpenAI-compatible vendors the vendor tests drive (tests/test_vendors.py and
tests/test_vendor_floods.py, two files so the two test workers share them): the vendors,
their SDK clients, the module stack `vstack` (a price file of the fake's figures, a pool of
two keys per vendor) and the accounting every scenario ends with."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import groq
import openai
import pytest
from mistralai.client import Mistral

from tests.support import fake_vendors
from tests.support.fake_provider import FakeProvider, RequestRecord
from tests.support.harness import Stack, wait_until

AZURE_VERSION = "2024-10-21"  # GA data-plane version (learn.microsoft.com, vendor_facts B.2)


@dataclass(frozen=True)
class Vendor:
    name: str
    model: str
    sdk: str  # "groq", "mistral", "azure" or "openai" (openai.OpenAI at base_path)
    base_path: str = ""  # what openai.OpenAI's base_url adds after /<vendor>
    chat_path: str = ""  # the path the fake receives after /<vendor>


VENDORS = [
    Vendor("groq", "llama-3.3-70b-versatile", "groq", chat_path="/openai/v1/chat/completions"),
    Vendor("mistral", "mistral-small-latest", "mistral", chat_path="/v1/chat/completions"),
    Vendor("azure", "gpt-4o", "azure",
           chat_path="/openai/deployments/prod-4o/chat/completions"),
    Vendor("deepseek", "deepseek-chat", "openai", "", "/chat/completions"),
    Vendor("xai", "grok-3", "openai", "/v1", "/v1/chat/completions"),
    Vendor("openrouter", "meta-llama/llama-3.3-70b-instruct", "openai", "/api/v1",
           "/api/v1/chat/completions"),
    Vendor("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "openai", "/v1",
           "/v1/chat/completions"),
    Vendor("fireworks", "accounts/fireworks/models/llama-v3p3-70b-instruct", "openai",
           "/inference/v1", "/inference/v1/chat/completions"),
    Vendor("cerebras", "llama-3.3-70b", "openai", "/v1", "/v1/chat/completions"),
    Vendor("perplexity", "sonar", "openai", "", "/chat/completions"),
    Vendor("ollama", "llama3.2", "openai", "/v1", "/v1/chat/completions"),
]
BY_NAME = {v.name: v for v in VENDORS}
IDS = [v.name for v in VENDORS]
#: The vendors that report stream usage unasked: tokenfuse must not add stream_options
#: (Mistral and Groq refuse unknown fields; Together does not support it, langchain#24636;
#: the others need no asking). Not asserted either way: DeepSeek and xAI (usage unasked,
#: stream_options accepted), Fireworks (conflicting reports; it accepts the field).
UNASKED = {"groq", "mistral", "openrouter", "together", "cerebras", "perplexity"}
#: The vendors that report stream usage only when asked (OpenAI's rule).
ASKED = {"azure", "ollama"}
#: Prices tokenfuse reads for the vendors that report their own bill: not the fake's.
REPORTED_COST_FILE_PRICES = {
    "openrouter/meta-llama/llama-3.3-70b-instruct": ("0.20", "0.20", "0.60"),
    "perplexity/sonar": ("1.00", "1.00", "1.00"),
}
#: A pool of two keys per vendor (a pool is bound to its provider).
POOLS = {v.name: [f"{v.name}-pool-secret-{i}-{'p' * 24}" for i in range(2)] for v in VENDORS}


def _price_file() -> dict[str, Any]:
    models: dict[str, Any] = {}
    for key, (inp, cached, out) in {**fake_vendors.PRICES, **REPORTED_COST_FILE_PRICES}.items():
        vendor = key.split("/", 1)[0]
        models[key] = {"provider": vendor, "mode": "chat", "input": inp, "output": out,
                       "cache_read": cached, "max_output_tokens": 8192,
                       "context_window": 131072, "reasoning": key == "xai/grok-4"}
    return {"unit": "USD per 1M tokens", "models": models}


def vendor_stack(fake: FakeProvider) -> Iterator[Stack]:
    """The body of each vendor module's `vstack` fixture: a stack with the vendors' price
    file and a two-key pool per vendor."""
    s = Stack(fake.base_url, {"TOKENFUSE_AZURE_DEPLOYMENTS": "prod-4o=gpt-4o",
                              "TOKENFUSE_POOL_COOLDOWN_MS": "1000",
                              "TOKENFUSE_POOL_PROBE_INTERVAL_MS": "300"})
    prices = s.workdir / "vendor_prices.json"
    prices.write_text(json.dumps(_price_file()))
    s.env["TOKENFUSE_PRICES_FILE"] = str(prices)
    for name, secrets in POOLS.items():
        s.add_pool(f"{name}-main", name, "key,label\n" + "".join(
            f"{k},{name}-main-{i}\n" for i, k in enumerate(secrets)))
    fake.azure_deployments["prod-4o"] = "gpt-4o"
    s.start()
    yield s
    s.cleanup()


# ---------------------------------------------------------------- clients


def client(stack: Stack, vendor: Vendor, key: str, api_version: str = AZURE_VERSION) -> Any:
    gw = stack.envoy.base_url
    if vendor.sdk == "groq":
        return groq.Groq(base_url=f"{gw}/groq", api_key=key, max_retries=0, timeout=30)
    if vendor.sdk == "mistral":
        return Mistral(api_key=key, server_url=f"{gw}/mistral", timeout_ms=30_000)
    if vendor.sdk == "azure":
        return openai.AzureOpenAI(azure_endpoint=f"{gw}/azure", api_key=key,
                                  api_version=api_version, azure_deployment="prod-4o",
                                  max_retries=0, timeout=30)
    return openai.OpenAI(base_url=f"{gw}/{vendor.name}{vendor.base_path}", api_key=key,
                         max_retries=0, timeout=30)


def complete(stack: Stack, vendor: Vendor, key: str, content: str,
             headers: dict[str, str] | None = None, model: str | None = None,
             **params: Any) -> Any:
    """One non-streamed chat call with the vendor's SDK; its response."""
    c = client(stack, vendor, key)
    messages = [{"role": "user", "content": content}]
    if vendor.sdk == "mistral":
        return c.chat.complete(model=model or vendor.model, messages=messages,
                               http_headers=headers or {}, **params)
    return c.chat.completions.create(model=model or vendor.model, messages=messages,
                                     extra_headers=headers or {}, **params)


def stream(stack: Stack, vendor: Vendor, key: str, content: str,
           headers: dict[str, str] | None = None, model: str | None = None,
           api_version: str = AZURE_VERSION, **params: Any) -> Iterator[Any]:
    """The chunks of one streamed chat call (OpenAI-shaped chunk objects)."""
    c = client(stack, vendor, key, api_version)
    messages = [{"role": "user", "content": content}]
    if vendor.sdk == "mistral":
        for event in c.chat.stream(model=model or vendor.model, messages=messages,
                                   http_headers=headers or {}, **params):
            yield event.data
        return
    yield from c.chat.completions.create(model=model or vendor.model, messages=messages,
                                         stream=True, extra_headers=headers or {}, **params)


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks
                   if c.choices and isinstance(c.choices[0].delta.content, str))


# ---------------------------------------------------------------- accounting


def records(fake: FakeProvider, key: str) -> list[RequestRecord]:
    return [r for r in list(fake.records) if r.api_key == key and r.method == "POST"]


def one_record(fake: FakeProvider, key: str) -> RequestRecord:
    """The key's one call, once the fake has recorded it (a stream is recorded after its
    last write, which the client may have read first)."""
    wait_until(lambda: len(records(fake, key)) == 1, what="the fake to record the call")
    [record] = records(fake, key)
    return record


def vendor_bill(fake: FakeProvider, key: str, completed_only: bool = True) -> int:
    """Nano-USD the vendor billed this key (fake_vendors.bill_nano of each answered call)."""
    return sum(fake_vendors.bill_nano(r.usage) for r in records(fake, key)
               if r.usage is not None and (r.completed or not completed_only))


def day(stack: Stack, key: str) -> dict:
    doc = json.loads(stack.cli("budget", "status", "--key", key, "--json").stdout)
    return doc["windows"]["day"]


def set_budget(stack: Stack, key: str, nano: int) -> None:
    usd = f"{nano // 10**9}.{nano % 10**9:09d}"
    done = stack.cli("budget", "set", "--key", key, "--daily", usd)
    assert done.returncode == 0, done.stderr


def settled(stack: Stack, fake: FakeProvider, key: str, calls: int) -> dict:
    """The key's day window once the provider has answered `calls` calls and nothing is
    reserved any more."""
    wait_until(lambda: len([r for r in records(fake, key) if r.finished]) >= calls,
               what="the fake to record the calls")
    state: dict = {}

    def idle() -> bool:
        state.update(day(stack, key))
        return state["reserved_nano_usd"] == 0

    wait_until(idle, what="the reservations to settle")
    return state


def assert_invariant(stack: Stack, fake: FakeProvider, key: str, calls: int,
                     limit: int | None = None, exact: bool = True) -> dict:
    """Nothing reserved; spend ≤ limit; spend == the vendor's bill (exact) or covers
    everything it billed, cut streams included."""
    state = settled(stack, fake, key, calls)
    spent = state["spent_nano_usd"]
    if limit is not None:
        assert spent <= limit, (spent, limit)
    if exact:
        assert spent == vendor_bill(fake, key) > 0, (spent, vendor_bill(fake, key))
    else:
        assert vendor_bill(fake, key, completed_only=False) <= spent, (
            vendor_bill(fake, key, completed_only=False), spent)
    return state


def new_key(vendor: Vendor) -> str:
    return f"{vendor.name}-key-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- settlement

def vendor_params(marks: dict[str, Any]) -> list[Any]:
    """Every vendor, with the marks given for some."""
    return [pytest.param(BY_NAME[n], id=n, marks=marks.get(n, ())) for n in IDS]

