"""Resident memory of process trees, from /proc (Linux only)."""

from __future__ import annotations

import threading
from pathlib import Path


def children_by_parent() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(root: int | None, tree: dict[int, list[int]]) -> list[int]:
    """``root`` and all its descendants that still exist."""
    if root is None or not Path(f"/proc/{root}").exists():
        return []
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def rss_of(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int | None) -> int:
    """RSS of ``root`` and its descendants, in bytes."""
    return sum(rss_of(p) for p in process_tree(root, children_by_parent()))


class PeakRss:
    """Samples named process trees every `interval_s` while active; keeps the maximum.
    The trees are walked once at the start (the benchmarked services do not fork under
    load), so a sample reads only their own /proc entries and steals little CPU."""

    def __init__(self, roots: dict[str, int | None], interval_s: float = 1.0) -> None:
        tree = children_by_parent()
        self._pids = {name: process_tree(root, tree) for name, root in roots.items()}
        self._interval = interval_s
        self.peak: dict[str, int] = {name: 0 for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pids in self._pids.items():
                self.peak[name] = max(self.peak[name], sum(rss_of(p) for p in pids))
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
