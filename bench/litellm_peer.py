"""Run the LiteLLM proxy (PyPI ``litellm[proxy]``) as a benchmark peer on this machine.

What runs
    litellm 1.102.4 (pinned: ``LITELLM_SPEC``) in its own venv, ``bench/.venv-litellm``
    (gitignored, ~0.7 GB), served by ``litellm --config ... --num_workers 1`` (uvicorn, one
    process, access log off). Newer releases do not install: those checked (the last of each
    minor from 1.103 to 1.109.1, the newest) require ``certifi>=2026.10.19``, which PyPI does
    not have; 1.102.4 is the newest that resolves. 1.82.7/1.82.8 (the March 2026 credential-stealer
    releases) are gone from PyPI, and ``ensure_installed`` refuses a venv holding an unexpected
    ``*.pth`` startup hook, which is how that malware ran.

DB mode (virtual keys with ``max_budget``) works offline, with PyPI + npm only
    LiteLLM keeps keys and spend in PostgreSQL through prisma-client-py 0.15.0 (Prisma 5.17.0,
    engine commit 393aa359). Two pieces normally come from binaries.prisma.sh (unreachable):

    1. ``prisma generate`` (Node CLI, npm ``prisma@5.17.0``). npm installs it without its
       postinstall (``--ignore-scripts``); with ``PRISMA_QUERY_ENGINE_BINARY`` and
       ``PRISMA_SCHEMA_ENGINE_BINARY`` set, the CLI downloads nothing and generates the client
       (its schema parser is WebAssembly inside the npm package).
    2. The native ``query-engine`` binary the generated client spawns and talks HTTP to. No
       registry ships it, but the same engine commit is on npm compiled to WebAssembly,
       ``@prisma/query-engine-wasm@5.17.0-31.393aa359...``, driven over node-postgres by
       ``@prisma/adapter-pg``. ``_ENGINE_SHIM_JS`` below is a small Node program with the
       binary's command line (``--version``, ``-p PORT``) and HTTP API (``/status``, ``/``,
       batches, ``/transaction/*``) that runs it. The WASM build speaks only Prisma's JSON
       protocol and prisma-client-py only the GraphQL one, so the shim translates the GraphQL
       subset prisma-client-py emits, tags Json/Bytes inputs (model-aware, from the schema),
       untags ``$type`` outputs, and reads pg types the adapter lacks (``name``, ``void``, ...)
       as text. Checked: create/find/update/increment/count/group_by/raw/batch/interactive
       transactions, unique-violation errors, and LiteLLM's ``/key/generate``, budget
       enforcement and spend tracking (``/key/info``).

    Migrations: LiteLLM would run ``prisma migrate deploy``, which needs the native schema
    engine (download-only too). Instead the 172 SQL migrations ``litellm-proxy-extras`` ships
    are applied with one psql session, and the proxy runs with ``DISABLE_SCHEMA_UPDATE=true``;
    its remaining drift check (``prisma migrate diff`` through the Node CLI, ~5 s of the
    start) fails and is only logged.

    Fidelity: production runs the engine as native Rust; here it is the same engine as WASM in
    a Node child of the proxy (counted in ``rss_bytes()["litellm"]``; ``rss_detail()`` splits
    it out). LiteLLM serves key lookups from memory and writes spend in batches off the request
    path, so this mostly shows in RSS, not in latency.

PostgreSQL
    Debian ``postgresql`` (apt-installed when missing; 15 here): a throwaway cluster in
    ``workdir/pg`` (``initdb`` and ``postgres`` run as user ``postgres`` when we are root),
    TCP 127.0.0.1 on a free port, unix socket in ``workdir/pg``, ``fsync=off``. DB mode also
    needs node + npm (apt ``nodejs npm`` when missing; node 20 here).

Measured here (2 cores)
    * ``ensure_installed``: 61 s from nothing with an empty pip cache (pip ~50 s, npm + prisma
      generate ~10 s); 0 s when installed.
    * start (``start_seconds``): 9.4 s without DB; 17.4 s with DB (PostgreSQL initdb + start +
      migrations 1.0 s, proxy 16.3 s).
    * idle RSS: proxy 564 MB without DB; with DB 576 MB Python + 85-110 MB engine shim, and
      PostgreSQL 95 MB (~200-250 MB just after a 200-request flood).
    * budgets hold under a flood: 200 concurrent gpt-4o-mini requests (8 in / 40 out tokens,
      $0.0000252 each) on one virtual key: max_budget $0.001 -> 40 allowed, 160 x 429 "Budget
      has been exceeded", recorded spend $0.001008; max_budget $0.0001 -> 4 allowed, spend
      $0.0001008. 1.102.4 reserves each request's worst case before forwarding
      (``litellm/proxy/spend_tracking/budget_reservation.py``; ``disable_budget_reservation``
      turns it off) and overshoots by at most the last admitted request. /key/info shows the
      spend ~10-20 s later (batched DB writes).

Gotchas
    * ``LITELLM_LOCAL_MODEL_COST_MAP=True`` is set: otherwise LiteLLM fetches its price table
      from GitHub on import (3 attempts, ~8 s, then falls back). gpt-4o-mini is priced from
      the bundled table ($0.15 / $0.60 per million tokens).
    * LiteLLM's API uses float USD (``max_budget``, ``spend``); only at this boundary.
    * As root, ``workdir`` gets ``o+x`` so user postgres can reach ``workdir/pg``.
    * ``HOME`` is ``workdir`` for the proxy; DATABASE_URL/REDIS_*/OPENAI_* are not inherited.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType

from memory import children_by_parent, process_tree, rss_of

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venv-litellm"
#: Prisma CLI, WASM engine, node-postgres and the engine shim (PRISMA_BINARY_CACHE_DIR).
PRISMA_DIR = VENV / "prisma-offline"

LITELLM_VERSION = "1.102.4"
LITELLM_SPEC = (f"litellm[proxy]=={LITELLM_VERSION}", "prisma==0.15.0", "psycopg[binary]>=3.2,<4")
PRISMA_VERSION = "5.17.0"
ENGINE_HASH = "393aa359c9ad4a4bb28630fb5613f9c281cde053"
NPM_SPEC = (
    f"prisma@{PRISMA_VERSION}",
    f"@prisma/adapter-pg@{PRISMA_VERSION}",
    f"@prisma/query-engine-wasm@{PRISMA_VERSION}-31.{ENGINE_HASH}",
    "pg@8.23.1",
)
MODEL = "gpt-4o-mini"
#: The provider key LiteLLM presents upstream (what the fake provider bills).
UPSTREAM_KEY = "sk-fake-provider-key"
START_TIMEOUT_S = 180.0
_EXPECTED_PTH = {"distutils-precedence.pth"}


def _run(cmd: list[str], *, what: str, **kwargs: object) -> None:
    """Run a setup command; raise with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _apt_install(*packages: str) -> None:
    """apt-get install (after an update) as root, non-interactively."""
    if os.geteuid() != 0:
        raise RuntimeError(f"{' '.join(packages)} missing and not root: apt-get install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update"], what="apt-get update", env=env)
    _run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
         what=f"apt-get install {' '.join(packages)}", env=env)


