"""Redis writes made off the request path: a bounded queue drained by one task.

`put()` never blocks, never raises and never awaits: it queues the write and returns, so
the answer it follows goes out first; the task (started on the first write) runs the
writes in order. A full queue drops the write, a failed write is dropped too; both are
counted in `tokenfuse_background_writes_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from tokenfuse import metrics
from tokenfuse.state.connection import REDIS_FAILURES

Write = Callable[[], Awaitable[object]]


class BackgroundWrites:
    def __init__(self, kind: str, queue_size: int, timeout_s: float) -> None:
        self._kind = kind
        self._queue: asyncio.Queue[Write] | None = None
        self._size = queue_size
        self._timeout = timeout_s
        self._task: asyncio.Task[None] | None = None
        try:  # the processor's loop (a refusal decided in a worker thread hands over to it)
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def put(self, write: Write) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # off the loop (asyncio.to_thread): queue it from the loop
            if self._loop is None:
                metrics.BACKGROUND_WRITES.labels(self._kind, "failed").inc()
                return
            self._loop.call_soon_threadsafe(self.put, write)
            return
        self._loop = loop
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self._size)
        try:
            self._queue.put_nowait(write)
        except asyncio.QueueFull:
            metrics.BACKGROUND_WRITES.labels(self._kind, "dropped_queue_full").inc()
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            write = await self._queue.get()
            try:
                async with asyncio.timeout(self._timeout):
                    await write()
            except (*REDIS_FAILURES, ValueError):
                metrics.BACKGROUND_WRITES.labels(self._kind, "failed").inc()
            else:
                metrics.BACKGROUND_WRITES.labels(self._kind, "written").inc()
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until every queued write ran (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
