"""The admin API as JSON through Envoy's admin listener (gRPC-JSON transcoder), with a real
HTTP client against a real Redis: tokens and roles (401/403), every operation, its effect
on the proxy (a budget set here refuses the next call; a kill ends it; a revoked gateway
key stops working), the audit trail, bad input (4xx, nothing changed), the listener's
isolation (no provider route, no other gRPC service of the processor's)."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest

from tests.conftest import openai_client
from tests.support.billing import billed_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import Stack, wait_until
from tokenfuse.admin.v1 import admin_pb2, admin_pb2_grpc

POOL_KEYS = [f"sk-proj-adminpool-{i}-{'z' * 24}" for i in range(2)]
OPERATOR_CALLS = [  # (method, path, body) for every operator action; {k} = a key id
    ("PUT", "/api/v1/budgets/{k}", {"limits_nano_usd": {"day": "1"}}),
    ("DELETE", "/api/v1/budgets/{k}", None),
    ("POST", "/api/v1/budgets/{k}/kill", {}),
    ("POST", "/api/v1/budgets/{k}/lift", {}),
    ("POST", "/api/v1/gateway-keys", {"name": "x", "pool": "admin-pool"}),
    ("DELETE", "/api/v1/gateway-keys/" + "0" * 32, None),
    ("POST", "/api/v1/pools/admin-pool/import", {"provider": "openai", "csv": "key\nsk-x\n"}),
    ("POST", "/api/v1/pools/admin-pool/keys/a0/disable", {}),
    ("POST", "/api/v1/pools/admin-pool/keys/a0/enable", {}),
]
VIEWER_CALLS = ["/api/v1/whoami", "/api/v1/health", "/api/v1/budgets", "/api/v1/budgets/{k}",
                "/api/v1/gateway-keys", "/api/v1/pools", "/api/v1/pools/admin-pool/export",
                "/api/v1/overview", "/api/v1/usage?window=day&group_by=model",
                "/api/v1/usage/series?resolution=hour", "/api/v1/usage/export?format=csv",
                "/api/v1/events", "/api/v1/audit"]


@pytest.fixture(scope="module")
def admin_stack(fake: FakeProvider) -> Iterator[Stack]:
    s = Stack(fake.base_url, {"LOOP_GUARD_MAX_HITS": "0", "LOOP_GUARD_NEAR_DUPLICATE": "0",
                              "TOKENFUSE_ADMIN_MAX_UPLOAD_BYTES": "65536"})
    s.add_pool("admin-pool", "openai", "key,label\n" + "".join(
        f"{k},a{i}\n" for i, k in enumerate(POOL_KEYS)))
    s.start()
    yield s
    s.cleanup()


def _token(stack: Stack, name: str, role: str) -> str:
    done = stack.cli("admin", "token", "create", "--name", name, "--role", role)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("tfadm_") and "shown once" in done.stderr
    return token


@pytest.fixture(scope="module")
def operator(admin_stack: Stack) -> str:
    return _token(admin_stack, "ops-alice", "operator")


@pytest.fixture(scope="module")
def viewer(admin_stack: Stack) -> str:
    return _token(admin_stack, "view-bob", "viewer")


class Admin:
    def __init__(self, stack: Stack, token: str | None) -> None:
        self._url = stack.envoy.admin_url
        self._headers = {"authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return httpx.request(method, self._url + path, headers=self._headers,
                             json=body, timeout=30)

    def ok(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        answer = self.call(method, path, body)
        assert answer.status_code == 200, answer.text
        return answer.json()


def _caller(stack: Stack, key: str) -> str:
    done = stack.cli("budget", "status", "--key", key, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["key_id"]


def _spend_some(stack: Stack, key: str) -> None:
    client = openai_client(stack, key)
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=16,
                                   messages=[{"role": "user", "content": "hi " + key}])


def _budget(admin: Admin, k: str) -> dict[str, Any]:
    """A key's budget without its minute window (which may roll over between two reads)."""
    doc = admin.ok("GET", f"/api/v1/budgets/{k}")
    doc["windows"].pop("minute")
    return doc


def _ints(doc: Any) -> Any:
    """The API's JSON with int64 strings as ints (proto3 JSON writes int64 as strings)."""
    if isinstance(doc, dict):
        return {k: _ints(v) for k, v in doc.items()}
    if isinstance(doc, str) and doc.isdigit():
        return int(doc)
    return doc


