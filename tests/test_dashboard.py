"""The dashboard (service/tokenfuse/admin/ui/) in a real headless Chromium, against a real
stack: redis, the processor, Envoy with its admin listener, the fake provider, real calls
with the openai SDK. What it shows is compared with what the fake provider billed and with
the admin API's own JSON; what it does (budgets, kill switch, pool keys) is checked on the
next request through the proxy. Screenshots are kept in test-artifacts/dashboard/.

Longer than most test modules (five scenarios and their helpers), hence its length."""

from __future__ import annotations

import csv
import io
import json
import struct
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from selenium.webdriver.support.ui import Select

from tests.conftest import openai_client
from tests.support.billing import billed_for, requests_for, usage_cost
from tests.support.browser import LAPTOP, PHONE, Browser
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, free_port, wait_until
from tests.support.leaks import assert_no_key_leaked, keys_sent
from tests.support.paced_stream import PacedStream

POOL = "team"
POOL_KEYS = [f"sk-proj-dash-pool-{i}-{'z' * 24}" for i in range(2)]
VIEWS = ("overview", "usage", "pools", "budgets", "events", "audit")
#: Admin tokens and gateway keys the tests made: checked to be nowhere at the end.
SECRETS: set[str] = set()


def usd(nano: int) -> str:
    """What the dashboard prints for nano-USD: exact, at least two decimals (a second,
    independent implementation of app.js's formatUsd)."""
    whole, frac = divmod(nano, 10**9)
    decimals = f"{frac:09d}".rstrip("0").ljust(2, "0")
    return f"${whole:,}.{decimals}"


def plain_usd(nano: int) -> str:
    """nano-USD as a person types it into the budget editor ("0.000123450" style)."""
    return f"{nano // 10**9}.{nano % 10**9:09d}"


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    """A fake provider of this module's own: its records are this module's traffic only,
    so the dashboard's totals can be compared with all it billed."""
    provider = FakeProvider()
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def dash(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"TOKENFUSE_ADMIN_PORT": str(free_port()),
                              "LOOP_GUARD_MAX_HITS": "0", "LOOP_GUARD_NEAR_DUPLICATE": "0"})
    s.add_pool(POOL, "openai",
               "key,label,weight\n" + "".join(f"{k},team-{i},{i + 1}\n"
                                              for i, k in enumerate(POOL_KEYS)))
    s.start()
    yield s
    s.cleanup()


@pytest.fixture(scope="module")
def admin_url(dash: Stack) -> str:
    address = dash.env.get("TOKENFUSE_ADMIN_ADDRESS", "127.0.0.1")
    return f"http://{address}:{dash.env['TOKENFUSE_ADMIN_PORT']}"


def create_token(stack: Stack, name: str, role: str) -> str:
    token = stack.admin_token(name, role)
    SECRETS.add(token)
    return token


@pytest.fixture(scope="module")
def viewer_token(dash: Stack) -> str:
    return create_token(dash, "dash-viewer", "viewer")


@pytest.fixture(scope="module")
def operator_token(dash: Stack) -> str:
    return create_token(dash, "dash-operator", "operator")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser(LAPTOP)
    yield b
    b.close()


@pytest.fixture
def page(browser: Browser, admin_url: str) -> Browser:
    """The dashboard freshly loaded, signed out (a clean session storage), laptop-sized."""
    browser.resize(*LAPTOP)
    browser.driver.get(admin_url + "/ui/app.css")  # same origin: clear its session storage
    browser.js("sessionStorage.clear()")
    browser.open(admin_url + "/")
    browser.clear_downloads()
    return browser


# ------------------------------------------------------------------------------- helpers

