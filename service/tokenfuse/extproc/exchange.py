"""What the processor knows about one HTTP request/response, across its phases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenfuse.metering.response_coding import Transcoder
from tokenfuse.metering.stream import StreamMeter
from tokenfuse.pricing import ModelPrice, TokenUsage
from tokenfuse.providers import Call, Provider
from tokenfuse.state.analytics import group_of

if TYPE_CHECKING:
    from tokenfuse.tracing import CallTrace


@dataclass
class Exchange:
    provider_name: str = ""
    provider: Provider | None = None  # set once the route is known
    path: str = ""
    caller: str = ""
    request_id: str = ""  # minted by tokenfuse: the reservation and loop-guard member
    client_request_id: str = ""  # the x-request-id Envoy forwards: logs and the pool grant
    call: Call | None = None
    price: ModelPrice | None = None
    bound_price: ModelPrice | None = None  # the long-context tier the reservation used
    input_exact: bool = False  # input_nano is the provider's reported input, not the bound
    input_nano: int = 0  # estimated input cost inside the reservation
    reserved_nano: int = 0
    open_reservation: bool = False
    status: int = 0
    usage: TokenUsage | None = None
    body_chunks: list[bytes] = field(default_factory=list)
    meter: StreamMeter | None = None
    output_allowance: int = 0  # output tokens the reservation covers
    output_cap: int | None = None  # the request's own output limit
    counted_output: int = 0  # output tokens seen so far (delivered or cut)
    final_seen: bool = False  # the stream's last event arrived: its usage is complete
    ended: bool = False  # the processor ended the response itself
    control_version: int = 0  # operator changes to this caller already checked
    pool: str = ""  # the caller used a gateway key bound to this pool
    pool_key: str = ""  # id of the provider key chosen from the pool
    response_started: bool = False  # the first response message has been seen
    forwarded: bool = False  # the request body went on to the provider
    hidden_output: bool = False  # output may be billed without being streamed
    content_codings: list[str] = field(default_factory=list)  # the request body's encoding
    decoded_body: bytes | None = None  # the request body decoded (forwarded instead)
    response_coding: str | None = None  # the upstream compressed anyway ("" no; None: unknown)
    response_head: bytes = b""  # first response bytes, held until the coding is known
    transcoder: Transcoder | None = None  # decodes/re-encodes such a stream
    near_fingerprint: str | None = None  # the near-duplicate loop tier's, when it is on
    answer: str = ""  # fingerprint of a whole (non-streamed) answer, for that tier
    trace: CallTrace | None = None  # this request's span (None: tracing is off)
    started_ns: int = 0  # time.monotonic_ns() at the request headers (analytics latency)
    first_byte_ns: int = 0  # ... at the first response message (time to first byte)
    refusal_counted: bool = False  # reserve.lua counted this request's refusal itself
    cut: str = ""  # the reason tokenfuse cut this stream ("" = not cut)

    def group(self) -> str:
        """The analytics group of this call: provider, pool, model."""
        return group_of(self.provider_name, self.pool,
                        self.call.model if self.call is not None else "")
