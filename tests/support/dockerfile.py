"""The top-level Dockerfile read as data, so the tests run what the image runs: its stages'
instructions (continuation lines joined), the build stage's COPY sources, the runtime
stage's ENV and its exact ENTRYPOINT + CMD."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.harness import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str = ""
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                out[name] = value
        return out

    def command(self) -> list[str]:
        """ENTRYPOINT + CMD (exec form only: a shell form would be a shell in between)."""
        argv: list[str] = []
        for keyword in ("ENTRYPOINT", "CMD"):
            for args in self.all(keyword)[-1:]:
                assert args.startswith("["), f"{keyword} must use the exec form: {args}"
                argv += json.loads(args)
        return argv


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            out.append(Stage(base.strip(), name.strip()))
        else:
            out[-1].instructions.append((keyword, re.sub(r"\s+", " ", args)))
    return out


def build_context_copies(stage: Stage) -> list[tuple[str, str]]:
    """The build stage's `COPY src... dst` from the build context, as (src, dst) pairs."""
    pairs = []
    for args in stage.all("COPY"):
        parts = args.split()
        assert not parts[0].startswith("--"), args
        pairs += [(src, parts[-1]) for src in parts[:-1]]
    return pairs