# ------------------------------------------------------------------ tokens and roles

def test_no_or_bad_token_is_401_on_every_call(admin_stack: Stack, api_key: str) -> None:
    _spend_some(admin_stack, api_key)
    k = _caller(admin_stack, api_key)
    bogus = "tfadm_" + "0" * 16 + "_" + "A" * 43
    for token in (None, "nonsense", bogus):
        admin = Admin(admin_stack, token)
        for path in VIEWER_CALLS:
            answer = admin.call("GET", path.format(k=k))
            assert answer.status_code == 401, (path, answer.text)
            assert answer.json()["code"] == 16
        for method, path, body in OPERATOR_CALLS:
            assert admin.call(method, path.format(k=k), body).status_code == 401
    basic = httpx.get(admin_stack.envoy.admin_url + "/api/v1/whoami",
                      headers={"authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401


def test_viewer_reads_but_every_action_is_403_and_changes_nothing(
        admin_stack: Stack, viewer: str, api_key: str) -> None:
    _spend_some(admin_stack, api_key)
    k = _caller(admin_stack, api_key)
    admin = Admin(admin_stack, viewer)
    assert admin.ok("GET", "/api/v1/whoami") == {"name": "view-bob", "role": "viewer"}
    for path in VIEWER_CALLS:
        assert admin.call("GET", path.format(k=k)).status_code == 200, path
    before = _budget(admin, k)
    pools_before = admin.ok("GET", "/api/v1/pools")
    audit_before = admin.ok("GET", "/api/v1/audit")
    for method, path, body in OPERATOR_CALLS:
        answer = admin.call(method, path.format(k=k), body)
        assert answer.status_code == 403, (path, answer.text)
        assert "operator role" in answer.json()["message"]
    assert _budget(admin, k) == before
    assert admin.ok("GET", "/api/v1/pools") == pools_before
    assert admin.ok("GET", "/api/v1/audit") == audit_before


def test_revoked_token_is_refused(admin_stack: Stack) -> None:
    token = _token(admin_stack, "short-lived", "operator")
    assert Admin(admin_stack, token).call("GET", "/api/v1/whoami").status_code == 200
    done = admin_stack.cli("admin", "token", "revoke", "short-lived")
    assert done.returncode == 0, done.stderr
    assert Admin(admin_stack, token).call("GET", "/api/v1/whoami").status_code == 401
    listed = admin_stack.cli("admin", "token", "list").stdout
    assert "short-lived" not in listed


def test_token_names_and_roles_are_checked(admin_stack: Stack, operator: str) -> None:
    again = admin_stack.cli("admin", "token", "create", "--name", "ops-alice", "--role",
                            "viewer")
    assert again.returncode == 2 and "exists" in again.stderr
    bad = admin_stack.cli("admin", "token", "create", "--name", "x", "--role", "root")
    assert bad.returncode == 2


def test_tokens_are_stored_only_as_keyed_hashes(admin_stack: Stack, operator: str,
                                                viewer: str) -> None:
    assert admin_stack.redis is not None
    dump = admin_stack.redis.dump_text()
    assert "tfadm_" in operator
    for token in (operator, viewer):
        assert token not in dump and token.rsplit("_", 1)[1] not in dump
        assert token not in admin_stack.logs()


# --------------------------------------------------------------------------- budgets

def test_get_budget_is_what_budget_status_json_shows(admin_stack: Stack, viewer: str,
                                                     fake: FakeProvider, api_key: str) -> None:
    _spend_some(admin_stack, api_key)
    cli_doc = json.loads(admin_stack.cli("budget", "status", "--key", api_key,
                                         "--json").stdout)
    api_doc = Admin(admin_stack, viewer).ok("GET", f"/api/v1/budgets/{cli_doc['key_id']}")
    for doc in (api_doc, cli_doc):
        doc["windows"].pop("minute")  # may roll over between the two reads
    assert _ints(api_doc["windows"]) == {
        w: {k: v for k, v in doc.items() if v is not None}
        | {"resets_at": doc["resets_at"] or ""} for w, doc in cli_doc["windows"].items()}
    assert {k: api_doc[k] for k in ("key_id", "key_id_prefix", "killed", "limits")} == {
        k: cli_doc[k] for k in ("key_id", "key_id_prefix", "killed", "limits")}
    assert int(api_doc["windows"]["day"]["spent_nano_usd"]) == billed_for(fake, api_key) > 0
    listed = Admin(admin_stack, viewer).ok("GET", "/api/v1/budgets")["budgets"]
    assert cli_doc["key_id"] in {b["key_id"] for b in listed}


def test_budget_set_through_the_api_refuses_the_next_call(
        admin_stack: Stack, operator: str, api_key: str, fake: FakeProvider) -> None:
    _spend_some(admin_stack, api_key)
    k = _caller(admin_stack, api_key)
    admin = Admin(admin_stack, operator)
    spent = int(admin.ok("GET", f"/api/v1/budgets/{k}")["windows"]["day"]["spent_nano_usd"])
    doc = admin.ok("PUT", f"/api/v1/budgets/{k}", {"limits_nano_usd": {"day": str(spent)}})
    assert doc["limits"] == "own" and doc["windows"]["day"]["limit_nano_usd"] == str(spent)
    cli_doc = json.loads(admin_stack.cli("budget", "status", "--key", api_key,
                                         "--json").stdout)
    assert cli_doc["windows"]["day"]["limit_nano_usd"] == spent
    billed = billed_for(fake, api_key)
    with pytest.raises(openai.APIStatusError) as refused:
        _spend_some(admin_stack, api_key)
    assert refused.value.status_code == 402
    assert billed_for(fake, api_key) == billed  # nothing reached the provider
    cleared = admin.ok("DELETE", f"/api/v1/budgets/{k}")
    assert cleared["limits"] == "defaults"
    _spend_some(admin_stack, api_key)  # defaults (none in tests) apply again


def test_kill_and_lift_through_the_api(admin_stack: Stack, operator: str, api_key: str,
                                       fake: FakeProvider) -> None:
    _spend_some(admin_stack, api_key)
    k = _caller(admin_stack, api_key)
    admin = Admin(admin_stack, operator)
    assert admin.ok("POST", f"/api/v1/budgets/{k}/kill", {})["killed"] is True
    billed = billed_for(fake, api_key)
    with pytest.raises(openai.APIStatusError) as refused:
        _spend_some(admin_stack, api_key)
    assert refused.value.status_code == 402 and "killed" in str(refused.value.body)
    assert billed_for(fake, api_key) == billed
    assert admin.ok("POST", f"/api/v1/budgets/{k}/lift", {})["killed"] is False
    _spend_some(admin_stack, api_key)
    events = admin.ok("GET", "/api/v1/events?kind=key.killed")["events"]
    assert any(e["key_id_prefix"] == k[:8] and e["detail"]["by"] == "ops-alice"
               for e in events)


def test_every_operator_action_is_audited_with_before_and_after(
        admin_stack: Stack, operator: str, api_key: str) -> None:
    _spend_some(admin_stack, api_key)
    k = _caller(admin_stack, api_key)
    admin = Admin(admin_stack, operator)
    admin.ok("PUT", f"/api/v1/budgets/{k}", {"limits_nano_usd": {"day": "5000000000"}})
    admin.ok("PUT", f"/api/v1/budgets/{k}", {"limits_nano_usd": {"day": "7000000000",
                                                                  "month": "9000000000"}})
    admin.ok("POST", f"/api/v1/budgets/{k}/kill", {})
    admin.ok("POST", f"/api/v1/budgets/{k}/lift", {})
    admin_stack.cli("budget", "clear", "--key", api_key)
    entries = [e for e in admin.ok("GET", "/api/v1/audit?limit=20")["entries"]
               if e["target"] == k]
    assert [(e["actor"], e["action"]) for e in entries] == [
        ("cli", "budget.clear"), ("ops-alice", "key.lift"), ("ops-alice", "key.kill"),
        ("ops-alice", "budget.set"), ("ops-alice", "budget.set")]
    second_set = entries[3]
    assert second_set["before"]["limits_nano_usd"] == {"day": "5000000000"}
    assert second_set["after"]["limits_nano_usd"] == {"day": "7000000000",
                                                      "month": "9000000000"}
    assert entries[2]["before"]["killed"] is False and entries[2]["after"]["killed"] is True
    assert all(int(e["at_ms"]) > 0 and e["role"] == "operator" for e in entries)
    cli_audit = json.loads(admin_stack.cli("audit", "--json", "--limit", "5").stdout)
    assert [e["id"] for e in cli_audit] == [e["id"] for e in admin.ok(
        "GET", "/api/v1/audit?limit=5")["entries"]]


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/api/v1/budgets/" + "0" * 32, None, 404),
    ("GET", "/api/v1/budgets/NOT-A-KEY", None, 400),
    ("PUT", "/api/v1/budgets/{k}", {"limits_nano_usd": {"daily": "5"}}, 400),
    ("PUT", "/api/v1/budgets/{k}", {"limits_nano_usd": {"day": "-5"}}, 400),
    ("PUT", "/api/v1/budgets/{k}", {"limits_nano_usd": {}}, 400),
    ("PUT", "/api/v1/budgets/{k}", {"limits_nano_usd": {"day": "1.5"}}, 400),
    ("PUT", "/api/v1/budgets/{k}", {"limits_nano_usd": {"day": "10000000000000000000"}}, 400),
    ("PUT", "/api/v1/budgets/" + "0" * 32, {"limits_nano_usd": {"day": "5"}}, 404),
    ("POST", "/api/v1/budgets/" + "0" * 32 + "/kill", {}, 404),
    ("GET", "/api/v1/usage?window=year", None, 400),
    ("GET", "/api/v1/usage?group_by=colour", None, 400),
    ("GET", "/api/v1/usage?window=day&surprise=1", None, 400),
    ("GET", "/api/v1/usage/series?resolution=second", None, 400),
    ("GET", "/api/v1/usage/series?resolution=minute&start_ms=60000&end_ms=600000000", None, 400),
    ("GET", "/api/v1/usage/export?format=xml", None, 400),
    ("DELETE", "/api/v1/gateway-keys/" + "0" * 32, None, 404),
    ("POST", "/api/v1/gateway-keys", {"name": "x", "pool": "no-such-pool"}, 400),
    ("POST", "/api/v1/pools/admin-pool/keys/nobody/disable", {}, 404),
    ("GET", "/api/v1/pools/no-such-pool/export", None, 404),
    ("GET", "/api/v1/nothing-here", None, 404),
])
def test_bad_input_is_a_clear_4xx_and_changes_nothing(
        admin_stack: Stack, operator: str, api_key: str, method: str, path: str, body: Any,
        status: int) -> None:
    _spend_some(admin_stack, api_key)
    k = _caller(admin_stack, api_key)
    admin = Admin(admin_stack, operator)
    before = _budget(admin, k)
    audit_before = admin.ok("GET", "/api/v1/audit?limit=1")
    answer = admin.call(method, path.format(k=k), body)
    assert answer.status_code == status, answer.text
    assert answer.text.strip()  # a message, not an empty body
    assert _budget(admin, k) == before
    assert admin.ok("GET", "/api/v1/audit?limit=1") == audit_before


