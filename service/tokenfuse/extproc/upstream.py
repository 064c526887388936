"""Provider key per upstream attempt: the processor's side of the pooled clusters.

A gateway-key request is routed by the downstream processor to a pooled cluster (it sets
`x-tokenfuse-pool: <provider>:<pool>` and a grant, an HMAC of the pool and the request id
under the server secret, then Envoy re-picks the route). That cluster runs ext_proc in its
upstream filter chain, so Envoy opens one stream here per attempt:

- request headers: check the grant, pick the next healthy key of the pool (pool_pick.lua),
  set it as the provider credential, drop the routing headers; no key → 503 with
  retry-after (the earliest recovery), without the retry mark, so Envoy stops there.
- response headers: report failures to the key's health (pool_report.lua) before Envoy
  decides to retry; mark 401/403/429/503/529 with `x-tokenfuse-retry` so the route's retry
  policy (TOKENFUSE_POOL_MAX_RETRIES) tries the next key; name the key used in
  `x-tokenfuse-pool-key` for the downstream processor, which removes both headers, settles
  the budget once from the final response and reports its tokens and spend to that key.

The client sees one response; failed attempts are neither charged nor visible.

A pool member that signs (AWS credentials, `Provider.is_signing_secret`) is not a header:
its provider's pooled cluster also sends the request body here (contract.
UPSTREAM_SIGNING_PROCESSING_MODE), and the attempt is signed over its final headers and
body in the body's answer. A retried attempt carries the previous signature, whose
access key id (`Provider.credential_alias`) names the pool.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tokenfuse import metrics
from tokenfuse.contract import GRANT_HEADER, POOL_HEADER, POOL_KEY_HEADER, RETRY_HEADER, grant
from tokenfuse.extproc.answers import (
    CONTINUE,
    header_mutation_response,
    header_option,
    headers_of,
    immediate,
)
from tokenfuse.identity import PREFIX_CHARS, key_id
from tokenfuse.pools.secrets import PoolSecrets
from tokenfuse.providers import DEFAULT_PROVIDER, PROVIDERS
from tokenfuse.state.connection import REDIS_FAILURES
from tokenfuse.state.event_log import EventLog
from tokenfuse.state.pools import PoolStore

log = logging.getLogger("tokenfuse.failover")

#: Failures that say something about the key, not the request: another key may succeed.
RETRY_ON_ANOTHER_KEY = frozenset({401, 403, 429, 503, 529})


class PoolAttempts:
    """One upstream attempt per ext_proc stream: choose its key, then judge the answer."""

    def __init__(self, secret: bytes, pools: PoolStore, pool_secrets: PoolSecrets,
                 redis_timeout_s: float, events: EventLog | None = None) -> None:
        self._secret = secret
        self._events = events
        self._pools = pools
        self._pool_secrets = pool_secrets
        self._timeout = redis_timeout_s
        # (pools' secrets the aliases were read from, alias -> pool), rebuilt on reload
        self._aliases: tuple[object, dict[str, str]] = (None, {})

    async def process(self, messages: AsyncIterator[pb.ProcessingRequest],
                      cluster_provider: str) -> AsyncIterator[pb.ProcessingResponse]:
        """`cluster_provider`: the provider of the pooled cluster, from the stream's
        metadata (set by Envoy's config, not by a client)."""
        pool, provider, key = "", DEFAULT_PROVIDER, ""
        signing: tuple[str, dict[str, str]] | None = None  # (secret, headers) to sign
        async for message in messages:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                headers = headers_of(message.request_headers)
                provider, pool = self._route(headers, cluster_provider)
                answer, key = await self._choose(provider, pool)
                secret = self._pool_secrets.held(pool).get(key) if key else None
                signing = (secret, headers) if secret is not None and PROVIDERS[
                    provider].is_signing_secret(secret) else None
                if signing is not None and message.request_headers.end_of_stream:
                    answer = self._sign(provider, pool, signing, b"", "request_headers")
                    signing = None
                yield answer
            elif kind == "request_body" and signing is not None:
                yield self._sign(provider, pool, signing, message.request_body.body,
                                 "request_body")
                signing = None
            elif kind == "response_headers":
                yield await self._judge(provider, pool, key,
                                        headers_of(message.response_headers))
            elif kind in CONTINUE:  # not asked for by the processing mode
                yield CONTINUE[kind]

    def _route(self, headers: dict[str, str], cluster_provider: str) -> tuple[str, str]:
        """(provider, pool) of this attempt; pool "" when it was not routed by tokenfuse.

        The first attempt carries the routing headers and their grant. Envoy replays a
        retry with the headers the first attempt left: the pool key we set, no routing
        headers (they must not reach the provider); the key's id names its pool."""
        route = headers.get(POOL_HEADER)
        if route is not None:
            expected = grant(self._secret, route, headers.get("x-request-id", ""))
            if not hmac.compare_digest(expected, headers.get(GRANT_HEADER, "")):
                return DEFAULT_PROVIDER, ""
            provider, _, pool = route.partition(":")
            if provider not in PROVIDERS or provider != cluster_provider:
                return DEFAULT_PROVIDER, ""
            return provider, pool
        provider = cluster_provider if cluster_provider in PROVIDERS else None
        # The credential as this attempt carries it (a pool holds it), not the identity
        # a caller is charged as.
        credential = PROVIDERS[provider].credential_of(headers) if provider else None
        pool = self._pool_secrets.pool_of(key_id(self._secret, credential)) \
            if credential else None
        if pool is None and provider is not None:
            pool = self._pool_of_alias(provider, PROVIDERS[provider].credential_alias(headers))
        if provider is None or pool is None:
            return DEFAULT_PROVIDER, ""
        return provider, pool

    async def _choose(self, provider: str, pool: str) -> tuple[pb.ProcessingResponse, str]:
        if not pool:
            # Only the downstream processor routes to a pool; a client cannot.
            metrics.DECISIONS.labels("refused", "invalid_pool_grant", provider).inc()
            return immediate(403, PROVIDERS[provider].error_body(
                "permission", "invalid_pool_grant",
                "this request was not routed to a key pool by tokenfuse"),
                "tokenfuse_invalid_pool_grant",
                PROVIDERS[provider].error_headers("permission", "invalid_pool_grant")), ""
        held = self._pool_secrets.held(pool)
        try:
            async with asyncio.timeout(self._timeout):
                key, wait_ms = await self._pools.pick(pool, self._pool_secrets.held_ids(pool))
        except REDIS_FAILURES as exc:
            metrics.REDIS_ERRORS.labels("pool_pick").inc()
            log.warning("redis unavailable on pool_pick: %s", type(exc).__name__)
            return immediate(503, PROVIDERS[provider].error_body(
                "unavailable", "state_store_unavailable",
                "tokenfuse cannot reach its state store; nothing was forwarded"),
                "tokenfuse_state_store_unavailable", (("retry-after", "1"), *PROVIDERS[
                    provider].error_headers("unavailable", "state_store_unavailable"))), ""
        if key is None or key not in held:
            retry = max(1, -(-wait_ms // 1000)) if wait_ms >= 0 else 30
            metrics.DECISIONS.labels("error", "no_healthy_key", provider).inc()
            return immediate(503, PROVIDERS[provider].error_body(
                "unavailable", "no_healthy_key",
                f"every key of pool '{pool}' is cooling down or disabled; earliest "
                f"recovery in {retry}s"), "tokenfuse_no_healthy_key",
                (("retry-after", str(retry)),
                 *PROVIDERS[provider].error_headers("unavailable", "no_healthy_key"))), ""
        if PROVIDERS[provider].is_signing_secret(held[key]):
            # Signed over the body (`_sign`); the caller's credential headers go now.
            credentials = tuple(c.header for c in PROVIDERS[provider].credentials)
            return header_mutation_response(
                "request_headers", (), (*credentials, POOL_HEADER, GRANT_HEADER)), key
        credential, stale = PROVIDERS[provider].pooled_credential(held[key])
        return header_mutation_response(
            "request_headers", (credential,), (*stale, POOL_HEADER, GRANT_HEADER)), key

    def _sign(self, provider: str, pool: str, signing: tuple[str, dict[str, str]],
              body: bytes, phase: str) -> pb.ProcessingResponse:
        """The attempt's signature (set in the answer to its body, or to its headers when
        it has none), over the final host, path and body."""
        secret, headers = signing
        try:
            set_headers, remove = PROVIDERS[provider].pooled_signature(secret, headers, body)
        except ValueError as exc:
            log.error("pool %s holds an unusable signing credential: %s", pool, exc)
            metrics.DECISIONS.labels("error", "unusable_pool_credential", provider).inc()
            return immediate(503, PROVIDERS[provider].error_body(
                "unavailable", "unusable_pool_credential",
                f"a credential of pool '{pool}' cannot sign requests; see the gateway's log"),
                "tokenfuse_unusable_pool_credential", (("retry-after", "30"), *PROVIDERS[
                    provider].error_headers("unavailable", "unusable_pool_credential")))
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(
            set_headers=[header_option(k, v) for k, v in set_headers],
            remove_headers=list(remove)))
        if phase == "request_headers":
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    def _pool_of_alias(self, provider: str, alias: str | None) -> str | None:
        """The pool holding the signing secret named `alias` (an access key id)."""
        if alias is None:
            return None
        source = self._pool_secrets.by_pool
        if self._aliases[0] is not source:
            named = PROVIDERS[provider].secret_alias
            self._aliases = (source, {a: pool for pool, keys in source.items()
                                      for secret in keys.values()
                                      if (a := named(secret)) is not None})
        return self._aliases[1].get(alias)

    async def _judge(self, provider: str, pool: str, key: str,
                     headers: dict[str, str]) -> pb.ProcessingResponse:
        if not key:
            return CONTINUE["response_headers"]  # our own refusal: nothing to judge
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 0
        marks: list[tuple[str, str]] = [(POOL_KEY_HEADER, key)]
        if status >= 400:
            metrics.POOL_REQUESTS.labels(pool, key[:PREFIX_CHARS], str(status)).inc()
            # Before Envoy retries: the next attempt's pick must see this key's new health.
            retry_after = PROVIDERS[provider].retry_after_ms(headers)
            await report_failure(self._pools, pool, key, status, retry_after, self._timeout,
                                 self._events, provider)
            if status in RETRY_ON_ANOTHER_KEY:
                marks.append((RETRY_HEADER, str(status)))
                metrics.POOL_FAILOVERS.labels(pool, str(status)).inc()
        return header_mutation_response("response_headers", tuple(marks), ())


async def report_failure(pools: PoolStore, pool: str, key: str, status: int,
                         retry_after_ms: int, timeout_s: float,
                         events: EventLog | None = None, provider: str = "") -> None:
    """A failed attempt to the key's health; a state change also to the events feed."""
    try:
        async with asyncio.timeout(timeout_s * 4):
            before, state = await pools.report_change(pool, key, status, retry_after_ms,
                                                      error=f"HTTP {status}")
    except REDIS_FAILURES:
        metrics.REDIS_ERRORS.labels("pool_report").inc()
        return
    metrics.set_pool_key_state(pool, key[:PREFIX_CHARS], state)
    if events is not None and before != state:
        events.record("pool_key.state", "", {"pool_key": key[:PREFIX_CHARS], "state": state,
                                             "before": before, "status": status},
                      provider, "", pool)
