"""The pre-call reservation as the request phase makes it: one Lua decision, and the
release of a grant whose request was never forwarded (so it is never charged)."""

from __future__ import annotations

import asyncio

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from tokenfuse import metrics
from tokenfuse.extproc.exchange import Exchange
from tokenfuse.extproc.runtime import Runtime
from tokenfuse.policy import reservation
from tokenfuse.state.connection import REDIS_FAILURES
from tokenfuse.state.results import LoopRefusal, Refusal, Reservation


class Reserver:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._pending: set[asyncio.Future[None]] = set()

    async def reserve(self, ex: Exchange, plan: reservation.Plan, fp: str | None
                       ) -> Reservation | Refusal | LoopRefusal | pb.ProcessingResponse:
        """The one Lua decision. If this request is given up while the call is in flight
        (Redis slower than its bound, Envoy ending the stream), a grant that lands anyway
        is released: a request that was never forwarded is never charged."""
        rt = self._rt
        task = asyncio.ensure_future(rt.store.reserve(
            ex.caller, ex.request_id, plan.desired_nano, plan.minimum_nano, fp,
            ex.near_fingerprint, ex.group()))
        try:
            async with asyncio.timeout(rt.redis_timeout):
                result = await asyncio.shield(task)
        except REDIS_FAILURES as exc:
            self._release_when_done(ex, task)
            return rt.store_unavailable(ex, "reserve", exc)
        except asyncio.CancelledError:
            self._release_when_done(ex, task)
            raise
        # reserve.lua counted its refusal in the analytics: Runtime.send must not again.
        ex.refusal_counted = not isinstance(result, Reservation)
        return result

    def _release_when_done(self, ex: Exchange, task: asyncio.Future) -> None:
        def done(finished: asyncio.Future) -> None:
            if finished.cancelled() or finished.exception() is not None:
                return
            if isinstance(finished.result(), Reservation):
                release = asyncio.ensure_future(self.release(ex, "abandoned"))
                self._pending.add(release)
                release.add_done_callback(self._pending.discard)

        task.add_done_callback(done)

    async def release(self, ex: Exchange, basis: str) -> None:
        """Settle a reservation of a request that was not forwarded: it costs nothing."""
        ex.open_reservation = False
        try:
            async with asyncio.timeout(self._rt.redis_timeout * 4):
                await self._rt.store.settle(ex.caller, ex.request_id, 0)
        except REDIS_FAILURES:
            metrics.REDIS_ERRORS.labels("release").inc()
            return
        metrics.SETTLEMENTS.labels(basis).inc()
