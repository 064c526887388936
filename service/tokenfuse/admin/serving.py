"""The admin service inside the processor: registered on its gRPC server (same socket or
port Envoy's admin listener reaches), its synchronous handlers on a thread pool of their
own so a slow query never holds the event loop."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from tokenfuse.admin.api import AdminApi
from tokenfuse.admin.core import AdminCore
from tokenfuse.admin.v1 import admin_pb2_grpc as pb_grpc
from tokenfuse.config import Settings
from tokenfuse.state.connection import REDIS_FAILURES, sync_client

ADMIN_THREADS = 4


def admin_thread_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(ADMIN_THREADS, thread_name_prefix="tokenfuse-admin")


def add_admin_service(server: grpc.aio.Server, settings: Settings, secret: bytes,
                      state: Callable[[], tuple[int, bool]],
                      reload_pools: Callable[[], None]) -> None:
    """`state()`: (open streams, draining) of this processor."""
    client = sync_client(settings.redis.url, settings.redis.cluster)
    core = AdminCore(client, settings, secret, reload_pools)

    def health() -> tuple[bool, bool, int, bool]:
        open_streams, draining = state()
        try:
            redis_ok = bool(client.ping())
        except REDIS_FAILURES:
            redis_ok = False
        return redis_ok and not draining, redis_ok, open_streams, draining

    pb_grpc.add_AdminServicer_to_server(AdminApi(core, secret, health), server)
