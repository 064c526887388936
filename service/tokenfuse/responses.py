"""Building ext_proc answers: continue (with mutations) or an immediate JSON reply."""

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


def continue_request(body: bytes | None = None, set_headers: tuple[tuple[str, str], ...] = (),
                     remove_headers: tuple[str, ...] = ()) -> pb.ProcessingResponse:
    """Continue, optionally with a rewritten body (and its content-length) and headers
    (e.g. the pooled provider key). The key travels to Envoy only in this message."""
    headers = list(set_headers)
    if body is not None:
        headers.append(("content-length", str(len(body))))
    return pb.ProcessingResponse(
        request_body=pb.BodyResponse(
            response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(
                    set_headers=[header_option(k, v) for k, v in headers],
                    remove_headers=list(remove_headers),
                ),
                body_mutation=pb.BodyMutation(body=body) if body is not None else None,
            )
        )
    )
