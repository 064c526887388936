"""SIGTERM (and SIGINT): drain, then stop.

The first signal sets `Runtime.draining`: a new request (a new ext_proc stream's request
headers) is answered 503 `draining` with retry-after at once, in its provider's error
shape, and never forwarded; readiness turns 503. Requests and streams already admitted go
on and settle as usual. The gRPC server is stopped only when none is left open, or at
TOKENFUSE_DRAIN_TIMEOUT_SECONDS, or at a second signal: grpc.aio's `stop()` refuses new
streams at once (Envoy would answer those 503 `processor_unavailable`, not in the
provider's shape) and cancels the open ones, so it must not run before. Streams still open
then are cut (Envoy resets them, as when a processor dies) and charged here what was
counted plus the grace, like a client that hung up; a settlement Redis does not take stays
a reservation for the reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from tokenfuse.extproc.runtime import Runtime
from tokenfuse.extproc.service import ExtProcService

log = logging.getLogger("tokenfuse")

#: How long a stopped gRPC server lets the streams it refuses (and pool attempts) end.
STOP_GRACE_S = 1.0
#: How long the settlements of the streams a drain cut may take before the exit.
SETTLE_BOUND_S = 2.0


async def drain(runtime: Runtime, service: ExtProcService, server: grpc.aio.Server,
                timeout_s: float, hurry: asyncio.Event) -> None:
    """Refuse new requests, wait for the open ones (at most `timeout_s`, or until `hurry`
    is set), then stop the server and settle what is still open."""
    runtime.draining = True
    streams = runtime.open_streams
    started = time.monotonic()
    log.info("draining: %d request(s) in flight; new ones are refused (503), at most "
             "%g s", len(streams), timeout_s)
    deadline = started + timeout_s
    while streams and not hurry.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(0.05, left)):
                await hurry.wait()
    cut = list(streams.values())
    if cut:
        log.warning("drain %s with %d stream(s) still open: they are cut and charged what "
                    "was counted", "interrupted" if hurry.is_set() else "bound reached",
                    len(cut))
    await server.stop(grace=0 if cut else STOP_GRACE_S)
    await asyncio.sleep(0)  # the cancelled streams start their own settlements
    for ex in cut:
        # One whose handler did not get as far: settled here.
        await service.end_unfinished(ex)
    if service.endings:
        await asyncio.wait(service.endings, timeout=SETTLE_BOUND_S)
    log.info("drained in %.2f s", time.monotonic() - started)
