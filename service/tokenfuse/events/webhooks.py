"""Signed webhooks, delivered off the request path.

`emit()` never blocks and never fails a request: it puts the event on one bounded queue per
receiver URL (a full queue drops it for that receiver only, counted in metrics). Each
receiver has its own workers, which POST the event with
`X-Tokenfuse-Signature: sha256=<HMAC-SHA256(secret, body)>`, retrying with exponential
backoff, so a dead, hanging or slow receiver only delays its own queue, never the others.

Targets are checked against SSRF at start-up (literal IPs) and at connect time (a resolver
that refuses loopback, private, link-local, multicast and reserved addresses unless
allowed), so a DNS answer that changes after start-up cannot point a webhook inside the
network. Redirects are never followed (those checks see only the first hop): a 3xx answer
is a refused delivery, not retried, counted as `redirect_refused`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tokenfuse import metrics

if TYPE_CHECKING:  # aiohttp (~10 MB) is imported only once a webhook URL is configured
    import aiohttp
    from aiohttp.abc import ResolveResult

log = logging.getLogger("tokenfuse.webhooks")
SIGNATURE_HEADER = "X-Tokenfuse-Signature"


class WebhookConfigError(ValueError):
    """A webhook URL or setting tokenfuse refuses to use."""


def is_public(address: str) -> bool:
    """True for addresses a webhook may reach without TOKENFUSE_WEBHOOK_ALLOW_PRIVATE."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


def validate_urls(urls: list[str], allow_private: bool) -> list[str]:
    """Reject malformed URLs and literal non-public IPs at start-up (names are checked at
    every connection by the resolver)."""
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookConfigError(f"webhook URL must be http(s)://host/...: {url!r}")
        if parts.username or parts.password:
            raise WebhookConfigError("webhook URLs must not carry credentials")
        try:
            literal = ipaddress.ip_address(parts.hostname)
        except ValueError:
            continue
        if not allow_private and not is_public(str(literal)):
            raise WebhookConfigError(
                f"webhook target {parts.hostname} is not a public address (set "
                "TOKENFUSE_WEBHOOK_ALLOW_PRIVATE=1 to allow it)")
    return urls


class PublicOnlyResolver:
    """Resolves like aiohttp's default resolver, then drops every non-public address
    (an aiohttp resolver: `resolve` and `close`)."""

    def __init__(self) -> None:
        from aiohttp.resolver import DefaultResolver

        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = [r for r in await self._inner.resolve(host, port, family)
                   if is_public(r["host"])]
        if not results:
            raise OSError(f"webhook host {host} resolves to no public address")
        return results

    async def close(self) -> None:
        await self._inner.close()


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _host_of(url: str | None) -> str:
    """The host of a URL for logs: never its path, query or credentials."""
    if not url:
        return "-"
    try:
        return urlsplit(url).hostname or "(relative)"
    except ValueError:
        return "(invalid)"


class _Receiver:
    """One receiver URL with its own bounded queue (its workers drain only this one)."""

    def __init__(self, url: str, queue_size: int) -> None:
        self.url = url
        self.host = _host_of(url)
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=queue_size)


class WebhookSink:
    """Delivers events to every receiver URL; `workers` and `queue_size` are per receiver."""

    def __init__(self, urls: list[str], secret: bytes, queue_size: int = 1000,
                 allow_private: bool = False, timeout_s: float = 5.0,
                 max_attempts: int = 5, workers: int = 4) -> None:
        self._urls = validate_urls(urls, allow_private)
        self._secret = secret
        self._allow_private = allow_private
        self._timeout = timeout_s
        self._max_attempts = max(1, max_attempts)
        self._workers = max(1, workers)
        self._receivers = [_Receiver(url, queue_size) for url in self._urls]

    @property
    def enabled(self) -> bool:
        return bool(self._urls)

    def emit(self, event: str, request_id: str, key_prefix: str, data: dict[str, Any],
             provider: str = "") -> None:
        """Queue an event for every receiver; never blocks, never raises. `provider`: the
        route's provider name ("" for events about no request)."""
        if not self._receivers:
            return
        body = json.dumps({
            "event": event,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "request_id": request_id,
            "key_id_prefix": key_prefix,
            "provider": provider,
            "data": data,
        }).encode()
        for receiver in self._receivers:
            try:
                receiver.queue.put_nowait((event, body))
            except asyncio.QueueFull:
                metrics.WEBHOOKS.labels(event, "dropped_queue_full").inc()

    async def run(self) -> None:
        """Deliver forever: `workers` concurrent workers per receiver, each on its queue."""
        if not self._receivers:
            return
        import aiohttp

        resolver = None if self._allow_private else PublicOnlyResolver()
        # One connection per worker at most: a receiver that hangs holds only its own.
        connector = aiohttp.TCPConnector(resolver=resolver,
                                         limit=self._workers * len(self._receivers))
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, receiver)
                                   for receiver in self._receivers
                                   for _ in range(self._workers)))

    async def _worker(self, session: aiohttp.ClientSession, receiver: _Receiver) -> None:
        while True:
            event, body = await receiver.queue.get()
            try:
                await self._deliver(session, receiver, event, body)
            except Exception as exc:  # a bug must not stop this receiver's deliveries
                metrics.WEBHOOKS.labels(event, "failed").inc()
                log.error("webhook %s to %s failed: %s", event, receiver.host,
                          type(exc).__name__)
            finally:
                receiver.queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, receiver: _Receiver, event: str,
                       body: bytes) -> None:
        import aiohttp

        headers = {"content-type": "application/json", "user-agent": "tokenfuse-webhooks",
                   "x-tokenfuse-event": event, SIGNATURE_HEADER: sign(self._secret, body)}
        for attempt in range(self._max_attempts):
            try:
                async with session.post(receiver.url, data=body, headers=headers,
                                        allow_redirects=False) as response:
                    if 200 <= response.status < 300:
                        metrics.WEBHOOKS.labels(event, "delivered").inc()
                        return
                    if 300 <= response.status < 400:
                        # Never followed: the SSRF checks only saw this hop. Log the host
                        # of the location only (its path or query may carry secrets).
                        metrics.WEBHOOKS.labels(event, "redirect_refused").inc()
                        log.warning("webhook %s to %s refused: HTTP %d redirect to host %r "
                                    "not followed", event, receiver.host, response.status,
                                    _host_of(response.headers.get("location")))
                        return
                    if 400 <= response.status < 500 and response.status not in (408, 429):
                        break  # the receiver rejects it: retrying will not help
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("webhook %s attempt %d failed: %s", event, attempt + 1,
                          type(exc).__name__)
            if attempt + 1 < self._max_attempts:
                await asyncio.sleep(min(0.5 * 2**attempt, 30))
        metrics.WEBHOOKS.labels(event, "failed").inc()
        log.warning("webhook %s to %s failed after %d attempts", event, receiver.host,
                    attempt + 1)