def admin_call(url: str, token: str, method: str, path: str,
               body: Any = None) -> tuple[int, Any]:
    """The admin API with a real HTTP client: (status, JSON document or text)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            status, raw, kind = resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get("content-type", "")
    text = raw.decode()
    return status, (json.loads(text) if "json" in kind and text else text)


def admin_get(url: str, token: str, path: str) -> Any:
    status, doc = admin_call(url, token, "GET", path)
    assert status == 200, (path, status, doc)
    return doc


def key_id_of(stack: Stack, api_key: str) -> str:
    """The key id `budget status --json` prints (what the dashboard and the API name)."""
    done = stack.cli("budget", "status", "--key", api_key, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["key_id"]


def day_spent(url: str, token: str, key_id: str) -> int:
    budget = admin_get(url, token, f"/api/v1/budgets/{key_id}")
    return int(budget.get("windows", {}).get("day", {}).get("spent_nano_usd", "0"))


def settled(url: str, token: str, key_id: str, nano: int) -> None:
    """Wait until the key's day spend is `nano` (settlement ends after the response)."""
    wait_until(lambda: day_spent(url, token, key_id) == nano, timeout=20,
               what=f"{key_id} settled at {nano} nano-USD")


def ask(stack: Stack, key: str, text: str, **extra: Any) -> Any:
    return openai_client(stack, key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=40, messages=[{"role": "user", "content": text}],
        **extra)


def sign_in(b: Browser, token: str, role: str) -> None:
    b.type_into("token-input", token)
    b.by_id("login-button").click()
    b.wait_for(lambda: b.attr("#whoami", "data-role") == role, what=f"signed in as {role}")


def show(b: Browser, view: str) -> None:
    b.click(f'[data-tab="{view}"]')
    b.wait_for(lambda: b.visible(f"view-{view}"), what=f"the {view} view")


def choose(b: Browser, select_id: str, value: str) -> None:
    Select(b.by_id(select_id)).select_by_value(value)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


# ----------------------------------------------------------------------------- scenarios

