"""The boundaries docs/architecture.md describes, checked on the source (ast, no imports).

Each rule says where one kind of knowledge lives; a change that puts it elsewhere fails
here with the file and line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "service" / "tokenfuse"
MAX_LINES = 300
#: Compiled from protos/ at setup (protos/build.py), not ours to shape.
GENERATED = PACKAGE / "admin" / "v1"


def _modules() -> dict[str, ast.Module]:
    return {str(path.relative_to(PACKAGE)): ast.parse(path.read_text(), str(path))
            for path in sorted(PACKAGE.rglob("*.py")) if GENERATED not in path.parents}


MODULES = _modules()


def _outside(*allowed: str) -> dict[str, ast.Module]:
    return {name: tree for name, tree in MODULES.items()
            if not any(name == a or name.startswith(a + "/") for a in allowed)}


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _strings(tree: ast.Module) -> list[tuple[int, str]]:
    """String constants that are not docstrings, with their line numbers."""
    skip = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in skip]


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
    return out


def _violations(modules: dict[str, ast.Module], found) -> list[str]:
    return [f"{name}:{line}: {what}" for name, tree in modules.items()
            for line, what in found(tree)]


def test_provider_names_and_headers_only_in_providers() -> None:
    banned = ("openai", "anthropic", "x-api-key", "authorization", "x-goog-api-key",
              "api-key", "azure", "mistral", "groq", "deepseek", "openrouter", "together",
              "fireworks", "cerebras", "perplexity", "ollama", "x_groq", "bedrock",
              "x-amzn")

    def found(tree: ast.Module) -> list[tuple[int, str]]:
        # Environment variable names (TOKENFUSE_AZURE_DEPLOYMENTS) are config's to read.
        return [(line, text) for line, text in _strings(tree)
                if any(word in re.sub(r"TOKENFUSE_[A-Z_]+", "", text).lower()
                       for word in banned)]

    # The admin API's own bearer tokens come in the standard header (admin/api.py only).
    admin_api = {"admin/api.py": MODULES["admin/api.py"]}
    outside = {n: t for n, t in _outside("providers").items() if n not in admin_api}
    violations = _violations(outside, found)
    banned = tuple(w for w in banned if w != "authorization")  # `found` reads it per call
    assert violations + _violations(admin_api, found) == []


def test_runtime_never_imports_the_renderer() -> None:
    def found(tree: ast.Module) -> list[tuple[int, str]]:
        return [(line, name) for line, name in _imports(tree)
                if name.startswith("tokenfuse.deploy")]

    assert _violations(_outside("deploy"), found) == []


def test_only_the_state_layer_talks_to_redis() -> None:
    def found(tree: ast.Module) -> list[tuple[int, str]]:
        return [(line, name) for line, name in _imports(tree)
                if name.split(".")[0] in ("redis", "hiredis")]

    assert _violations(_outside("state"), found) == []


def test_only_the_state_layer_names_redis_keys_or_loads_lua() -> None:
    def found(tree: ast.Module) -> list[tuple[int, str]]:
        return [(line, text) for line, text in _strings(tree)
                if text.startswith(("tf:", "tfp:")) or text.endswith(".lua")]

    assert _violations(_outside("state/keys.py", "state/scripts.py"), found) == []


def test_only_config_reads_the_environment() -> None:
    """Reading a variable (os.environ.get / [...] / os.getenv); handing the whole
    environment to a child process is not reading it."""

    def found(tree: ast.Module) -> list[tuple[int, str]]:
        out = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "getenv":
                out.append((node.lineno, "os.getenv"))
            elif (isinstance(node, ast.Attribute | ast.Subscript)
                  and isinstance(getattr(node, "value", None), ast.Attribute)
                  and node.value.attr == "environ"  # type: ignore[union-attr]
                  and (isinstance(node, ast.Subscript) or node.attr in ("get", "pop"))):
                out.append((node.lineno, "os.environ read"))
        return out

    assert _violations(_outside("config.py"), found) == []


@pytest.mark.parametrize("package", ["policy", "providers", "metering", "pricing.py",
                                     "money.py", "contract.py", "identity.py"])
def test_pure_packages_do_no_io(package: str) -> None:
    io = ("redis", "hiredis", "grpc", "envoy", "aiohttp", "asyncio", "socket",
          "tokenfuse.state.budgets", "tokenfuse.state.admin", "tokenfuse.state.pools",
          "tokenfuse.state.connection", "tokenfuse.extproc")
    modules = {n: t for n, t in MODULES.items() if n == package or n.startswith(package + "/")}
    assert modules

    def found(tree: ast.Module) -> list[tuple[int, str]]:
        return [(line, name) for line, name in _imports(tree)
                if any(name == x or name.startswith(x + ".") for x in io)]

    assert _violations(modules, found) == []


def test_long_modules_say_why() -> None:
    long = {name: tree for name, tree in MODULES.items()
            if len((PACKAGE / name).read_text().splitlines()) > MAX_LINES}
    unexplained = [name for name, tree in long.items()
                   if "longer than" not in (ast.get_docstring(tree) or "").lower()
                   and "hence its length" not in (ast.get_docstring(tree) or "").lower()]
    assert unexplained == []