def test_malformed_json_body_is_400(admin_stack: Stack, operator: str, api_key: str) -> None:
    _spend_some(admin_stack, api_key)
    k = _caller(admin_stack, api_key)
    for raw in (b"{not json", b'{"limits_nano_usd": {"day": "5"}, "limits_nano_usd": 3}',
                b"\x1f\x8b\x08\x00garbage"):
        answer = httpx.put(f"{admin_stack.envoy.admin_url}/api/v1/budgets/{k}", content=raw,
                           headers={"authorization": f"Bearer {operator}",
                                    "content-type": "application/json"})
        assert answer.status_code == 400, (raw, answer.text)
    assert Admin(admin_stack, operator).ok("GET", f"/api/v1/budgets/{k}")["limits"] == "defaults"


# ----------------------------------------------------------------- gateway keys, pools

def test_gateway_key_created_used_and_revoked(admin_stack: Stack, operator: str,
                                              viewer: str, fake: FakeProvider) -> None:
    admin = Admin(admin_stack, operator)
    created = admin.ok("POST", "/api/v1/gateway-keys", {"name": "team-a", "pool": "admin-pool"})
    secret, vid = created["secret"], created["key"]["id"]
    assert secret.startswith("tfk-") and created["key"]["pool"] == "admin-pool"
    listed = Admin(admin_stack, viewer).ok("GET", "/api/v1/gateway-keys")["keys"]
    assert {"id": vid, "name": "team-a", "pool": "admin-pool"}.items() <= next(
        r for r in listed if r["id"] == vid).items()
    assert secret not in json.dumps(listed)
    _spend_some(admin_stack, secret)
    assert billed_for(fake, POOL_KEYS[0]) + billed_for(fake, POOL_KEYS[1]) > 0
    assert admin.ok("DELETE", f"/api/v1/gateway-keys/{vid}")["id"] == vid

    def refused() -> bool:
        try:
            _spend_some(admin_stack, secret)
        except openai.AuthenticationError:
            return True
        return False
    wait_until(refused, timeout=15, what="the revoked gateway key refused (401)")
    assert admin.call("DELETE", f"/api/v1/gateway-keys/{vid}").status_code == 404