def test_viewer_sees_what_the_provider_billed(page: Browser, dash: Stack, fake: FakeProvider,
                                              admin_url: str, viewer_token: str) -> None:
    """Spend on the overview, the per-key budgets, the usage table and the spend chart
    equal, to the nano-dollar, what the fake provider billed for a known workload; a viewer
    cannot act; a wrong token is told so."""
    api_key = "sk-test-dash-" + uuid.uuid4().hex
    key_id = key_id_of(dash, api_key)
    for i in range(3):
        ask(dash, api_key, f"question {i} about the dashboard",
            extra_headers={"x-fake-output-tokens": str(7 + 5 * i)})
    ask(dash, api_key, "one with a cached prompt prefix",
        extra_headers={"x-fake-cached-tokens": "5", "x-fake-output-tokens": "11"})
    stream = openai_client(dash, api_key).chat.completions.create(
        model="gpt-4o-mini", max_tokens=30, stream=True,
        messages=[{"role": "user", "content": "and a streamed answer"}])
    assert sum(1 for _ in stream) > 1
    billed = billed_for(fake, api_key)
    assert billed > 0 and requests_for(fake, api_key) == 5
    records = [r for r in list(fake.records) if r.usage is not None]
    assert all(r.completed for r in records), "this test runs on complete calls only"
    billed_all = sum(usage_cost(r.usage) for r in records)
    settled(admin_url, viewer_token, key_id, billed)

    # A wrong token: a clear error, no dashboard.
    page.type_into("token-input", "tfa-not-a-real-token")
    page.by_id("login-button").click()
    page.wait_for(lambda: page.visible("login-error"), what="the login error")
    assert "not accepted" in page.text("#login-error")
    assert page.attr("#login-error", "data-status") == "401"
    assert not page.visible("app")
    page.shot("login-wrong-token")

    sign_in(page, viewer_token, "viewer")
    assert page.visible("role-banner")
    # Overview: today's spend (every key) and this key's row against its budgets.
    page.wait_for(lambda: page.attr("#ov-spend-today", "data-nano") == str(billed_all),
                  what="today's spend on the overview")
    assert page.text("#ov-spend-today") == usd(billed_all)
    assert int(page.attr("#ov-spend-month", "data-nano")) >= billed_all
    row = f'#ov-budgets tr[data-key-id="{key_id}"] td[data-window="day"]'
    page.wait_for(lambda: page.attr(row, "data-spent-nano") == str(billed),
                  what="the key's row on the overview")
    assert page.text(row + " .money") == usd(billed)
    page.shot("viewer-overview")

    # Usage: the table by model (one model used), then by key; the spend chart's total.
    show(page, "usage")
    model_row = '#usage-table tbody tr[data-group="gpt-4o-mini"]'
    page.wait_for(lambda: page.attr(model_row + ' [data-field="spend"] .money', "data-nano")
                  == str(billed_all), what="the usage table by model")
    usages = [r.usage for r in records]
    assert page.text(model_row + ' [data-field="output"]') == \
        f"{sum(u.output_tokens for u in usages):,}"
    assert page.text(model_row + ' [data-field="cache_read"]') == \
        f"{sum(u.cached_input_tokens for u in usages):,}"
    assert page.text(model_row + ' [data-field="requests"]') == f"{len(records):,}"
    page.wait_for(lambda: page.attr("#chart-spend", "data-total") == str(billed_all),
                  what="the spend chart's total")
    assert page.css('#chart-spend rect[data-group="gpt-4o-mini"]')
    choose(page, "usage-group", "key")
    page.wait_for(lambda: page.js(
        "return [...document.querySelectorAll('#usage-table tbody tr')].some(r =>"
        " arguments[0].startsWith(r.dataset.group) && r.dataset.group.length >= 8 &&"
        " r.querySelector('[data-field=spend] .money').dataset.nano === arguments[1])",
        key_id, str(billed)), what="the key's row in the usage table by key")
    page.full_shot("viewer-usage")

    # A viewer's controls are disabled; one forced anyway gets the API's 403, shown.
    show(page, "budgets")
    controls = page.js("return [...document.querySelectorAll('[data-op]')]"
                       ".map(e => [e.id || e.dataset.testid, e.disabled])")
    assert controls and all(disabled for _, disabled in controls), controls
    page.type_into("budget-key", key_id)
    page.js("document.getElementById('kill-button').disabled = false")
    page.by_id("kill-button").click()
    page.wait_for(lambda: page.visible("api-error"), what="the 403 shown")
    assert page.attr("#api-error", "data-status") == "403"
    assert "403" in page.text("#budget-result")
    assert admin_get(admin_url, viewer_token, f"/api/v1/budgets/{key_id}").get("killed") \
        in (None, False)
    page.shot("viewer-forced-kill-403")


