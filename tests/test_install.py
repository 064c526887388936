"""A non-editable install works outside the checkout: the wheel (built from exactly what
the Dockerfile's build stage copies) ships the Lua scripts and the price data, and the
processor, the CLI and the image's ENTRYPOINT (as the Dockerfile writes it) start from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.support import dockerfile
from tests.support.harness import ROOT, RedisServer, free_port, wait_until


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenfuse built as a wheel from exactly what the Dockerfile's build stage copies (a
    file it forgets is missing here too), installed into a directory of its own."""
    build = dockerfile.stages()[0]
    context = tmp_path_factory.mktemp("context")
    for source, destination in dockerfile.build_context_copies(build):
        target_dir = context / destination
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target_dir, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "*.egg-info"))
        else:
            target_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, target_dir / Path(source).name)
    # .dockerignore keeps the checkout's generated admin API out: the build compiles it.
    shutil.rmtree(context / "service" / "tokenfuse" / "admin" / "v1", ignore_errors=True)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--wheel-dir", str(wheels), str(context)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("tokenfuse-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


def _env(target: Path, workdir: Path, redis_url: str) -> dict[str, str]:
    # -S below: no site-packages, so the checkout's editable install is not seen; the
    # dependencies come from this virtualenv's site-packages, after the installed copy.
    return {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}",
            "PATH": "/usr/bin:/bin", "REDIS_URL": redis_url,
            "TOKENFUSE_SECRET": "install-test-secret", "TOKENFUSE_STATE_DIR": str(workdir),
            "TOKENFUSE_METRICS_PORT": str(free_port())}


def test_wheel_compiles_the_admin_api_and_ships_the_dashboard(installed: Path) -> None:
    generated = installed / "tokenfuse" / "admin" / "v1"
    assert {"admin_pb2.py", "admin_pb2_grpc.py", "admin.pb"} <= {
        p.name for p in generated.iterdir()}
    assert (installed / "tokenfuse" / "admin" / "ui" / "index.html").is_file()


def test_wheel_ships_scripts_and_prices(installed: Path) -> None:
    lua = sorted(p.name for p in (installed / "tokenfuse" / "lua").glob("*.lua"))
    assert lua == ["extend.lua", "pool_pick.lua", "pool_report.lua", "reap.lua", "refusal.lua",
                   "reserve.lua", "settle.lua", "status.lua"]
    assert (installed / "tokenfuse" / "lua" / "lib" / "windows.lua").is_file()
    assert (installed / "tokenfuse" / "data" / "prices.json").is_file()


