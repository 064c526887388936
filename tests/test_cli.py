"""The operator CLI against a real Redis: set, status (text and JSON), clear."""

from __future__ import annotations

import json

from tests.support.harness import Stack


def test_budget_set_status_clear(stack: Stack, api_key: str) -> None:
    result = stack.cli("budget", "set", "--key", api_key, "--daily", "50.00", "--minute", "0.5",
                       "--hourly", "2", "--weekly", "100", "--monthly", "300", "--total",
                       "1000.000000001")
    assert result.returncode == 0, result.stderr
    assert api_key not in result.stdout
    doc = json.loads(stack.cli("budget", "status", "--key", api_key, "--json").stdout)
    limits = {name: w["limit_nano_usd"] for name, w in doc["windows"].items()}
    assert limits == {"minute": 500_000_000, "hour": 2_000_000_000, "day": 50_000_000_000,
                      "week": 100_000_000_000, "month": 300_000_000_000,
                      "total": 1_000_000_000_001}
    assert doc["windows"]["day"]["remaining_nano_usd"] == 50_000_000_000
    assert doc["windows"]["day"]["resets_at"].endswith("T00:00:00+00:00")
    assert doc["windows"]["total"]["resets_at"] is None
    assert doc["limits"] == "own"
    text = stack.cli("budget", "status", "--key", api_key).stdout
    assert "$50.00" in text and "never" in text
    assert stack.cli("budget", "clear", "--key", api_key).returncode == 0
    doc = json.loads(stack.cli("budget", "status", "--key", api_key, "--json").stdout)
    assert doc["limits"] == "defaults"
    assert all(w["limit_nano_usd"] is None for w in doc["windows"].values())


def test_budget_rejects_bad_amounts(stack: Stack, api_key: str) -> None:
    bad = stack.cli("budget", "set", "--key", api_key, "--daily", "-3")
    assert bad.returncode != 0 and "non-negative" in bad.stderr
    none = stack.cli("budget", "set", "--key", api_key)
    assert none.returncode == 2


def test_unreachable_redis_is_a_clear_error(stack: Stack, api_key: str) -> None:
    """A Redis the CLI cannot use (nothing listens there; wrong passwords are covered in
    test_local_redis.py): one line, no traceback, never the URL (it carries the
    password)."""
    import subprocess
    import sys

    from tests.support.harness import free_port

    env = {**stack.env, "REDIS_URL": f"redis://:pw-secret-123@127.0.0.1:{free_port()}/0"}
    done = subprocess.run([sys.executable, "-m", "tokenfuse.cli", "budget", "status", "--key",
                           api_key], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("tokenfuse: Redis refused or unreachable")
    assert "Traceback" not in done.stderr and "pw-secret-123" not in done.stderr
