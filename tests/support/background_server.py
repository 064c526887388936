"""An aiohttp server in a background thread: the lifecycle the test upstreams share (the
fake provider, the replay upstream). A subclass defines `_handle`."""

from __future__ import annotations

import asyncio
import ssl
import threading

from aiohttp import web


class BackgroundServer:
    thread_name = "background-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context  # serve HTTPS when given
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._startup_error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:8081``."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self) -> int:
        """Start serving in a background thread; returns the bound port once listening."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            raise RuntimeError(f"{self.thread_name} failed to start") from self._startup_error
        return self.port

    def stop(self) -> None:
        """Stop the server and its thread (in-flight responses are cancelled)."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop = self._thread = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._listen())
            self._loop = loop
        except BaseException as exc:
            self._startup_error = exc
            loop.close()
            return
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

    async def _listen(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port,
                          ssl_context=self.ssl_context).start()
        self.port = self._runner.addresses[0][1]