def test_pool_import_through_the_api_serves_calls(admin_stack: Stack, operator: str,
                                                  viewer: str, fake: FakeProvider) -> None:
    admin = Admin(admin_stack, operator)
    new_key = "sk-proj-imported-" + os.urandom(12).hex()
    pool = admin.ok("POST", "/api/v1/pools/api-pool/import", {
        "provider": "openai", "csv": f"key,label,weight\n{new_key},imported,3\n"})
    assert pool["provider"] == "openai"
    assert [(k["label"], k["weight"], k["state"]) for k in pool["keys"]] == [
        ("imported", 3, "closed")]
    path = admin_stack.workdir / "pools" / "api-pool.csv"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and new_key in path.read_text()
    assert new_key not in json.dumps(pool)
    vkey = admin.ok("POST", "/api/v1/gateway-keys", {"name": "api-pool-user",
                                                     "pool": "api-pool"})["secret"]
    _spend_some(admin_stack, vkey)  # the processor re-read its pool files
    assert billed_for(fake, new_key) > 0
    export = Admin(admin_stack, viewer).call("GET", "/api/v1/pools/api-pool/export")
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    rows = export.text.splitlines()
    assert rows[0] == "pool,id,label,weight,enabled,state,requests,tokens,spend_nano_usd"
    assert rows[1].startswith("api-pool,") and ",imported,3,True,closed,1," in rows[1]
    assert new_key not in export.text