def pg_bin_dir() -> Path | None:
    """Directory of the newest installed PostgreSQL server binaries, if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def _site_packages() -> Path:
    return next(VENV.glob("lib/python3*/site-packages"))


def _prisma_env() -> dict[str, str]:
    """Environment under which prisma-client-py and the Prisma CLI never download anything."""
    return {
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "PRISMA_BINARY_CACHE_DIR": str(PRISMA_DIR),
        "PRISMA_QUERY_ENGINE_BINARY": str(PRISMA_DIR / "query-engine"),
        "PRISMA_SCHEMA_ENGINE_BINARY": str(PRISMA_DIR / "schema-engine"),
        "PRISMA_HIDE_UPDATE_MESSAGE": "true",
        "CHECKPOINT_DISABLE": "1",
    }


def _install_venv() -> None:
    marker = VENV / ".installed"
    spec = "\n".join(LITELLM_SPEC)
    if marker.exists() and marker.read_text() == spec:
        return
    if VENV.exists():
        shutil.rmtree(VENV)
    _run([sys.executable, "-m", "venv", str(VENV)], what="python -m venv")
    _run([str(VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *LITELLM_SPEC],
         what="pip install litellm")
    unexpected = {p.name for p in _site_packages().glob("*.pth")} - _EXPECTED_PTH
    if unexpected:
        raise RuntimeError(f"refusing {VENV}: unexpected startup hooks {sorted(unexpected)}")
    marker.write_text(spec)


def _write_if_changed(path: Path, text: str, mode: int) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(mode)


def _install_prisma_offline() -> None:
    """npm Prisma CLI + WASM engine, the engine shim, and ``prisma generate`` for LiteLLM."""
    PRISMA_DIR.mkdir(parents=True, exist_ok=True)
    _write_if_changed(PRISMA_DIR / "query-engine", _ENGINE_SHIM_JS, 0o755)
    _write_if_changed(PRISMA_DIR / "schema-engine", _SCHEMA_ENGINE_STUB, 0o755)
    marker = PRISMA_DIR / ".installed"
    spec = "\n".join((*NPM_SPEC, *LITELLM_SPEC))
    if marker.exists() and marker.read_text() == spec:
        return
    if not (shutil.which("node") and shutil.which("npm")):
        _apt_install("nodejs", "npm")
    (PRISMA_DIR / "package.json").write_text(json.dumps(
        {"name": "prisma-binaries", "version": "1.0.0", "private": True}))
    _run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error",
          *NPM_SPEC], what="npm install (prisma CLI, WASM query engine)", cwd=PRISMA_DIR)
    schema = _site_packages() / "litellm" / "proxy" / "schema.prisma"
    _run([str(VENV / "bin" / "python"), "-m", "prisma", "generate", f"--schema={schema}"],
         what="prisma generate", env={**os.environ, **_prisma_env()}, cwd=PRISMA_DIR)
    marker.write_text(spec)


def ensure_installed() -> Path:
    """Create bench/.venv-litellm with litellm[proxy] and the offline Prisma toolchain if
    missing; apt-install postgresql if missing; return the venv's python path."""
    if pg_bin_dir() is None:
        _apt_install("postgresql")
    _install_venv()
    _install_prisma_offline()
    return VENV / "bin" / "python"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _stop_group(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Send ``sig`` to ``proc`` (a session leader), wait up to ``timeout``, then SIGKILL its
    whole process group (children it left behind included)."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class LiteLLMProxy:
    """The LiteLLM proxy (plus, with ``with_db``, its PostgreSQL) as a context manager."""

    def __init__(self, workdir: Path, openai_base_url: str, with_db: bool) -> None:
        self.workdir = Path(workdir)
        self.openai_base_url = openai_base_url
        self.with_db = with_db
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.master_key = f"sk-litellm-master-{secrets.token_hex(12)}"
        self.log_path = self.workdir / "litellm.log"
        #: Seconds __enter__ took, in total and per phase ("postgres", "litellm").
        self.start_seconds: float | None = None
        self.timings: dict[str, float] = {}
        self._proxy: subprocess.Popen[bytes] | None = None
        self._postgres: subprocess.Popen[bytes] | None = None
        self._pg_port: int | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LiteLLMProxy:
        python = ensure_installed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            env = self._proxy_env()
            if self.with_db:
                env["DATABASE_URL"] = self._start_postgres()
                self.timings["postgres"] = time.monotonic() - started
            proxy_started = time.monotonic()
            config = self.workdir / "litellm_config.yaml"
            config.write_text(json.dumps(self._config(), indent=2))  # JSON is valid YAML
            log_config = self.workdir / "uvicorn_log.json"
            log_config.write_text(json.dumps(_UVICORN_LOG_CONFIG))
            with self.log_path.open("wb") as log:
                self._proxy = subprocess.Popen(
                    [str(python.parent / "litellm"), "--config", str(config), "--host",
                     "127.0.0.1", "--port", str(self.port), "--num_workers", "1",
                     "--log_config", str(log_config)],
                    cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.timings["litellm"] = time.monotonic() - proxy_started
        self.start_seconds = time.monotonic() - started
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the proxy (and its engine), then PostgreSQL; leave no process behind."""
        _stop_group(self._proxy, signal.SIGTERM, 15.0)
        self._proxy = None
        _stop_group(self._postgres, signal.SIGINT, 15.0)  # SIGINT: postgres "fast" shutdown
        self._postgres = None

    def _proxy_env(self) -> dict[str, str]:
        env = {**os.environ, **_prisma_env()}
        for name in ("DATABASE_URL", "DIRECT_URL", "REDIS_HOST", "REDIS_URL", "OPENAI_API_KEY",
                     "OPENAI_BASE_URL", "LITELLM_MASTER_KEY"):
            env.pop(name, None)
        env.update({
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "DISABLE_SCHEMA_UPDATE": "true",
            "LITELLM_PRISMA_COMMAND_TIMEOUT": "30",
            "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
            "TOKENIZERS_PARALLELISM": "false",
            "HOME": str(self.workdir),
        })
        return env

    def _config(self) -> dict[str, object]:
        return {
            "model_list": [{"model_name": MODEL, "litellm_params": {
                "model": f"openai/{MODEL}", "api_base": self.openai_base_url,
                "api_key": UPSTREAM_KEY}}],
            "litellm_settings": {"set_verbose": False, "telemetry": False,
                                 "turn_off_message_logging": True},
            "general_settings": {"master_key": self.master_key},
        }

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proxy is not None
            if self._proxy.poll() is not None:
                code = self._proxy.returncode
                raise RuntimeError(f"litellm exited with {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health/liveliness", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"litellm not ready after {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the proxy's log (and PostgreSQL's, if it has one)."""
        out = []
        for path in (self.log_path, self.workdir / "pg" / "postgres.log"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)

    # --- PostgreSQL --------------------------------------------------------------------------

    def _start_postgres(self) -> str:
        """initdb + postgres in workdir/pg, create the schema; return the DATABASE_URL."""
        bindir = pg_bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (ensure_installed)")
        pgdir = self.workdir / "pg"
        if pgdir.exists():
            shutil.rmtree(pgdir)
        pgdir.mkdir()
        as_user: dict[str, object] = {}
        if os.geteuid() == 0:  # postgres refuses to run as root
            shutil.chown(pgdir, "postgres", "postgres")
            for folder in (self.workdir, *self.workdir.parents):  # user postgres must pass
                mode = folder.stat().st_mode
                if not mode & 0o001:
                    folder.chmod(mode | 0o001)
            as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        data = pgdir / "data"
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "-E", "UTF8", "--no-sync", "--no-instructions"], what="initdb", cwd=pgdir, **as_user)
        self._pg_port = free_port()
        socket_dir = str(pgdir) if len(str(pgdir)) < 90 else ""
        with (pgdir / "postgres.log").open("wb") as log:
            self._postgres = subprocess.Popen(  # type: ignore[call-overload]
                [str(bindir / "postgres"), "-D", str(data), "-p", str(self._pg_port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={socket_dir}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                cwd=pgdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **as_user)
        psql = [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(self._pg_port), "-U", "postgres",
                "-v", "ON_ERROR_STOP=1", "-q"]
        deadline = time.monotonic() + 30
        while subprocess.run([*psql, "-c", "select 1"], capture_output=True).returncode != 0:
            if self._postgres.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        _run([*psql, "-c", "create database litellm"], what="create database")
        migrations = _site_packages() / "litellm_proxy_extras" / "migrations"
        sql = "\n".join(p.read_text() for p in sorted(migrations.glob("*/migration.sql"),
                                                       key=lambda p: p.parent.name))
        _run([*psql, "-d", "litellm", "-f", "-"], what="LiteLLM migrations", input=sql)
        return f"postgresql://postgres@127.0.0.1:{self._pg_port}/litellm"

    # --- API -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict[str, object] | None = None,
                 key: str | None = None) -> dict[str, object]:
        req = urllib.request.Request(
            f"{self.base_url}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {key or self.master_key}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"{method} {path}: {err.code} {err.read()[:500]!r}") from None

    def create_virtual_key(self, max_budget_usd: float) -> str:
        """A new LiteLLM virtual key limited to ``max_budget_usd`` (USD, float at this API)."""
        if not self.with_db:
            raise RuntimeError("LiteLLM virtual keys need its database: use with_db=True")
        resp = self._request("POST", "/key/generate",
                             {"max_budget": max_budget_usd, "models": [MODEL]})
        return str(resp["key"])

    def key_info(self, key: str) -> dict[str, object]:
        """LiteLLM's record of ``key`` (``spend``, ``max_budget``, ...) from GET /key/info."""
        resp = self._request("GET", f"/key/info?key={urllib.parse.quote(key)}")
        info = resp.get("info")
        return info if isinstance(info, dict) else resp

    # --- measurement -------------------------------------------------------------------------

    def _groups(self) -> dict[str, list[int]]:
        tree = children_by_parent()
        return {
            "litellm": process_tree(self._proxy.pid if self._proxy else None, tree),
            "postgres": process_tree(self._postgres.pid if self._postgres else None, tree),
        }

    def roots(self) -> dict[str, int | None]:
        """The root pid of each process tree: the proxy (with its engine) and PostgreSQL."""
        return {"litellm": self._proxy.pid if self._proxy else None,
                "postgres": self._postgres.pid if self._postgres else None}

    def pids(self) -> list[int]:
        """Proxy process(es) incl. workers and the engine shim, and postgres processes."""
        return [pid for group in self._groups().values() for pid in group]

    def rss_bytes(self) -> dict[str, int]:
        """Summed RSS from /proc: {"litellm": proxy tree, "postgres": postgres tree}."""
        return {name: sum(rss_of(p) for p in pids) for name, pids in self._groups().items()}

    def rss_detail(self) -> dict[str, int]:
        """Like rss_bytes, with the proxy tree split into the Python proxy and the Node
        query-engine shim (the part a native Prisma engine would replace)."""
        groups = self._groups()
        engine = [p for p in groups["litellm"] if _comm(p) == "node"]
        return {
            "litellm_python": sum(rss_of(p) for p in groups["litellm"] if p not in engine),
            "litellm_query_engine": sum(rss_of(p) for p in engine),
            "postgres": sum(rss_of(p) for p in groups["postgres"]),
        }


#: uvicorn logging: warnings and errors only (no per-request access log).
_UVICORN_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                            "stream": "ext://sys.stderr"}},
    "loggers": {name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
}

