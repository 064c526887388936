"""Packages of the wheel: everything under service/, lua/ as tokenfuse/lua/ (package data),
and the admin API compiled from protos/ (tokenfuse.admin.v1, generated at build time by
protos/build.py, never committed). The rest of the metadata is in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    """Compile protos/ into the build tree before the packages are copied."""

    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("protos_build", HERE / "protos" / "build.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(HERE / "service")
        super().run()


setup(packages=[*find_packages("service"), "tokenfuse.admin.v1", "tokenfuse.lua",
                "tokenfuse.lua.lib"],
      cmdclass={"build_py": BuildWithProtos})