def test_pool_key_disable_and_enable(admin_stack: Stack, operator: str) -> None:
    admin = Admin(admin_stack, operator)
    off = admin.ok("POST", "/api/v1/pools/admin-pool/keys/a1/disable", {})
    assert off["enabled"] is False and off["state"] == "disabled" and off["label"] == "a1"
    listed = {k["label"]: k for p in admin.ok("GET", "/api/v1/pools")["pools"]
              if p["name"] == "admin-pool" for k in p["keys"]}
    assert listed["a1"]["enabled"] is False and listed["a0"]["enabled"] is True
    on = admin.ok("POST", "/api/v1/pools/admin-pool/keys/a1/enable", {})
    assert on["enabled"] is True and on["state"] == "closed"
    kinds = [(e["kind"], e["detail"].get("state")) for e in admin.ok(
        "GET", "/api/v1/events?kind=pool_key.state&limit=2")["events"]]
    assert kinds == [("pool_key.state", "closed"), ("pool_key.state", "disabled")]
    audit = admin.ok("GET", "/api/v1/audit?limit=2")["entries"]
    assert [e["action"] for e in audit] == ["pool_key.enable", "pool_key.disable"]


@pytest.mark.parametrize(("csv_text", "provider", "why"), [
    ("label\nno-key-column\n", "openai", "'key' column"),
    ("key,weight\nsk-a,0\n", "openai", "weight"),
    ("key\n", "openai", "no key"),
    ("key\nsk-a\n", "no-such-provider", "provider"),
    ("key\nsk-a\n", "anthropic", "holds openai keys"),
])
def test_malformed_pool_csv_is_400_and_changes_nothing(
        admin_stack: Stack, operator: str, csv_text: str, provider: str, why: str) -> None:
    admin = Admin(admin_stack, operator)
    path = admin_stack.workdir / "pools" / "admin-pool.csv"
    file_before, pools_before = path.read_text(), admin.ok("GET", "/api/v1/pools")
    answer = admin.call("POST", "/api/v1/pools/admin-pool/import",
                        {"provider": provider, "csv": csv_text})
    assert answer.status_code == 400 and why in answer.json()["message"], answer.text
    assert path.read_text() == file_before
    assert admin.ok("GET", "/api/v1/pools") == pools_before


def test_oversized_upload_is_413_and_changes_nothing(admin_stack: Stack,
                                                     operator: str) -> None:
    admin = Admin(admin_stack, operator)
    pools_before = admin.ok("GET", "/api/v1/pools")
    csv_text = "key\n" + "".join(f"sk-big-{i:08d}\n" for i in range(8000))  # ~130 KB > 64 KB
    answer = admin.call("POST", "/api/v1/pools/big-pool/import",
                        {"provider": "openai", "csv": csv_text})
    assert answer.status_code == 413, answer.text
    assert admin.ok("GET", "/api/v1/pools") == pools_before
    assert not (admin_stack.workdir / "pools" / "big-pool.csv").exists()


def test_pool_name_cannot_leave_the_pools_directory(admin_stack: Stack,
                                                    operator: str) -> None:
    answer = Admin(admin_stack, operator).call(
        "POST", "/api/v1/pools/..%2F..%2Fescape/import", {"provider": "openai",
                                                          "csv": "key\nsk-a\n"})
    assert answer.status_code in (400, 404), answer.text
    assert not (admin_stack.workdir / "escape.csv").exists()
    assert not (admin_stack.workdir.parent / "escape.csv").exists()


# ------------------------------------------------------------------- the listener

def test_admin_listener_is_only_the_admin_service(admin_stack: Stack, operator: str) -> None:
    """No provider route on the admin listener, no admin path on the proxy listener, and
    the processor's ext_proc service is not reachable through the admin listener."""
    auth = {"authorization": f"Bearer {operator}"}
    leaked = httpx.post(admin_stack.envoy.admin_url + "/openai/v1/chat/completions",
                        headers=auth, json={"model": "gpt-4o-mini", "messages": []})
    assert leaked.status_code == 404
    proxied = httpx.get(admin_stack.envoy.base_url + "/api/v1/whoami", headers=auth)
    assert proxied.status_code == 404 and "admin" not in proxied.text.lower()
    channel = grpc.insecure_channel(admin_stack.envoy.admin_url.removeprefix("http://"))
    with pytest.raises(grpc.RpcError) as blocked:
        channel.unary_unary("/envoy.service.ext_proc.v3.ExternalProcessor/Process")(
            b"", timeout=5)
    assert blocked.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
    # The admin service itself over native gRPC: the same gate.
    stub = admin_pb2_grpc.AdminStub(channel)
    with pytest.raises(grpc.RpcError) as anonymous:
        stub.WhoAmI(admin_pb2.WhoAmIRequest(), timeout=5)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    me = stub.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=[("authorization",
                                                           f"Bearer {operator}")], timeout=5)
    assert (me.name, me.role) == ("ops-alice", "operator")


def test_answers_carry_security_headers(admin_stack: Stack, viewer: str) -> None:
    answer = Admin(admin_stack, viewer).call("GET", "/api/v1/whoami")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-store"
    assert "access-control-allow-origin" not in answer.headers


def test_redis_down_is_503_not_a_crash(fake: FakeProvider) -> None:
    s = Stack(fake.base_url).start()
    try:
        token = _token(s, "ops", "operator")
        assert s.redis is not None
        s.redis.stop()
        answer = Admin(s, token).call("GET", "/api/v1/budgets")
        assert answer.status_code == 503, answer.text
        assert "unavailable" in answer.json()["message"]
        assert s.processor.running()
    finally:
        s.cleanup()


def test_exported_csv_cells_never_start_a_formula(admin_stack: Stack, operator: str) -> None:
    """A label (or a model name: client text) that a spreadsheet would run as a formula
    is exported with a leading apostrophe."""
    admin = Admin(admin_stack, operator)
    admin.ok("POST", "/api/v1/pools/formula-pool/import", {
        "provider": "openai", "csv": "key,label\nsk-formula-" + os.urandom(8).hex()
        + ",=HYPERLINK(\"http://x\")\n"})
    exported = admin.call("GET", "/api/v1/pools/formula-pool/export").text
    (row,) = list(csv.DictReader(io.StringIO(exported)))
    assert row["label"] == "'=HYPERLINK(\"http://x\")"