def test_operator_sets_a_budget_and_the_next_request_is_refused(
        page: Browser, dash: Stack, fake: FakeProvider, admin_url: str,
        operator_token: str) -> None:
    api_key = "sk-test-dash-" + uuid.uuid4().hex
    key_id = key_id_of(dash, api_key)
    ask(dash, api_key, "spend a little first")
    spent = billed_for(fake, api_key)
    settled(admin_url, operator_token, key_id, spent)

    sign_in(page, operator_token, "operator")
    assert not page.visible("role-banner")
    show(page, "budgets")
    page.type_into("budget-key", key_id)
    page.by_id("budget-load").click()
    page.wait_for(lambda: page.attr("#budget-detail", "data-key-id") == key_id,
                  what="the key loaded in the editor")
    assert page.attr('#budget-detail tr[data-window="day"]', "data-spent-nano") == str(spent)

    # Bad input is refused in the page; nothing is sent.
    page.type_into("limit-day", "1.0000000001")
    page.by_id("budget-save").click()
    page.wait_for(lambda: page.attr("#budget-result", "data-state") == "error",
                  what="the bad amount refused")
    assert "9 decimals" in page.text("#budget-result")
    day = admin_get(admin_url, operator_token, f"/api/v1/budgets/{key_id}")["windows"]["day"]
    assert day.get("limit_nano_usd") is None

    # A daily limit of exactly what was spent (typed in USD, to the nano-dollar).
    page.type_into("limit-day", plain_usd(spent))
    page.by_id("budget-save").click()
    page.wait_for(lambda: page.attr("#budget-result", "data-state") == "ok"
                  and page.attr('#budget-detail tr[data-window="day"]', "data-limit-nano")
                  == str(spent), what="the limit saved")
    day = admin_get(admin_url, operator_token, f"/api/v1/budgets/{key_id}")["windows"]["day"]
    assert day["limit_nano_usd"] == str(spent)
    page.shot("operator-budget-set")

    before = requests_for(fake, api_key)
    with pytest.raises(openai.APIStatusError) as refused:
        ask(dash, api_key, "one more, over the limit")
    assert refused.value.status_code == 402
    assert requests_for(fake, api_key) == before  # refused before the provider

    # The refusal in the feed of blocks, the change in the audit trail.
    show(page, "events")
    page.wait_for(lambda: page.js(
        "return [...document.querySelectorAll('#events-table tbody tr')].some(r =>"
        " r.dataset.kind.startsWith('budget') && r.textContent.includes(arguments[0]))",
        key_id[:8]), what="the budget refusal in the feed")
    show(page, "audit")
    page.wait_for(lambda: page.js(
        "return [...document.querySelectorAll('#audit-table tbody tr')].some(r =>"
        " r.dataset.action === 'budget.set' && r.dataset.actor === 'dash-operator'"
        " && r.textContent.includes(arguments[0]))", key_id[:8]),
        what="budget.set in the audit trail")
    page.full_shot("operator-audit")


def test_operator_kills_a_key_during_a_stream(page: Browser, dash: Stack, fake: FakeProvider,
                                              admin_url: str, operator_token: str) -> None:
    api_key = "sk-test-dash-" + uuid.uuid4().hex
    key_id = key_id_of(dash, api_key)
    sign_in(page, operator_token, "operator")
    consumer = PacedStream(dash, api_key)
    try:
        assert consumer.started.wait(20) and consumer.error is None
        page.wait_for(lambda: int(page.attr("#ov-live", "data-count") or 0) >= 1,
                      what="the live stream on the overview")
        show(page, "budgets")
        page.type_into("budget-key", key_id)
        at_kill = consumer.chunks
        page.by_id("kill-button").click()
        consumer.thread.join(20)
        assert not consumer.thread.is_alive(), "the stream did not end"
    finally:
        consumer.thread.join(60)
    assert consumer.error is not None and "kill switch" in consumer.error.message
    assert consumer.chunks - at_kill < 100  # ended on the kill, not at its 3,000 tokens
    page.wait_for(lambda: page.attr("#budget-detail", "data-killed") == "true",
                  what="the key shown killed")
    page.shot("operator-killed")
    with pytest.raises(openai.APIStatusError) as refused:
        ask(dash, api_key, "after the kill")
    assert refused.value.status_code == 402
    assert refused.value.response.json()["error"]["code"] == "killed"

    page.by_id("lift-button").click()
    page.wait_for(lambda: page.attr("#budget-detail", "data-killed") == "false",
                  what="the kill lifted")
    assert ask(dash, api_key, "after the lift").choices[0].message.content
    show(page, "events")
    page.wait_for(lambda: page.js(
        "return [...document.querySelectorAll('#events-table tbody tr')]"
        ".some(r => /kill|cut/.test(r.dataset.kind))"), what="the kill in the feed")


def test_exports_match_the_api(page: Browser, dash: Stack, fake: FakeProvider,
                               admin_url: str, operator_token: str) -> None:
    api_key = "sk-test-dash-" + uuid.uuid4().hex
    ask(dash, api_key, "something to export")
    settled(admin_url, operator_token, key_id_of(dash, api_key), billed_for(fake, api_key))
    sign_in(page, operator_token, "operator")

    # Usage export, CSV then JSON: the bytes the API serves, the figures of its series.
    show(page, "usage")
    choose(page, "series-resolution", "hour")
    choose(page, "series-group", "model")
    page.wait_for(lambda: page.attr("#chart-spend", "data-total") not in (None, "0"),
                  what="the chart drawn")
    query = "resolution=hour&group_by=model"
    page.by_id("export-usage").click()
    got_csv = page.downloaded("tokenfuse-usage-hour-model.csv").decode()
    assert got_csv == admin_get(admin_url, operator_token,
                                f"/api/v1/usage/export?format=csv&{query}")
    series = admin_get(admin_url, operator_token, f"/api/v1/usage/series?{query}")
    from_json = {(int(b["start_ms"]), g["key"]): int(g["totals"].get("spend_nano_usd", "0"))
                 for b in series.get("buckets", []) for g in b.get("groups", [])}
    rows = list(csv.DictReader(io.StringIO(got_csv)))
    assert rows, got_csv
    spend_col = next(c for c in rows[0] if "spend" in c)
    time_col = "bucket_start_ms"
    group_col = next(c for c in rows[0] if c in ("group", "key", "model"))
    from_csv = {(int(r[time_col]), r[group_col]): int(r[spend_col] or 0) for r in rows}
    assert {k: v for k, v in from_csv.items() if v} == {k: v for k, v in from_json.items() if v}
    choose(page, "export-format", "json")
    page.by_id("export-usage").click()
    got_json = json.loads(page.downloaded("tokenfuse-usage-hour-model.json"))
    status, api_json = admin_call(admin_url, operator_token, "GET",
                                  f"/api/v1/usage/export?format=json&{query}")
    assert status == 200
    assert got_json == (api_json if not isinstance(api_json, str) else json.loads(api_json))

    # Pool export: ids, labels and weights as the API lists them; never the keys.
    show(page, "pools")
    page.click(f'button[data-testid="pool-export"][data-pool="{POOL}"]')
    pool_csv = page.downloaded(f"{POOL}.csv").decode()
    assert not any(secret in pool_csv for secret in POOL_KEYS)
    exported = {r["id"]: r for r in csv.DictReader(io.StringIO(pool_csv))}
    listed = next(p for p in admin_get(admin_url, operator_token, "/api/v1/pools")["pools"]
                  if p["name"] == POOL)
    assert set(exported) == {k["id"] for k in listed["keys"]}
    for key in listed["keys"]:
        assert exported[key["id"]]["label"] == key["label"]
        assert int(exported[key["id"]]["weight"]) == int(key.get("weight", 0))
    page.shot("operator-pools")


