"""Building ext_proc answers: continue (with mutations), a streamed chunk, or an immediate
JSON reply; and reading a headers message."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

JSON_HEADERS = (("content-type", "application/json"),)


def header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def immediate(status: int, body: bytes, details: str,
              headers: tuple[tuple[str, str], ...] = ()) -> pb.ProcessingResponse:
    """Answer the client now; nothing is forwarded upstream."""
    mutation = pb.HeaderMutation(
        set_headers=[header_option(k, v) for k, v in (*JSON_HEADERS, *headers)]
    )
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=mutation,
            body=body,
            details=details,
        )
    )


CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE = {
    "request_headers": CONTINUE_REQUEST_HEADERS,
    "request_body": CONTINUE_REQUEST_BODY,
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_headers": CONTINUE_RESPONSE_HEADERS,
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def header_mutation_response(phase: str, set_headers: tuple[tuple[str, str], ...],
                             remove_headers: tuple[str, ...],
                             clear_route_cache: bool = False) -> pb.ProcessingResponse:
    """Continue a headers phase ("request_headers"/"response_headers") with changes."""
    common = pb.CommonResponse(
        header_mutation=pb.HeaderMutation(
            set_headers=[header_option(k, v) for k, v in set_headers],
            remove_headers=list(remove_headers)),
        clear_route_cache=clear_route_cache)
    return pb.ProcessingResponse(**{phase: pb.HeadersResponse(response=common)})


def stream_chunk(body: bytes, end_of_stream: bool) -> pb.ProcessingResponse:
    """FULL_DUPLEX_STREAMED: the bytes the client gets next (Envoy sends only these)."""
    return pb.ProcessingResponse(
        response_body=pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(
                        body=body, end_of_stream=end_of_stream)
                )
            )
        )
    )


def continue_request(body: bytes, remove_headers: tuple[str, ...] = ()
                     ) -> pb.ProcessingResponse:
    """Continue with a rewritten request body (and its content-length)."""
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(
                    set_headers=[header_option("content-length", str(len(body)))],
                    remove_headers=list(remove_headers)),
                body_mutation=pb.BodyMutation(body=body),
            )
        )
    )


def headers_of(msg: pb.HttpHeaders) -> dict[str, str]:
    """A headers message as a dict of lower-case names (the last value of a repeated one)."""
    return {
        h.key.lower(): (h.raw_value.decode("latin-1") if h.raw_value else h.value)
        for h in msg.headers.headers
    }


def header_values(msg: pb.HttpHeaders) -> dict[str, list[str]]:
    """Every value of every header, in order (a repeated header keeps all its values)."""
    out: dict[str, list[str]] = {}
    for h in msg.headers.headers:
        value = h.raw_value.decode("latin-1") if h.raw_value else h.value
        out.setdefault(h.key.lower(), []).append(value)
    return out