def test_processor_and_cli_start_from_the_installed_package(installed: Path,
                                                            tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    processor = None
    try:
        env = _env(installed, tmp_path, redis.url)
        where = subprocess.run(
            [sys.executable, "-S", "-c",
             "import tokenfuse, tokenfuse.state.scripts as s; "
             "print(tokenfuse.__file__); print(s.lua_dir())"],
            env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
        package_file, lua_dir = where.stdout.split()
        assert package_file.startswith(str(installed))
        assert lua_dir == str(installed / "tokenfuse" / "lua")

        status = subprocess.run(
            [sys.executable, "-S", "-m", "tokenfuse.cli", "budget", "status", "--key", "k",
             "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["windows"]["day"]["spent_nano_usd"] == 0

        log = open(tmp_path / "processor.log", "wb")  # noqa: SIM115 (the child keeps it)
        processor = subprocess.Popen([sys.executable, "-S", "-m", "tokenfuse.server"],
                                     env=env, cwd=tmp_path, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        socket = tmp_path / "processor.sock"
        log_path = tmp_path / "processor.log"
        # Listening is logged right after the socket is bound.
        wait_until(lambda: processor.poll() is not None
                   or (socket.exists() and "listening" in log_path.read_text()),
                   what="the installed processor")
        text = log_path.read_text()
        assert processor.poll() is None, text
        assert "model prices" in text
    finally:
        if processor is not None:
            processor.terminate()
            processor.wait(timeout=10)
        redis.stop()


def _fresh_venv(installed: Path, where: Path) -> Path:
    """A virtualenv with the installed copy and, after it, this one's dependencies (a .pth
    of plain paths: the checkout's editable finder in this venv is never run)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True,
                   timeout=60)
    site = Path(subprocess.run(
        [where / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()"
         "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    paths = dict.fromkeys([str(installed), sysconfig.get_paths()["purelib"],
                           sysconfig.get_paths()["platlib"]])
    (site / "tokenfuse-test-deps.pth").write_text("\n".join(paths) + "\n")
    return where / "bin"


def _decide(address: str) -> list[pb.ProcessingResponse]:
    """One priced request through ext_proc over TCP: its headers, then its body."""
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    headers = [(":method", "POST"), (":path", "/openai/v1/chat/completions"),
               ("content-type", "application/json"), ("authorization", "Bearer sk-image")]
    requests = [
        pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=HeaderMap(headers=[
            HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]))),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        answers = []
        for answer in stub.Process(iter(requests), timeout=20):
            answers.append(answer)
            if len(answers) == 2 or answer.HasField("immediate_response"):
                break
        return answers


def test_the_image_entrypoint_serves_from_the_installed_package(installed: Path,
                                                                tmp_path: Path) -> None:
    """The Dockerfile's ENTRYPOINT, as written, in its ENV, from a fresh virtualenv holding
    the non-editable install, run outside the checkout: it serves ext_proc over TCP (a
    decision in Redis with the installed Lua and prices) and its metrics."""
    runtime = dockerfile.stages()[-1]
    command = runtime.command()
    assert command == ["python", "-m", "tokenfuse.server"]
    image_env = runtime.env()
    assert not [name for name in image_env if "SECRET" in name or "PASSWORD" in name
                or name == "REDIS_URL"]
    bin_dir = _fresh_venv(installed, tmp_path / "venv")
    state = tmp_path / "state"
    redis = RedisServer(tmp_path)
    redis.start()
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    env = {**image_env, "PATH": f"{bin_dir}:/usr/bin:/bin", "REDIS_URL": redis.url,
           # The image's paths, moved under this test's directory.
           "TOKENFUSE_STATE_DIR": str(state), "TOKENFUSE_POOLS_DIR": str(tmp_path / "pools"),
           "TOKENFUSE_SECRET": "image-test-secret", "TOKENFUSE_PROCESSOR_ADDRESS": address,
           "TOKENFUSE_METRICS_PORT": str(metrics_port)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log_path = tmp_path / "image.log"
    processor = None
    try:
        where = subprocess.run(
            ["python", "-c", "import tokenfuse, tokenfuse.state.scripts as s, "
             "tokenfuse.pricing as p; print(tokenfuse.__file__); print(s.lua_dir()); "
             "print(p.BUILTIN_PRICES)"], env=env, cwd=elsewhere, capture_output=True,
            text=True, check=True)
        package_file, lua_dir, prices = where.stdout.split()
        assert package_file == str(installed / "tokenfuse" / "__init__.py")
        assert lua_dir == str(installed / "tokenfuse" / "lua")
        assert prices == str(installed / "tokenfuse" / "data" / "prices.json")
        with open(log_path, "wb") as log:
            processor = subprocess.Popen(command, env=env, cwd=elsewhere, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_until(lambda: processor.poll() is not None
                   or "also listening on tcp" in log_path.read_text(), what="the image")
        assert processor.poll() is None, log_path.read_text()
        headers, body = _decide(address)
        assert headers.HasField("request_headers"), headers
        assert body.HasField("request_body"), body  # allowed: reserved in Redis
        assert not body.HasField("immediate_response")
        client = redis.client()
        assert any(client.scan_iter(match="*", count=1000)), "no reservation in Redis"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as resp:
            assert b"tokenfuse_decisions_total" in resp.read()
        assert "model prices" in log_path.read_text()
    finally:
        if processor is not None:
            processor.terminate()
            processor.wait(timeout=15)
        redis.stop()
