"""Render the Envoy bootstrap for tokenfuse from its settings.

`python -m tokenfuse.deploy.envoy_config out.json` writes it; `make run` and the tests use
it. The names and modes the processor relies on come from `tokenfuse.contract`.
(One module for one document, the bootstrap, so it reads top to bottom; hence its length.)
Envoy consults the processor (ext_proc, over a Unix socket) on every provider route and
fails closed: if the processor is unreachable or slow, the client gets a JSON 503 and
nothing is forwarded.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tokenfuse.config import ConfigError, Settings, load_settings, worker_sockets
from tokenfuse.contract import (
    EXT_PROC_FILTER,
    GATEWAY_KEY_PROCESSING_MODE,
    POOL_HEADER,
    PROCESSING_MODE,
    PROVIDER_METADATA,
    RESPONSE_ATTRIBUTES,
    RETRY_HEADER,
    STAGE_METADATA,
    UPSTREAM_PROCESSING_MODE,
    UPSTREAM_SIGNING_PROCESSING_MODE,
    UPSTREAM_STAGE,
)
from tokenfuse.deploy.admin_listener import admin_listener
from tokenfuse.identity import VIRTUAL_KEY_PREFIX
from tokenfuse.providers import PROVIDERS, Provider

EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_PROC_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext")
UPSTREAM_CODEC = (
    "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec")
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def _unavailable_body(code: str, message: str) -> dict[str, Any]:
    # One body both SDKs surface: OpenAI reads error.message, Anthropic error.type/message.
    return {
        "json_format": {
            "type": "error",
            "error": {"type": "api_error", "code": code, "message": message},
        },
        "content_type": "application/json",
    }


def _local_replies() -> dict[str, Any]:
    """JSON bodies for replies Envoy makes itself (the processor's own are already JSON)."""
    return {
        "mappers": [
            {
                # ext_proc failures: unreachable/erroring processor (500), timeout (504).
                "filter": {"or_filter": {"filters": [
                    {"status_code_filter": {"comparison": {
                        "op": "EQ", "value": {"default_value": 500, "runtime_key": "tf_500"}}}},
                    {"status_code_filter": {"comparison": {
                        "op": "EQ", "value": {"default_value": 504, "runtime_key": "tf_504"}}}},
                ]}},
                "status_code": 503,
                "headers_to_add": [{"header": {"key": "retry-after", "value": "1"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
                "body_format_override": _unavailable_body(
                    "processor_unavailable",
                    "tokenfuse processor unavailable; nothing was forwarded "
                    "(%RESPONSE_CODE_DETAILS%)"),
            },
            {
                "filter": {"status_code_filter": {"comparison": {
                    "op": "EQ", "value": {"default_value": 413, "runtime_key": "tf_413"}}}},
                "body_format_override": _unavailable_body(
                    "request_too_large",
                    "request body larger than TOKENFUSE_MAX_REQUEST_BYTES (decoded, if it "
                    "was compressed); nothing was forwarded"),
            },
            {
                "filter": {"response_flag_filter": {
                    "flags": ["UF", "UH", "UO", "URX", "UT", "UC", "NR"]}},
                "body_format_override": _unavailable_body(
                    "upstream_unavailable",
                    "the provider could not be reached (%RESPONSE_FLAGS%: "
                    "%RESPONSE_CODE_DETAILS%)"),
            },
        ]
    }


# Every in-flight HTTP request holds one ext_proc stream: the default circuit breaker
# (1,024 requests per cluster) would turn a flood into 503s long before anything is busy.
CIRCUIT_BREAKERS = {"thresholds": [{
    "max_connections": 100000, "max_pending_requests": 100000,
    "max_requests": 100000, "max_retries": 16,
}]}


def _cluster(name: str, url: str, ca_bundle: str) -> tuple[dict[str, Any], str, str]:
    """Cluster for one upstream URL; returns (cluster, host header, path prefix)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream URL for {name} must be http(s)://host[:port][/path]: {url}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    cluster: dict[str, Any] = {
        "name": name,
        "type": "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": 33554432,
        "circuit_breakers": CIRCUIT_BREAKERS,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        ]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3."
                                             "HttpProtocolOptions": {
            "@type": HTTP_OPTIONS,
            **({"upstream_http_protocol_options": {"auto_sni": True,
                                                   "auto_san_validation": True}}
               if tls else {}),
            "explicit_http_config": {"http_protocol_options": {}},
        }},
    }
    if tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": TLS,
            "sni": host,
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": ca_bundle}}},
        }}
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    return cluster, host_header, parts.path.rstrip("/")


# Requests with a gateway key also send response headers: the processor reads which pool
# key served them and strips the internal headers.
GATEWAY_KEY_PROCESSING = {EXT_PROC_FILTER: {
    "@type": EXT_PROC_ROUTE,
    "overrides": {"processing_mode": GATEWAY_KEY_PROCESSING_MODE},
}}


def _gateway_key_matches(provider: Provider) -> list[dict[str, Any]]:
    """Route matches for a gateway key in any header (or query parameter: Google's `?key=`)
    the provider reads a key from."""
    matches: list[dict[str, Any]] = []
    for credential in provider.credentials:
        regex = (rf"(?i){credential.scheme} \s*{VIRTUAL_KEY_PREFIX}.*" if credential.scheme
                 else rf"\s*{VIRTUAL_KEY_PREFIX}.*")
        matches.append({"headers": [{"name": credential.header,
                                     "string_match": {"safe_regex": {"regex": regex}}}]})
    for name, _ in provider.query_credentials:
        for spelled in (name, f"${name}"):
            matches.append({"query_parameters": [{
                "name": spelled, "string_match": {"prefix": VIRTUAL_KEY_PREFIX}}]})
    return matches


COMPRESSOR = "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor"
#: Content codings Envoy compresses responses with toward the client, and their libraries;
#: gzip first (what the providers send; chosen when the client ranks several equally).
CODINGS = (
    ("gzip", "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip"),
    ("br", "type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli"),
    ("zstd", "type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd"),
)
#: Responses compressed toward the client: JSON, event streams (SSE, and NDJSON:
#: Ollama's native streams), text (errors included). Envoy flushes each chunk.
COMPRESSED_TYPES = [{"prefix": "application/json"}, {"prefix": "text/event-stream"},
                    {"prefix": "application/x-ndjson"}, {"prefix": "text/plain"}]
#: What the provider is asked for: identity (RFC 9110: no accept-encoding would allow any).
UPSTREAM_ACCEPT_ENCODING = {"header": {"key": "accept-encoding", "value": "identity"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def compressors() -> list[dict[str, Any]]:
    """Compressor filters, placed before ext_proc: a response goes router → ext_proc
    (reads identity bytes, meters, cuts, appends its own events) → compressor (per the
    client's accept-encoding; every chunk is flushed, so a stream stays a stream). The last
    one removes accept-encoding (each has read it by then); the route asks the provider for
    identity. Request bodies are decoded by the processor itself (bounded, priced,
    forwarded decoded). Envoy's decompressor filter is not used: it turns the end of a
    response into trailers that a full-duplex ext_proc never receives (measured on 1.40:
    the response hangs), so a provider that compresses anyway is decoded by the processor
    (tokenfuse.metering.response_coding)."""
    filters = []
    for index, (coding, library) in enumerate(CODINGS):
        response: dict[str, Any] = {"common_config": {
            "min_content_length": 30, "content_type_matcher": COMPRESSED_TYPES}}
        if index == len(CODINGS) - 1:
            response["remove_accept_encoding_header"] = True
        filters.append({"name": f"tokenfuse.compressor.{coding}", "typed_config": {
            "@type": COMPRESSOR,
            "compressor_library": {"name": coding, "typed_config": {"@type": library}},
            "response_direction_config": response,
            "request_direction_config": {"common_config": {"enabled": {
                "default_value": False, "runtime_key": f"tf_compress_request_{coding}"}}},
            **({"choose_first": True} if index == 0 else {}),
        }})
    return filters


def _pooled_cluster(cluster: dict[str, Any], provider: str, grpc_timeout: str,
                    message_timeout: str) -> dict[str, Any]:
    """The provider cluster with ext_proc in its upstream filter chain (one call per
    attempt: request headers to set the key, response headers to judge it)."""
    pooled = copy.deepcopy(cluster)
    pooled["name"] = cluster["name"].replace("upstream_", "pooled_", 1)
    options = pooled["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options["http_filters"] = [
        {"name": EXT_PROC_FILTER, "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": {"envoy_grpc": {"cluster_name": "tokenfuse_processor"},
                             "timeout": grpc_timeout,
                             "initial_metadata": [
                                 {"key": STAGE_METADATA, "value": UPSTREAM_STAGE},
                                 {"key": PROVIDER_METADATA, "value": provider}]},
            "failure_mode_allow": False,
            "message_timeout": message_timeout,
            "processing_mode": UPSTREAM_SIGNING_PROCESSING_MODE
            if PROVIDERS[provider].signs_pooled_requests else UPSTREAM_PROCESSING_MODE,
        }},
        {"name": "envoy.filters.http.upstream_codec",
         "typed_config": {"@type": UPSTREAM_CODEC}},
    ]
    return pooled


def _pool_retry_policy(retries: int) -> dict[str, Any]:
    """Retry only what the upstream processor marked: a failure another key may not have."""
    return {
        "retry_on": "retriable-headers",
        "retriable_headers": [{"name": RETRY_HEADER, "present_match": True}],
        "num_retries": retries,
        "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.1s"},
    }


def _processor_cluster(settings: Settings, processor_address: str) -> dict[str, Any]:
    """How Envoy reaches the processor: its Unix socket(s), or `host:port` over TCP (a
    processor in another container or Service; every address the name resolves to is an
    endpoint, so a headless Service or a scaled compose service spreads the streams)."""
    cluster: dict[str, Any] = {
        "name": "tokenfuse_processor",
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": CIRCUIT_BREAKERS,
        # One endpoint per processor process (TOKENFUSE_PROCESSES); Envoy balances the
        # ext_proc streams (one per HTTP request) over them round robin.
        "load_assignment": {"cluster_name": "tokenfuse_processor", "endpoints": [{
            "lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": str(path)}}}}
                for path in worker_sockets(settings.processor.socket,
                                           settings.processor.processes)]
        }]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3."
                                             "HttpProtocolOptions": {
            "@type": HTTP_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {
                "connection_keepalive": {"interval": "30s", "timeout": "5s"}}},
        }},
    }
    if processor_address:
        host, _, port = processor_address.rpartition(":")
        cluster.update({
            "type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED", "dns_refresh_rate": "5s",
            "load_assignment": {"cluster_name": "tokenfuse_processor", "endpoints": [{
                "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": host.strip("[]"), "port_value": int(port)}}}}]}]},
        })
    return cluster


def _ready_listener(port: int, admin_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A listener on all addresses answering only `GET /ready`, from the admin interface
    (which stays on 127.0.0.1: it can stop Envoy and rewrite its runtime); for probes from
    outside the container. Returns (listener, the admin cluster)."""
    admin = {"name": "envoy_admin", "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{
                 "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                     "address": "127.0.0.1", "port_value": admin_port}}}}]}]}}
    hcm = {
        "@type": HCM, "stat_prefix": "ready", "codec_type": "AUTO",
        "route_config": {"name": "ready", "virtual_hosts": [{
            "name": "ready", "domains": ["*"], "routes": [
                {"match": {"path": "/ready", "headers": [
                    {"name": ":method", "string_match": {"exact": "GET"}}]},
                 "route": {"cluster": "envoy_admin", "timeout": "2s"}},
                {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    listener = {"name": "ready", "address": {"socket_address": {
        "address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]}
    return listener, admin


def render(settings: Settings, processor_address: str = "", ready_port: int = 0
           ) -> dict[str, Any]:
    """The bootstrap. `processor_address` (host:port) reaches the processor over TCP
    instead of its Unix socket; `ready_port` adds the /ready listener (the deployment
    profiles, tokenfuse.deploy.profiles)."""
    envoy = settings.envoy
    max_request = envoy.max_request_bytes
    timeout_ms = settings.processor.timeout_ms
    ca_bundle = envoy.ca_bundle
    pool_retries = settings.pools.max_retries
    grpc_timeout = f"{max(timeout_ms, 1000) // 1000 + 4}s"
    message_timeout = f"{timeout_ms / 1000:.3f}s"

    clusters: list[dict[str, Any]] = [_processor_cluster(settings, processor_address)]
    routes: list[dict[str, Any]] = [{
        "match": {"path": "/healthz"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
        "typed_per_filter_config": {EXT_PROC_FILTER: {
            "@type": EXT_PROC_ROUTE, "disabled": True}},
    }]
    for provider, spec in PROVIDERS.items():
        if not envoy.upstreams.get(provider):
            continue  # not configured: the processor refuses its path (404), never forwards
        cluster, host_header, base_path = _cluster(f"upstream_{provider}",
                                                   envoy.upstreams[provider], ca_bundle)
        clusters.append(cluster)
        route = {
            "cluster": cluster["name"],
            "prefix_rewrite": f"{base_path}/",
            "host_rewrite_literal": host_header,
            "timeout": "0s",
            "idle_timeout": "300s",
        }
        pooled = _pooled_cluster(cluster, provider, grpc_timeout, message_timeout)
        clusters.append(pooled)
        routes.append({
            "match": {"prefix": f"/{provider}/",
                      "headers": [{"name": POOL_HEADER, "present_match": True}]},
            "route": {**route, "cluster": pooled["name"],
                      "retry_policy": _pool_retry_policy(pool_retries)},
        })
        # A gateway key: the processor re-routes it to the pooled route above and needs the
        # response headers (the key the final attempt used). Envoy fixes the processing mode
        # when it first matches a route, so the key is recognised here, before the decision.
        # (Not on the pooled route: its per-route config would reach the upstream ext_proc.)
        routes.extend({"match": {"prefix": f"/{provider}/", **match},
                       "route": route, "typed_per_filter_config": GATEWAY_KEY_PROCESSING}
                      for match in _gateway_key_matches(spec))
        routes.append({"match": {"prefix": f"/{provider}/"}, "route": route})
        if envoy.bench_routes:
            # Benchmarks only: the same route with the processor disabled ("Envoy alone").
            routes.insert(0, {
                "match": {"prefix": f"/direct/{provider}/"}, "route": route,
                "typed_per_filter_config": {EXT_PROC_FILTER: {
                    "@type": EXT_PROC_ROUTE, "disabled": True}},
            })

    ext_proc = {
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": {"envoy_grpc": {"cluster_name": "tokenfuse_processor"},
                             "timeout": grpc_timeout},
            "failure_mode_allow": False,
            "message_timeout": message_timeout,
            "processing_mode": PROCESSING_MODE,
            "response_attributes": list(RESPONSE_ATTRIBUTES),
        },
    }
    hcm = {
        "@type": HCM,
        "stat_prefix": "tokenfuse",
        "codec_type": "AUTO",
        "stream_idle_timeout": "300s",
        "request_timeout": "0s",
        # One path for Envoy's route, the processor's pricing and the provider: dot
        # segments resolved and slashes merged before anything reads it (an Azure
        # deployment in the path must be the one the provider runs). An escaped slash is
        # kept as sent, for the processor to judge: it refuses it except inside a segment
        # the provider reads as one value (a Bedrock ARN model id, `Provider.
        # escaped_slash_allowed`).
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "local_reply_config": _local_replies(),
        "route_config": {"name": "providers", "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": routes,
             "request_headers_to_add": [UPSTREAM_ACCEPT_ENCODING]}]},
        "http_filters": [*compressors(), ext_proc, {
            "name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    max_connections = envoy.max_connections
    extra_listeners: list[dict[str, Any]] = []
    if settings.admin.port:
        extra_listeners.append(admin_listener(settings, clusters[0]["name"]))
    if ready_port:
        listener, admin = _ready_listener(ready_port, envoy.admin_port)
        extra_listeners.append(listener)
        clusters.append(admin)
    return {
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                         "downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": max_connections}}]},
        "admin": {"address": {"socket_address": {
            "address": "127.0.0.1",
            "port_value": envoy.admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "llm",
                "address": {"socket_address": {
                    "address": envoy.listen_address,
                    "port_value": envoy.listen_port}},
                "per_connection_buffer_limit_bytes": max_request,
                "filter_chains": [{
                    "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": hcm}],
                    **_listener_tls(envoy.tls_cert_file, envoy.tls_key_file)}],
            }, *extra_listeners],
            "clusters": clusters,
        },
    }


def _listener_tls(cert_file: str, key_file: str) -> dict[str, Any]:
    """HTTPS on the listener when a certificate is configured (HTTP/1.1 and h2 by ALPN)."""
    if not cert_file:
        return {}
    return {"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": DOWNSTREAM_TLS,
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [{"certificate_chain": {"filename": cert_file},
                                  "private_key": {"filename": key_file}}]},
    }}}


def main() -> None:
    if any(arg.startswith("--") for arg in sys.argv[1:]):
        from tokenfuse.deploy.profiles import main as profiles_main

        sys.exit(profiles_main(sys.argv[1:]))
    out = sys.argv[1] if len(sys.argv) > 1 else "-"
    try:
        text = json.dumps(render(load_settings()), indent=2)
    except ConfigError as exc:
        print(f"tokenfuse: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    if out == "-":
        print(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
