"""Non-streaming load with `wrk`: the canned upstream, the request script, one run.

The upstream is an Envoy answering every request with a canned chat completion
(`direct_response`), so the provider is never the bottleneck. Every request wrk sends has
a distinct prompt (a per-request counter, a per-thread and a per-run tag, spelled in
letters): the loop guard, on in the full policy, normalises digits away, so identical or
number-only prompts would be refused as a loop.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.flood import spell  # noqa: E402
from tests.support.harness import Envoy, free_port, wait_until  # noqa: E402

COMPLETION = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
}
REQUEST = {"model": "gpt-4o-mini", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Say ok. Benchmark RUNTAG request WORDS."}]}

WRK_SCRIPT = """
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tag", threads)
end
local counter = 0
local template = [[BODY]]
local function spell(n)
  local letters, out = "ghijklmnopqrstuvwxyz", ""
  repeat
    local r = n % 20
    out = out .. letters:sub(r + 1, r + 1)
    n = math.floor(n / 20)
  until n == 0
  return out
end
request = function()
  counter = counter + 1
  local body = template:gsub("WORDS", spell(counter) .. " " .. spell(tag or 0))
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
                                  ["Authorization"] = "Bearer AUTHKEY"ACCEPT}, body)
end
DELAY
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %d, \\"seconds\\": %f, \\"errors\\": %d, " ..
    "\\"non2xx\\": %d, \\"p50_ms\\": %f, \\"p99_ms\\": %f}\\n",
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def upstream_config(port: int, admin_port: int) -> dict[str, Any]:
    """An Envoy that answers every request with the canned completion."""
    route = {"match": {"prefix": "/"}, "direct_response": {
        "status": 200, "body": {"inline_string": json.dumps(COMPLETION)}},
        "response_headers_to_add": [{"header": {"key": "content-type",
                                                "value": "application/json"}}]}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "upstream",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [route]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm}]}],
        }]},
    }


class UpstreamEnvoy(Envoy):
    """The canned provider: an Envoy with one direct_response route, one worker."""

    def __init__(self, workdir: Path) -> None:
        port, admin = free_port(), free_port()
        super().__init__(workdir, {"TOKENFUSE_LISTEN_PORT": str(port),
                                   "TOKENFUSE_ENVOY_ADMIN_PORT": str(admin)})
        self.name = "upstream"
        self.log_path = workdir / "upstream.log"
        self.config = workdir / "upstream.json"
        self.config.write_text(json.dumps(upstream_config(port, admin)))

    def start(self) -> None:
        envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or "envoy"
        self._spawn([envoy, "-c", str(self.config), "--concurrency", "1", "--log-level",
                     "error", "--base-id", str(self.admin_port)])
        wait_until(self._ready, what="upstream envoy")


def wrk(url: str, workdir: Path, duration_s: int, connections: int, api_key: str,
        delay_ms: int = 0, accept_encoding: str = "") -> dict[str, float]:
    """One wrk run with fresh prompts. `delay_ms` > 0: each connection waits a random time
    of that mean after every answer (an offered rate of about connections / delay);
    `accept_encoding`: the clients ask for compressed answers."""
    script = workdir / f"wrk-{uuid.uuid4().hex}.lua"
    body = json.dumps(REQUEST).replace("RUNTAG", spell(uuid.uuid4().int))
    # Exponential waits (mean delay_ms): connections do not fall into lockstep, so the
    # arrivals approximate a Poisson stream rather than bursts of every connection at once.
    delay = (f"delay = function() return math.floor(-math.log(1 - math.random()) * "
             f"{delay_ms}) end") if delay_ms else ""
    accept = f', ["Accept-Encoding"] = "{accept_encoding}"' if accept_encoding else ""
    script.write_text(WRK_SCRIPT.replace("BODY", body).replace("AUTHKEY", api_key)
                      .replace("DELAY", delay).replace("ACCEPT", accept))
    try:
        out = subprocess.run(
            ["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d",
             f"{duration_s}s", "-s", str(script), url],
            capture_output=True, text=True, check=True).stdout
    finally:
        script.unlink()
    line = next(x for x in out.splitlines() if x.startswith("JSON "))
    result: dict[str, float] = json.loads(line[5:])
    result["rps"] = result["requests"] / result["seconds"]
    return result


def start_warmed(stacks: dict[str, Any], path: str, workdir: Path, connections: int,
                 api_key: str, what: str) -> None:
    """Start side-by-side stacks (tests.support.harness.Stack), give `api_key` a budget it
    never reaches, and warm each up for a second; a failed warm-up stops the bench."""
    for stack in stacks.values():
        stack.start()
        stack.cli("budget", "set", "--key", api_key, "--daily", "1000000")
        warm = wrk(stack.envoy.base_url + path, workdir, 1, connections, api_key)
        if warm["non2xx"] or warm["errors"]:
            raise SystemExit(f"bench: {what} warm-up had failures: {warm}")
