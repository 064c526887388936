"""What the processor loads: aiohttp (webhooks, key probes, ~10 MB) only when configured."""

from __future__ import annotations

from pathlib import Path

from tests.support.harness import Stack


def _mapped(stack: Stack) -> str:
    assert stack.processor.proc is not None
    return Path(f"/proc/{stack.processor.proc.pid}/maps").read_text()


def test_no_aiohttp_without_webhooks_or_pools(stack: Stack) -> None:
    mapped = _mapped(stack)
    assert "/grpc/" in mapped  # what is loaded shows up here (grpc's extension module)
    assert "/aiohttp/" not in mapped  # aiohttp's extension modules would
