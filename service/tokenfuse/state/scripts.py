"""The Lua scripts: found in the package (or the checkout), declared, bound by name.

Each script in `lua/` declares its KEYS and ARGV by name in its header
(`--- KEYS: limits reservations`, `--- ARGV: prefix rid ...`). Loading prepends the key
layout (`tokenfuse.state.keys`), the shared prelude `lua/lib/windows.lua` and locals
`K.<name>` / `A.<name>` bound to those positions, so the Lua body reads its inputs by
name and Python passes them by name (`LuaScript.bind`): positions are declared once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from tokenfuse.config import WINDOWS
from tokenfuse.state.keys import lua_layout
from tokenfuse.state.redis_pipe import Script

PACKAGE_DIR = Path(__file__).resolve().parents[1]
_DECLARATION = re.compile(r"^--- (KEYS|ARGV):(.*)$", re.M)
#: The default per-window limits every budget script takes (-1 = no limit).
DEFAULT_LIMIT_ARGS = tuple(f"default_{w}" for w in WINDOWS)


def lua_dir() -> Path:
    """`tokenfuse/lua` in an installed package (package data built from the top-level
    `lua/`), else the checkout's top-level `lua/` (editable install, tests)."""
    for candidate in (PACKAGE_DIR / "lua", PACKAGE_DIR.parents[1] / "lua"):
        if (candidate / "lib" / "windows.lua").is_file():
            return candidate
    raise FileNotFoundError(f"tokenfuse's Lua scripts are missing (looked in {PACKAGE_DIR})")


class LuaScript(Script):
    """One script with its declared KEYS and ARGV names."""

    def __init__(self, name: str, keys: tuple[str, ...], args: tuple[str, ...],
                 source: str) -> None:
        super().__init__(source)
        self.name = name
        self.keys = keys
        self.args = args

    def bind(self, keys: Mapping[str, str],
             args: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV in the declared order; a missing or extra name is a bug."""
        if len(keys) != len(self.keys) or len(args) != len(self.args):
            raise TypeError(f"{self.name}.lua takes KEYS {self.keys} and ARGV {self.args}, "
                            f"got {tuple(keys)} and {tuple(args)}")
        return [keys[n] for n in self.keys], [args[n] for n in self.args]


def _bindings(table: str, source: str, names: tuple[str, ...]) -> str:
    fields = ", ".join(f"{n} = {source}[{i}]" for i, n in enumerate(names, start=1))
    return f"local {table} = {{{fields}}}\n"


@cache
def load(name: str) -> LuaScript:
    directory = lua_dir()
    body = (directory / f"{name}.lua").read_text()
    declared = {kind: tuple(rest.split()) for kind, rest in _DECLARATION.findall(body)}
    keys, args = declared.get("KEYS", ()), declared.get("ARGV", ())
    source = "".join((lua_layout(), (directory / "lib" / "windows.lua").read_text(), "\n",
                      _bindings("K", "KEYS", keys), _bindings("A", "ARGV", args), body))
    return LuaScript(name, keys, args, source)


def default_limits(limits: list[int]) -> dict[str, int]:
    """The default limits (window order, -1 = none) as the scripts' named arguments."""
    return dict(zip(DEFAULT_LIMIT_ARGS, limits, strict=True))
