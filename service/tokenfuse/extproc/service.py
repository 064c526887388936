"""The ext_proc gRPC service: one stream per HTTP request, dispatched by phase.

A stream from the pooled clusters' upstream filter (marked by gRPC metadata) is one
provider attempt (`upstream.PoolAttempts`); every other stream is a client request:
request headers and body (`request.RequestPhase`), then the response
(`response.ResponsePhase`), settled once (`settlement.Settlement`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tokenfuse.contract import PROVIDER_METADATA, STAGE_METADATA, UPSTREAM_STAGE
from tokenfuse.extproc.answers import CONTINUE
from tokenfuse.extproc.exchange import Exchange
from tokenfuse.extproc.request import RequestPhase
from tokenfuse.extproc.response import ResponsePhase
from tokenfuse.extproc.runtime import Runtime
from tokenfuse.extproc.settlement import Settlement
from tokenfuse.extproc.upstream import PoolAttempts


class ExtProcService(pb_grpc.ExternalProcessorServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._request = RequestPhase(runtime)
        self._settlement = Settlement(runtime)
        self._streams = runtime.open_streams
        #: Settlements of streams that ended unsettled, still running (a drain waits).
        self.endings: set[asyncio.Future[None]] = set()
        self._response = ResponsePhase(runtime, self._settlement)
        self._attempts = (
            PoolAttempts(runtime.secret, runtime.pools, runtime.pool_secrets,
                         runtime.redis_timeout, events=runtime.events)
            if runtime.pools is not None and runtime.pool_secrets is not None else None)

    async def Process(  # gRPC method name
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[pb.ProcessingResponse]:
        if self._attempts is not None and _is_upstream_stage(context):
            async for answer in self._attempts.process(request_iterator,
                                                       _metadata(context, PROVIDER_METADATA)):
                yield answer
            return
        ex = Exchange()
        response = self._response
        streams = self._streams
        streams[id(ex)] = ex  # what a drain waits for (tokenfuse.drain)
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("request")
                if kind == "request_headers":
                    yield await self._request.on_headers(ex, message.request_headers)
                elif kind == "request_body":
                    yield await self._request.on_body(ex, message.request_body)
                    ex.forwarded = True  # Envoy has the answer (continue, or a refusal)
                elif kind == "response_headers":
                    yield await response.on_headers(ex, message.response_headers)
                elif kind == "response_body":
                    if not ex.response_started:
                        response.start(ex, message)
                    for answer in await response.on_body(ex, message.response_body):
                        yield answer
                elif kind == "request_trailers":
                    yield CONTINUE["request_trailers"]
                elif kind == "response_trailers":
                    if not ex.response_started:
                        response.start(ex, message)
                    await self._settlement.settle_from(ex)
                    yield CONTINUE["response_trailers"]
        finally:
            try:
                if ex.open_reservation:
                    # A task of its own: a drain's stop cancels the stream, not this.
                    ending = asyncio.ensure_future(self.end_unfinished(ex))
                    self.endings.add(ending)
                    ending.add_done_callback(self.endings.discard)
                    await asyncio.shield(ending)
                elif ex.trace is not None:
                    ex.trace.end(ex)
            finally:
                del streams[id(ex)]

    async def end_unfinished(self, ex: Exchange) -> None:
        """A stream that ended without a settlement (also: one a drain ended at its bound);
        its span ends after the settlement."""
        try:
            if ex.open_reservation and not ex.forwarded:
                # Envoy gave up before it had the decision: nothing went to the provider.
                await self._request.release(ex, "abandoned")
            elif ex.open_reservation:
                # Ended without a settlement (client gone, Envoy reset, upstream cut).
                await self._settlement.settle_unfinished(ex)
        finally:
            if ex.trace is not None:
                ex.trace.end(ex)


def _is_upstream_stage(context: Any) -> bool:
    """Streams from the pooled clusters' upstream filter carry this gRPC metadata."""
    return _metadata(context, STAGE_METADATA) == UPSTREAM_STAGE


def _metadata(context: Any, key: str) -> str:
    """One gRPC metadata value Envoy's config sets on the stream ("" when absent)."""
    return next((item[1] for item in (context.invocation_metadata() or ())
                 if item[0] == key), "")