def test_operator_imports_and_disables_pool_keys(page: Browser, dash: Stack, admin_url: str,
                                                 operator_token: str, tmp_path: Path) -> None:
    sign_in(page, operator_token, "operator")
    show(page, "pools")
    pool = "dash-import-" + uuid.uuid4().hex[:6]
    secrets = [f"sk-proj-imported-{i}-{uuid.uuid4().hex}" for i in range(3)]
    # The third label is markup: the page must show it as text, not run it.
    labels = ["imp-0", "imp-1", '<img src=x id=xss onerror="window.pwned=1">']
    text = io.StringIO()
    csv.writer(text).writerows([["key", "label", "weight"],
                                *([s, label, 1] for s, label in zip(secrets, labels, strict=True))])
    good = tmp_path / "keys.csv"
    good.write_text(text.getvalue())
    page.type_into("import-pool", pool)
    page.type_into("import-provider", "openai")
    page.by_id("import-file").send_keys(str(good))
    page.by_id("import-button").click()
    page.wait_for(lambda: page.attr("#import-result", "data-state") is not None,
                  what="the import answered")
    assert page.attr("#import-result", "data-state") == "ok", page.text("#import-result")
    page.wait_for(lambda: len(page.css(f'tr[data-pool="{pool}"]')) == 3,
                  what="the imported keys listed")
    assert not any(s in page.js("return document.body.innerHTML") for s in secrets)
    assert page.css("#xss") == [] and page.js("return window.pwned") is None
    assert page.js("return [...document.querySelectorAll('tr[data-pool]')]"
                   ".some(r => r.cells[0].textContent === arguments[0])", labels[2])

    # Malformed CSV: a clear 4xx shown, the pool unchanged.
    bad = tmp_path / "bad.csv"
    bad.write_text("this is, not\n\"a pool csv")
    page.by_id("import-file").send_keys(str(bad))
    page.by_id("import-button").click()
    page.wait_for(lambda: page.attr("#import-result", "data-state") == "error",
                  what="the malformed CSV refused")
    assert page.attr("#api-error", "data-status").startswith("4")
    listed = next(p for p in admin_get(admin_url, operator_token, "/api/v1/pools")["pools"]
                  if p["name"] == pool)
    assert sorted(k["label"] for k in listed["keys"]) == sorted(labels)

    # Disable one key from its row, then enable it again.
    row = f'tr[data-pool="{pool}"][data-label="imp-0"]'
    page.click(row + ' button[data-testid="key-disable"]')
    page.wait_for(lambda: page.attr(row, "data-enabled") == "false", what="the key disabled")
    key = next(k for p in admin_get(admin_url, operator_token, "/api/v1/pools")["pools"]
               if p["name"] == pool for k in p["keys"] if k["label"] == "imp-0")
    assert not key.get("enabled", False)
    page.shot("operator-pool-key-disabled")
    page.click(row + ' button[data-testid="key-enable"]')
    page.wait_for(lambda: page.attr(row, "data-enabled") == "true", what="the key enabled")


def test_gateway_key_names_label_their_spend(page: Browser, dash: Stack, fake: FakeProvider,
                                             admin_url: str, operator_token: str) -> None:
    """A gateway key's spend is shown under its name (its id is the key id budgets and
    usage use), and by pool: both equal what the provider billed the pool's keys."""
    status, created = admin_call(admin_url, operator_token, "POST", "/api/v1/gateway-keys",
                                 {"name": "dash-app", "pool": POOL})
    assert status == 200, created
    secret, vid = created["secret"], created["key"]["id"]
    SECRETS.add(secret)
    before = sum(billed_for(fake, k) for k in POOL_KEYS)
    ask(dash, secret, "through the team pool")
    billed = sum(billed_for(fake, k) for k in POOL_KEYS) - before
    assert billed > 0
    settled(admin_url, operator_token, vid, billed)

    sign_in(page, operator_token, "operator")
    row = f'#ov-budgets tr[data-key-id="{vid}"]'
    page.wait_for(lambda: page.text(row + " .key-name") == "dash-app",
                  what="the gateway key's name on the overview")
    assert page.attr(row + ' td[data-window="day"]', "data-spent-nano") == str(billed)
    show(page, "usage")
    choose(page, "usage-group", "pool")
    pool_row = f'#usage-table tbody tr[data-group="{POOL}"] [data-field="spend"] .money'
    page.wait_for(lambda: page.attr(pool_row, "data-nano") is not None, what="usage by pool")
    assert int(page.attr(pool_row, "data-nano")) == before + billed
    choose(page, "usage-group", "key")
    page.wait_for(lambda: page.js(
        "return [...document.querySelectorAll('#usage-table tbody tr')].some(r =>"
        " arguments[0].startsWith(r.dataset.group) && r.dataset.group.length >= 8 &&"
        " r.querySelector('.key-name')?.textContent === 'dash-app')", vid),
        what="the gateway key's name in the usage table by key")
    page.shot("operator-gateway-key-names")