_SCHEMA_ENGINE_STUB = f"""#!/bin/sh
# Stand-in for Prisma's native schema engine (download-only): reports its version, refuses work.
if [ "$1" = "--version" ]; then echo "schema-engine-cli {ENGINE_HASH}"; exit 0; fi
echo "schema engine unavailable offline; migrations are applied with psql" >&2
exit 1
"""

_ENGINE_SHIM_JS = r"""#!/usr/bin/env node
// Stand-in for Prisma's native `query-engine` binary (only downloadable from
// binaries.prisma.sh): the same command line and HTTP API as the binary prisma-client-py
// spawns, backed by the same engine build compiled to WebAssembly (npm
// @prisma/query-engine-wasm) over node-postgres (npm @prisma/adapter-pg). prisma-client-py
// speaks Prisma's GraphQL protocol, the WASM engine only the JSON one: requests are
// translated (the GraphQL subset prisma-client-py emits), responses untagged.
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const ENGINE_HASH = "__ENGINE_HASH__";
const here = path.dirname(fs.realpathSync(fileURLToPath(import.meta.url)));
const require = createRequire(path.join(here, "package.json"));

if (process.argv.includes("--version")) {
  process.stdout.write(`query-engine ${ENGINE_HASH}\n`);
  process.exit(0);
}

const ACTIONS = [
  "findUniqueOrThrow", "findUnique", "findFirstOrThrow", "findFirst", "findMany",
  "createOne", "createManyAndReturn", "createMany", "updateOne", "updateMany", "deleteOne",
  "deleteMany", "upsertOne", "aggregate", "groupBy", "executeRaw", "queryRaw",
];

const TOKEN = new RegExp([
  /\s+|,/.source, /([{}()[\]:])/.source, /("(?:[^"\\]|\\.)*")/.source,
  /(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/.source, /([_A-Za-z][_0-9A-Za-z]*)/.source,
].join("|"), "y");

function tokenize(src) {
  const tokens = [];
  TOKEN.lastIndex = 0;
  while (TOKEN.lastIndex < src.length) {
    const at = TOKEN.lastIndex;
    const m = TOKEN.exec(src);
    if (!m) throw new Error(`cannot tokenize query at ${at}: ${src.slice(at, at + 40)}`);
    if (m[1]) tokens.push({ p: m[1] });
    else if (m[2]) tokens.push({ v: JSON.parse(m[2]) });
    else if (m[3]) tokens.push({ v: Number(m[3]) });
    else if (m[4]) tokens.push({ n: m[4] });
  }
  return tokens;
}

// model -> field -> type name ("Json", "Bytes", another model's name, ...), from the schema.
function schemaFields(datamodel) {
  const models = {};
  let current = null;
  for (const line of datamodel.split("\n")) {
    const head = line.match(/^\s*model\s+(\w+)\s*\{/);
    if (head) { current = models[head[1]] = {}; continue; }
    if (/^\s*\}/.test(line)) { current = null; continue; }
    const field = current && line.match(/^\s*(\w+)\s+(\w+)/);
    if (field) current[field[1]] = field[2];
  }
  return models;
}

const JSON_FILTER_KEYS = new Set(["equals", "not", "path", "mode", "string_contains",
  "string_starts_with", "string_ends_with", "array_contains", "array_starts_with",
  "array_ends_with"]);

// GraphQL-protocol Json inputs are JSON text in a string; the JSON protocol would store a plain
// string as a JSON *string*, so tag them as Prisma's JS client does.
function tagJson(v) {
  if (v === null) return { $type: "Enum", value: "DbNull" };
  if (typeof v === "string") return { $type: "Json", value: v };
  if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length
      && Object.keys(v).every((k) => JSON_FILTER_KEYS.has(k))) {
    const out = { ...v };
    for (const k of ["equals", "not"]) if (k in out) out[k] = tagJson(out[k]);
    return out;
  }
  return { $type: "Json", value: JSON.stringify(v) };
}

// Walk arguments with the model in scope: keys that are its fields are typed (relations
// switch the model), other keys are operators (data, where, create, AND, ...).
function tagInputs(value, model, models, top) {
  if (Array.isArray(value)) return value.map((v) => tagInputs(v, model, models, false));
  if (!value || typeof value !== "object") return value;
  const fields = models[model] ?? {};
  const out = {};
  for (const [k, v] of Object.entries(value)) {
    const type = top ? undefined : fields[k];
    if (type === "Json") out[k] = tagJson(v);
    else if (type === "Bytes" && typeof v === "string") out[k] = { $type: "Bytes", value: v };
    else if (type && models[type]) out[k] = tagInputs(v, type, models, false);
    else out[k] = tagInputs(v, model, models, false);
  }
  return out;
}

function parseGraphql(src, models) {
  const t = tokenize(src);
  let i = 0;
  const peek = (p) => t[i] && t[i].p === p;
  const expect = (p) => {
    if (!peek(p)) throw new Error(`expected '${p}' at token ${i}`);
    i++;
  };
  const name = () => {
    if (!t[i] || t[i].n === undefined) throw new Error(`expected a name at token ${i}`);
    return t[i++].n;
  };
  const value = () => {
    if (peek("{")) {
      i++;
      const obj = {};
      while (!peek("}")) { const k = name(); expect(":"); obj[k] = value(); }
      i++;
      return obj;
    }
    if (peek("[")) {
      i++;
      const list = [];
      while (!peek("]")) list.push(value());
      i++;
      return list;
    }
    const tok = t[i++];
    if (!tok) throw new Error("unexpected end of query");
    if (tok.v !== undefined) return tok.v;
    if (tok.n === "true") return true;
    if (tok.n === "false") return false;
    if (tok.n === "null") return null;
    if (tok.n !== undefined) return tok.n; // enum literal
    throw new Error(`unexpected token ${JSON.stringify(tok)}`);
  };
  const args = () => {
    const out = {};
    expect("(");
    while (!peek(")")) { const k = name(); expect(":"); out[k] = value(); }
    i++;
    return out;
  };
  const selection = () => {
    const out = {};
    expect("{");
    while (!peek("}")) {
      const field = name();
      const a = peek("(") ? args() : null;
      const s = peek("{") ? selection() : null;
      if (a === null && s === null) out[field] = true;
      else out[field] = { ...(a ? { arguments: a } : {}), selection: s ?? { $scalars: true } };
    }
    i++;
    return out;
  };
  name(); // query | mutation
  expect("{");
  name(); // result
  expect(":");
  const root = name();
  const a = peek("(") ? args() : {};
  const s = peek("{") ? selection() : {};
  expect("}");
  const action = ACTIONS.find((x) => root.startsWith(x));
  if (!action) throw new Error(`unknown operation ${root}`);
  const orThrow = root.endsWith("OrThrow") && !action.endsWith("OrThrow");
  const model = root.slice(action.length, orThrow ? -"OrThrow".length : undefined);
  const query = { arguments: model ? tagInputs(a, model, models, true) : a, selection: s };
  return { ...(model ? { modelName: model } : {}), action: orThrow ? `${action}OrThrow` : action,
           query };
}

function untag(v) {
  if (Array.isArray(v)) return v.map(untag);
  if (v && typeof v === "object") {
    if (typeof v.$type === "string" && "value" in v && Object.keys(v).length === 2) {
      return v.value;
    }
    const out = {};
    for (const [k, x] of Object.entries(v)) out[k] = untag(x);
    return out;
  }
  return v;
}

// JSON protocol {"data": {"findUniqueX": ...}} -> GraphQL protocol {"data": {"result": ...}}.
function toGraphqlResult(res) {
  if (res.data && typeof res.data === "object") {
    return { data: { result: untag(Object.values(res.data)[0] ?? null) } };
  }
  return res;
}

function poolConfig() {
  let url = process.env.DATABASE_URL;
  if (process.env.OVERWRITE_DATASOURCES) {
    const ds = JSON.parse(process.env.OVERWRITE_DATASOURCES);
    if (Array.isArray(ds) && ds[0]?.url) url = ds[0].url;
  }
  if (!url) throw new Error("DATABASE_URL is not set");
  const u = new URL(url);
  const q = u.searchParams;
  const cfg = {
    host: q.get("host") || decodeURIComponent(u.hostname) || "127.0.0.1",
    port: Number(u.port || 5432),
    user: decodeURIComponent(u.username),
    password: decodeURIComponent(u.password),
    database: decodeURIComponent(u.pathname.slice(1)),
    max: Number(q.get("connection_limit") || 5),
  };
  if (q.get("options")) cfg.options = q.get("options");
  if (q.get("schema")) cfg.options = `${cfg.options ?? ""} -c search_path=${q.get("schema")}`;
  return cfg;
}

async function main() {
  const port = Number(process.argv[Math.max(process.argv.indexOf("-p"),
                                            process.argv.indexOf("--port")) + 1]);
  const pg = require("pg");
  const { PrismaPg } = require("@prisma/adapter-pg");
  const { bindAdapter } = require("@prisma/driver-adapter-utils");
  const wasmDir = path.join(here, "node_modules/@prisma/query-engine-wasm/postgresql");
  const runtime = await import(path.join(wasmDir, "query_engine_bg.js"));
  const wasm = new WebAssembly.Module(fs.readFileSync(path.join(wasmDir, "query_engine_bg.wasm")));
  const instance = new WebAssembly.Instance(wasm, { "./query_engine_bg.js": runtime });
  runtime.__wbg_set_wasm(instance.exports);

  // Columns of types the pg adapter cannot map (name, "char", void, unknown, interval, ...)
  // are read as text, as the native engine does (LiteLLM's raw queries select pg_views.viewname).
  const asText = new Map([[18, 25], [19, 25], [705, 25], [1186, 25], [2205, 25], [2278, 25],
                          [1002, 1009], [1003, 1009], [1187, 1009]]);
  const rowDescription = pg.Query.prototype.handleRowDescription;
  pg.Query.prototype.handleRowDescription = function (msg) {
    for (const f of msg.fields) f.dataTypeID = asText.get(f.dataTypeID) ?? f.dataTypeID;
    return rowDescription.call(this, msg);
  };

  const pool = new pg.Pool(poolConfig());
  pool.on("error", (err) => process.stderr.write(`query-engine: idle client error: ${err}\n`));
  const datamodel = fs.readFileSync(process.env.PRISMA_DML_PATH, "utf8");
  const models = schemaFields(datamodel);
  const onLog = (msg) => {
    if (/"level":\s*"(ERROR|error)"/.test(msg)) process.stderr.write(`query-engine: ${msg}\n`);
  };
  const engine = new runtime.QueryEngine({ datamodel, logLevel: "error" }, onLog,
                                         bindAdapter(new PrismaPg(pool)));
  await engine.connect("{}");

  async function handle(method, url, body, txId) {
    if (method === "GET" && url.startsWith("/status")) return { status: "ok" };
    if (url.startsWith("/metrics")) return { counters: [], gauges: [], histograms: [] };
    if (method !== "POST") throw new Error(`unsupported ${method} ${url}`);
    if (url === "/") {
      const req = JSON.parse(body);
      if (Array.isArray(req.batch)) {
        const batch = { batch: req.batch.map((q) => parseGraphql(q.query, models)),
                        transaction: req.transaction ? {} : undefined };
        const res = JSON.parse(await engine.query(JSON.stringify(batch), "{}", txId));
        if (Array.isArray(res.batchResult)) res.batchResult = res.batchResult.map(toGraphqlResult);
        return res;
      }
      const query = JSON.stringify(parseGraphql(req.query, models));
      return toGraphqlResult(JSON.parse(await engine.query(query, "{}", txId)));
    }
    if (url === "/transaction/start") {
      return JSON.parse(await engine.startTransaction(body || "{}", "{}"));
    }
    const m = url.match(/^\/transaction\/([^/]+)\/(commit|rollback)$/);
    if (m) {
      const done = m[2] === "commit" ? engine.commitTransaction(m[1], "{}")
                                     : engine.rollbackTransaction(m[1], "{}");
      return JSON.parse((await done) || "{}");
    }
    throw new Error(`unsupported ${method} ${url}`);
  }

  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", async () => {
      let status = 200;
      let out;
      try {
        out = await handle(req.method, req.url, Buffer.concat(chunks).toString("utf8"),
                           req.headers["x-transaction-id"]);
      } catch (err) {
        status = 500;
        const message = String(err?.message ?? err);
        out = { errors: [{ error: String(err?.stack ?? err),
                           user_facing_error: { is_panic: false, message } }] };
      }
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(out));
    });
  });
  server.keepAliveTimeout = 65_000;
  server.listen(port, "127.0.0.1");
  const stop = () => { server.close(); pool.end().finally(() => process.exit(0)); };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

main().catch((err) => {
  process.stderr.write(`query-engine shim failed: ${err?.stack ?? err}\n`);
  process.exit(1);
});
""".replace("__ENGINE_HASH__", ENGINE_HASH)
