"""A non-editable install works outside the checkout: the wheel ships the Lua scripts and
the price data, and the processor and the CLI start from it."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.harness import ROOT, RedisServer, free_port, wait_until


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenfuse built as a wheel and installed into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    return target


def _env(target: Path, workdir: Path, redis_url: str) -> dict[str, str]:
    # -S below: no site-packages, so the checkout's editable install is not seen; the
    # dependencies come from this virtualenv's site-packages, after the installed copy.
    return {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}",
            "PATH": "/usr/bin:/bin", "REDIS_URL": redis_url,
            "TOKENFUSE_SECRET": "install-test-secret", "TOKENFUSE_STATE_DIR": str(workdir),
            "TOKENFUSE_METRICS_PORT": str(free_port())}


def test_wheel_ships_scripts_and_prices(installed: Path) -> None:
    lua = sorted(p.name for p in (installed / "tokenfuse" / "lua").glob("*.lua"))
    assert lua == ["extend.lua", "pool_pick.lua", "pool_report.lua", "reap.lua",
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
