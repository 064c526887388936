"""Packages of the wheel: everything under service/, lua/ as tokenfuse/lua/ (package data),
and the admin API compiled from protos/ (tokenfuse.admin.v1: protos/build.py runs each
time setup.py does, so every build holds code generated from the protos it ships; never
committed). The rest of the metadata is in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _compile_protos() -> None:
    spec = importlib.util.spec_from_file_location("protos_build", HERE / "protos" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(HERE / "service")


_compile_protos()
setup(packages=sorted({*find_packages("service"), "tokenfuse.admin.v1", "tokenfuse.lua",
                       "tokenfuse.lua.lib"}))
