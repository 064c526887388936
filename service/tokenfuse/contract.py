"""The contract between Envoy and the processor, shared by the runtime and the renderer.

Names and modes both sides must agree on: the ext_proc filter (also the key of the
attributes Envoy attaches), the internal headers that route a gateway-key request to a
key pool, the gRPC metadata that marks the pooled clusters' upstream stage, the
processing modes, and the grant that proves a pool route was set by the processor.
The runtime imports this module, never the renderer (`tokenfuse.deploy.envoy_config`).
"""

from __future__ import annotations

import hashlib
import hmac

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"

#: Only tokenfuse sets headers with this prefix; a client's are dropped.
INTERNAL_HEADER_PREFIX = "x-tokenfuse-"
# Pooled (gateway-key) requests: the downstream processor sets the pool and its grant and
# Envoy re-picks the route; the processor in the pooled cluster's upstream filter chain
# chooses the provider key for every attempt and marks failures worth another key.
POOL_HEADER = "x-tokenfuse-pool"
GRANT_HEADER = "x-tokenfuse-grant"
RETRY_HEADER = "x-tokenfuse-retry"
POOL_KEY_HEADER = "x-tokenfuse-pool-key"
#: gRPC metadata on the streams of the pooled clusters' upstream filter.
STAGE_METADATA = "x-tokenfuse-stage"
UPSTREAM_STAGE = "upstream"
#: ... and the provider of the pooled cluster (a retried attempt carries no routing header,
#: and many providers share the `authorization` header).
PROVIDER_METADATA = "x-tokenfuse-provider"

#: The status arrives with the first response body message as this attribute, so the
#: response headers are not sent at all (one round trip fewer per request).
RESPONSE_ATTRIBUTES = ("response.code",)

# Request headers are always sent (skipping them with a buffered body lets Envoy forward
# requests before the decision: the fail-open trap). The processor echoes every response
# byte the client gets, so it can hold back, drop (the usage chunk it asked for) and end a
# stream cleanly.
PROCESSING_MODE = {
    "request_header_mode": "SEND",
    "request_body_mode": "BUFFERED",
    "response_header_mode": "SKIP",
    "response_body_mode": "FULL_DUPLEX_STREAMED",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SEND",
}
#: Gateway-key requests also send response headers: the processor reads which pool key
#: served them and strips the internal headers.
GATEWAY_KEY_PROCESSING_MODE = {**PROCESSING_MODE, "response_header_mode": "SEND"}
#: One stream per pooled attempt: request headers to set the key, response headers to
#: judge it.
UPSTREAM_PROCESSING_MODE = {
    "request_header_mode": "SEND", "request_body_mode": "NONE",
    "request_trailer_mode": "SKIP", "response_header_mode": "SEND",
    "response_body_mode": "NONE", "response_trailer_mode": "SKIP",
}
#: ... and of a provider whose pooled credentials sign each attempt over its body (AWS
#: SigV4, `Provider.signs_pooled_requests`): the body comes too, and the signature is set in
#: the body's answer (Envoy holds the headers of a buffered body until then).
UPSTREAM_SIGNING_PROCESSING_MODE = {**UPSTREAM_PROCESSING_MODE, "request_body_mode": "BUFFERED"}


def grant(secret: bytes, route: str, request_id: str) -> str:
    """Proof that the downstream processor (not the client) routed this request to a pool."""
    message = f"{route}\n{request_id}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()
