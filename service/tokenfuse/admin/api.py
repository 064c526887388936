"""The admin service over gRPC (tokenfuse.admin.v1.Admin): authentication, roles and the
mapping of refusals onto gRPC status codes, around admin/core.py. Envoy's gRPC-JSON
transcoder turns it into JSON on the admin listener (UNAUTHENTICATED -> 401,
PERMISSION_DENIED -> 403, INVALID_ARGUMENT -> 400, NOT_FOUND -> 404, UNAVAILABLE -> 503).

Synchronous handlers: the processor's grpc.aio server runs them on a small thread pool
(`migration_thread_pool`), off its event loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.api import httpbody_pb2

from tokenfuse.admin import assets, tokens
from tokenfuse.admin.core import Actor, AdminCore, AdminError
from tokenfuse.admin.v1 import admin_pb2 as pb
from tokenfuse.admin.v1 import admin_pb2_grpc as pb_grpc
from tokenfuse.state.admin_tokens import AdminTokenStore
from tokenfuse.state.connection import REDIS_FAILURES

log = logging.getLogger("tokenfuse.admin")
T = TypeVar("T")

STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "not_found": grpc.StatusCode.NOT_FOUND,
          "conflict": grpc.StatusCode.ALREADY_EXISTS,
          "precondition": grpc.StatusCode.FAILED_PRECONDITION}
VIEWER, OPERATOR = "viewer", "operator"
_RANK = {VIEWER: 0, OPERATOR: 1}


class AdminApi(pb_grpc.AdminServicer):
    def __init__(self, core: AdminCore, secret: bytes,
                 health: Callable[[], tuple[bool, bool, int, bool]]) -> None:
        """`health()`: (ready, redis_ok, open streams, draining) of this processor."""
        self._core = core
        self._secret = secret
        self._tokens = AdminTokenStore(core.redis)
        self._health = health

    # ------------------------------------------------------------------ the gate
    def _actor(self, context: grpc.ServicerContext, role: str) -> Actor:
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "an admin token is required: Authorization: Bearer <token> "
                          "(tokenfuse admin token create --name … --role viewer|operator)")
        record = tokens.verify(self._tokens, self._secret, token.strip())
        if record is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "unknown, revoked or malformed admin token")
        if _RANK[record.role] < _RANK[role]:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"this needs the {role} role; token {record.name!r} is a "
                          f"{record.role}")
        return Actor(record.name, record.role)

    def _run(self, context: grpc.ServicerContext, role: str,
             work: Callable[[Actor], T]) -> T:
        try:
            actor = self._actor(context, role)
            return work(actor)
        except AdminError as exc:
            context.abort(STATUS[exc.kind], str(exc))
        except REDIS_FAILURES as exc:
            log.warning("admin call failed: Redis %s", type(exc).__name__)
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"the state store (Redis) is unavailable ({type(exc).__name__})")
        raise AssertionError("unreachable")  # context.abort raises

    def _read(self, context: grpc.ServicerContext, work: Callable[[], T]) -> T:
        return self._run(context, VIEWER, lambda _actor: work())

    # ------------------------------------------------------------ identity, health
    def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.Identity:
        return self._run(context, VIEWER, lambda a: pb.Identity(name=a.name, role=a.role))

    def GetHealth(self, request: pb.HealthRequest, context: Any) -> pb.Health:
        def work() -> pb.Health:
            ready, redis_ok, open_streams, draining = self._health()
            return pb.Health(ready=ready, redis_ok=redis_ok, now_ms=_now_ms(),
                             open_streams=open_streams, draining=draining,
                             version=assets.version())
        return self._read(context, work)

    # -------------------------------------------------------------------- budgets
    def ListBudgets(self, request: pb.ListBudgetsRequest, context: Any) -> pb.BudgetList:
        return self._read(context, self._core.budgets)

    def GetBudget(self, request: pb.KeyRef, context: Any) -> pb.Budget:
        return self._read(context, lambda: self._core.budget(request.key_id))

    def SetBudget(self, request: pb.SetBudgetRequest, context: Any) -> pb.Budget:
        return self._run(context, OPERATOR, lambda a: self._core.set_budget(
            a, request.key_id, dict(request.limits_nano_usd)))

    def ClearBudget(self, request: pb.KeyRef, context: Any) -> pb.Budget:
        return self._run(context, OPERATOR,
                         lambda a: self._core.clear_budget(a, request.key_id))

    def Kill(self, request: pb.KeyRef, context: Any) -> pb.Budget:
        return self._run(context, OPERATOR,
                         lambda a: self._core.set_killed(a, request.key_id, True))

    def Lift(self, request: pb.KeyRef, context: Any) -> pb.Budget:
        return self._run(context, OPERATOR,
                         lambda a: self._core.set_killed(a, request.key_id, False))

    # --------------------------------------------------------------- gateway keys
    def ListGatewayKeys(self, request: pb.ListGatewayKeysRequest,
                        context: Any) -> pb.GatewayKeyList:
        return self._read(context, self._core.gateway_keys)

    def CreateGatewayKey(self, request: pb.CreateGatewayKeyRequest,
                         context: Any) -> pb.CreatedGatewayKey:
        return self._run(context, OPERATOR, lambda a: self._core.create_gateway_key(
            a, request.name, request.pool))

    def RevokeGatewayKey(self, request: pb.GatewayKeyRef, context: Any) -> pb.GatewayKey:
        return self._run(context, OPERATOR,
                         lambda a: self._core.revoke_gateway_key(a, request.id))

    # ---------------------------------------------------------------------- pools
    def ListPools(self, request: pb.ListPoolsRequest, context: Any) -> pb.PoolList:
        return self._read(context, self._core.pools)

    def ImportPoolKeys(self, request: pb.ImportPoolKeysRequest, context: Any) -> pb.Pool:
        return self._run(context, OPERATOR, lambda a: self._core.import_pool(
            a, request.pool, request.provider, request.csv))

    def ExportPoolKeys(self, request: pb.PoolRef, context: Any) -> httpbody_pb2.HttpBody:
        return self._read(context, lambda: httpbody_pb2.HttpBody(
            content_type="text/csv; charset=utf-8",
            data=self._core.export_pool_csv(request.pool).encode()))

    def EnablePoolKey(self, request: pb.PoolKeyRef, context: Any) -> pb.PoolKey:
        return self._run(context, OPERATOR, lambda a: self._core.set_pool_key_enabled(
            a, request.pool, request.key, True))

    def DisablePoolKey(self, request: pb.PoolKeyRef, context: Any) -> pb.PoolKey:
        return self._run(context, OPERATOR, lambda a: self._core.set_pool_key_enabled(
            a, request.pool, request.key, False))

    # ---------------------------------------------------------------------- usage
    def GetOverview(self, request: pb.OverviewRequest, context: Any) -> pb.Overview:
        return self._read(context, self._core.overview)

    def GetUsage(self, request: pb.UsageRequest, context: Any) -> pb.UsageReport:
        return self._read(context, lambda: self._core.usage(
            request.window, request.group_by, request.start_ms, request.end_ms))

    def GetUsageSeries(self, request: pb.SeriesRequest, context: Any) -> pb.UsageSeries:
        return self._read(context, lambda: self._core.series(
            request.resolution, request.group_by, request.start_ms, request.end_ms))

    def ExportUsage(self, request: pb.ExportUsageRequest,
                    context: Any) -> httpbody_pb2.HttpBody:
        def work() -> httpbody_pb2.HttpBody:
            content_type, data = self._core.export_usage(
                request.format or "csv", request.resolution, request.group_by,
                request.start_ms, request.end_ms)
            return httpbody_pb2.HttpBody(content_type=content_type, data=data)
        return self._read(context, work)

    # ------------------------------------------------------------- events, audit
    def ListEvents(self, request: pb.ListEventsRequest, context: Any) -> pb.EventList:
        return self._read(context, lambda: self._core.events(request.limit, request.kind))

    def ListAudit(self, request: pb.ListAuditRequest, context: Any) -> pb.AuditList:
        return self._read(context, lambda: self._core.audit_entries(request.limit))

    # ------------------------------------------------------------- the dashboard
    def Asset(self, request: pb.AssetRequest, context: Any) -> httpbody_pb2.HttpBody:
        found = assets.read(request.path)
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such dashboard file")
        content_type, data = found
        return httpbody_pb2.HttpBody(content_type=content_type, data=data)


def _now_ms() -> int:
    return int(time.time() * 1000)
