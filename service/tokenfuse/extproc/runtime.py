"""What every phase of the processor shares: settings, state access, and side channels."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tokenfuse import metrics
from tokenfuse.config import Settings
from tokenfuse.events.webhooks import WebhookSink
from tokenfuse.extproc.answers import immediate
from tokenfuse.extproc.exchange import Exchange
from tokenfuse.identity import PREFIX_CHARS
from tokenfuse.policy.refusals import Reply, store_unavailable
from tokenfuse.pools.secrets import PoolSecrets
from tokenfuse.pricing import PriceTable
from tokenfuse.state.analytics import RefusalRecorder
from tokenfuse.state.budgets import BudgetStore
from tokenfuse.state.control import ControlWatcher
from tokenfuse.state.event_log import EventLog
from tokenfuse.state.pools import PoolStore
from tokenfuse.tracing import Tracing

#: One logger for the decisions of every phase (operators grep for it).
log = logging.getLogger("tokenfuse.processor")
#: Refusals not counted in the analytics: their key id names no caller (a gateway key that
#: does not exist), and counting them would keep buckets for every made-up key.
UNCOUNTED_REFUSALS = frozenset({"invalid_virtual_key"})


@dataclass
class Runtime:
    settings: Settings
    secret: bytes
    store: BudgetStore
    prices: PriceTable
    control: ControlWatcher | None = None
    webhooks: WebhookSink | None = None
    pools: PoolStore | None = None
    pool_secrets: PoolSecrets | None = None
    #: SIGTERM (tokenfuse.drain): new requests are refused, admitted ones go on.
    draining: bool = False
    #: The client streams in flight, by id: what a drain waits for.
    open_streams: dict[int, Exchange] = field(default_factory=dict)
    tracing: Tracing | None = None  # OpenTelemetry traces (None: off)
    #: Counts the refusals no script counted, after the answer (None: analytics off).
    analytics: RefusalRecorder | None = None
    events: EventLog | None = None  # the events feed (None: not written)

    @property
    def redis_timeout(self) -> float:
        return self.settings.redis.timeout_s

    def send(self, ex: Exchange, reply: Reply) -> pb.ProcessingResponse:
        """Answer the client now (counted in the decisions metric); nothing is forwarded."""
        outcome = "error" if reply.status >= 500 else "refused"
        metrics.DECISIONS.labels(outcome, reply.code, ex.provider_name or "none").inc()
        if ex.trace is not None:
            ex.trace.refused(reply.status, reply.code)
        if (self.analytics is not None and ex.caller and not ex.refusal_counted
                and reply.code not in UNCOUNTED_REFUSALS):
            ex.refusal_counted = True  # queued: written after this answer went out
            self.analytics.record(ex.caller, ex.group(), reply.code)
        return immediate(reply.status, reply.body, f"tokenfuse_{reply.code}", reply.headers)

    def store_unavailable(self, ex: Exchange, operation: str,
                          exc: BaseException) -> pb.ProcessingResponse:
        metrics.REDIS_ERRORS.labels(operation).inc()
        log.warning("redis unavailable on %s: %s", operation, type(exc).__name__)
        assert ex.provider is not None
        return self.send(ex, store_unavailable(ex.provider))

    def emit(self, ex: Exchange, event: str, data: dict[str, Any]) -> None:
        """A webhook, and the same event in the events feed."""
        if self.webhooks is not None:
            self.webhooks.emit(event, ex.request_id, ex.caller[:PREFIX_CHARS], data,
                               ex.provider_name)
        self.log_event(ex, event, {k: v for k, v in data.items() if k != "model"})

    def log_event(self, ex: Exchange, kind: str, detail: dict[str, Any]) -> None:
        """An entry in the events feed about this request (never blocks)."""
        if self.events is not None:
            self.events.record(kind, ex.caller[:PREFIX_CHARS], detail, ex.provider_name,
                               ex.call.model if ex.call is not None else "", ex.pool)
