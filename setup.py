"""Packages of the wheel: everything under service/, and lua/ as tokenfuse/lua/ (package
data). The rest of the metadata is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages("service"), "tokenfuse.lua", "tokenfuse.lua.lib"])