@pytest.mark.parametrize("size", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_readable_on_a_laptop_and_a_phone(page: Browser, dash: Stack, admin_url: str,
                                          operator_token: str, size: tuple[int, int]) -> None:
    """Every view fits the screen's width (no sideways scrolling of the page: wide tables
    scroll inside their card); screenshots of each are kept."""
    ask(dash, "sk-test-dash-" + uuid.uuid4().hex, "so that there is something to show")
    sign_in(page, operator_token, "operator")
    page.resize(*size)
    name = "laptop" if size == LAPTOP else "phone"
    loaded = {"overview": "#ov-spend-today[data-nano]", "usage": "#chart-spend[data-buckets]",
              "pools": '#pools [data-testid="pool-table"]',
              **{v: f"#{v}-table tbody tr, #{v}-empty:not([hidden])"
                 for v in ("budgets", "events", "audit")}}
    for view in VIEWS:
        show(page, view)
        page.wait_for(lambda selector=loaded[view]: page.css(selector),
                      what=f"the {view} view's data")
        overflow = page.js("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{view} is {overflow}px wider than a {name} screen"
        shot = page.full_shot(f"{name}-{view}")
        assert png_size(shot)[0] == size[0]
    assert page.shot(f"{name}-viewport").stat().st_size > 10_000
    # No script error and no content-security-policy violation on the way.
    broken = [m for m in page.console_errors() if "Uncaught" in m or "Security Policy" in m]
    assert broken == []


def test_money_in_the_page_is_exact(page: Browser) -> None:
    """The page's own USD formatting and parsing (BigInt, no floats) agree with integer
    arithmetic, past 2^53 too; amounts it cannot represent exactly are refused."""
    values = [0, 1, 9, 10, 999_999_999, 10**9, 1_234_567_891, 2**53 + 1, 2**63 - 1,
              5_000_000_000, 123_450]
    shown = page.js("return arguments[0].map(v => window.tokenfuseMoney.formatUsd(v))",
                    [str(v) for v in values])
    assert shown == [usd(v) for v in values]
    typed = page.js("return arguments[0].map(t => window.tokenfuseMoney.parseUsd(t))",
                    [plain_usd(v) for v in values] + ["5", "5.5", "$1,000.25", ".000000001"])
    assert typed == [str(v) for v in values] + ["5000000000", "5500000000", "1000250000000", "1"]
    refused = page.js("return arguments[0].map(t => { try { window.tokenfuseMoney.parseUsd(t);"
                      " return 'accepted' } catch (e) { return 'refused' } })",
                      ["-1", "1.0000000001", "1e3", "abc", "", ".", "0x10", "1.2.3"])
    assert set(refused) == {"refused"}


def test_a_revoked_token_ends_the_session(page: Browser, dash: Stack) -> None:
    """Signed in, then the token is revoked (CLI): the next refresh's 401 sends the page
    back to the sign-in form with the reason; the token is gone from session storage."""
    token = create_token(dash, "dash-short-lived", "viewer")
    sign_in(page, token, "viewer")
    assert page.js("return sessionStorage.length") == 1
    done = dash.cli("admin", "token", "revoke", "dash-short-lived")
    assert done.returncode == 0, done.stderr
    page.wait_for(lambda: page.visible("login-view"), what="back at the sign-in form")
    assert "no longer accepted" in page.text("#login-error")
    assert not page.visible("app")
    assert page.js("return sessionStorage.length") == 0


def test_zz_no_key_or_token_left_behind(dash: Stack, fake: FakeProvider) -> None:
    """Last in this module: no caller key, pool key, gateway key or admin token the tests
    used is in Redis, the logs or the metrics."""
    assert len(SECRETS) >= 3
    assert_no_key_leaked(dash, keys_sent(fake) | set(POOL_KEYS) | SECRETS)
