"""The admin listener of the Envoy bootstrap: the admin API as JSON (Envoy's gRPC-JSON
transcoder, from the HTTP annotations of protos/tokenfuse/admin/v1/admin.proto; the
compiled descriptor set is embedded) and the dashboard, on TOKENFUSE_ADMIN_ADDRESS:
TOKENFUSE_ADMIN_PORT — never the proxy listener. Only the admin service's own methods
reach the processor from here: any other path (another gRPC service of the processor's,
such as ext_proc) is a 404."""

from __future__ import annotations

import base64
from importlib import resources
from typing import Any

from tokenfuse.config import Settings

TRANSCODER = ("type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3."
              "GrpcJsonTranscoder")
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
       "HttpConnectionManager")
SERVICE = "tokenfuse.admin.v1.Admin"
#: The dashboard's page and the API's answers: no framing, no sniffing, nothing from
#: elsewhere (the page loads its own script and style only), no caching of answers.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def descriptor_set() -> bytes:
    """The compiled admin API with its imports (protos/build.py writes it at setup)."""
    return (resources.files("tokenfuse.admin.v1") / "admin.pb").read_bytes()


def admin_listener(settings: Settings, processor_cluster: str) -> dict[str, Any]:
    admin = settings.admin
    transcoder = {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": TRANSCODER,
            "proto_descriptor_bin": base64.b64encode(descriptor_set()).decode(),
            "services": [SERVICE],
            "print_options": {"add_whitespace": True, "always_print_primitive_fields": True,
                              "preserve_proto_field_names": True},
            # A gRPC error becomes its HTTP status with a JSON body {code, message}.
            "convert_grpc_status": True,
            "request_validation_options": {"reject_unknown_method": True,
                                           "reject_unknown_query_parameters": True},
            "max_request_body_size": admin.max_upload_bytes,
            "max_response_body_size": 64 * 1024 * 1024,
        },
    }
    hcm = {
        "@type": HCM, "stat_prefix": "tokenfuse_admin", "codec_type": "AUTO",
        "route_config": {"name": "admin", "virtual_hosts": [{
            "name": "admin", "domains": ["*"],
            "response_headers_to_add": [
                {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                for k, v in SECURITY_HEADERS.items()],
            "routes": [
                # The transcoder has rewritten a known JSON call to this path (and the
                # route is chosen again); a gRPC client may call the service directly.
                {"match": {"prefix": f"/{SERVICE}/", "grpc": {}},
                 "route": {"cluster": processor_cluster, "timeout": "30s"}},
                {"match": {"prefix": "/"}, "direct_response": {
                    "status": 404, "body": {"inline_string":
                                            '{"code":5,"message":"no such admin path"}\n'}}},
            ]}]},
        "http_filters": [transcoder, {"name": "envoy.filters.http.router",
                                      "typed_config": {"@type": ROUTER}}],
    }
    return {
        "name": "admin",
        "address": {"socket_address": {"address": admin.address, "port_value": admin.port}},
        "per_connection_buffer_limit_bytes": admin.max_upload_bytes + 64 * 1024,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }
