"""The dashboard's files (admin/ui/, package data), served by the Asset RPC: a fixed set
of names read once, never a path from the request."""

from __future__ import annotations

from functools import cache
from importlib import metadata, resources

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
         ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json"}


@cache
def _files() -> dict[str, tuple[str, bytes]]:
    ui = resources.files("tokenfuse.admin") / "ui"
    out: dict[str, tuple[str, bytes]] = {}
    if ui.is_dir():
        for entry in ui.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
            if entry.is_file() and suffix in TYPES:
                out[entry.name] = (TYPES[suffix], entry.read_bytes())
    return out


def read(path: str) -> tuple[str, bytes] | None:
    """(content type, bytes) of `path` ("" = the page), or None."""
    return _files().get(path or "index.html")


def version() -> str:
    try:
        return metadata.version("tokenfuse")
    except metadata.PackageNotFoundError:
        return "unknown"
