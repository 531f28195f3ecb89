"""The details convo attaches to a refusal, read off a `grpc.RpcError`:
which fields a request got wrong (`INVALID_ARGUMENT` carries a
`google.rpc.BadRequest`) and which condition failed (`FAILED_PRECONDITION`
carries a `google.rpc.PreconditionFailure`). grpcio-status decodes the
status they travel in."""

from __future__ import annotations

from typing import List, NamedTuple

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class FieldViolation(NamedTuple):
    """A field of the request and what is wrong with it, e.g.
    `("messages[0].content", "content must not be empty")`."""

    field: str
    description: str


class PreconditionViolation(NamedTuple):
    """A failed condition, e.g. `("TOOL_CALL_NOT_FOUND", "call_9", "…")`."""

    type: str
    subject: str
    description: str


def _details(error: grpc.RpcError) -> list:
    # grpcio's errors and grpc.aio's both answer the calls from_call makes
    # (code, details, trailing metadata); an RpcError of another making may not.
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    return list(status.details) if status is not None else []


def field_violations(error: grpc.RpcError) -> List[FieldViolation]:
    """Every field an `INVALID_ARGUMENT` names, in the server's order; empty
    for any other error."""
    found = []
    for detail in _details(error):
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found


def precondition_violations(error: grpc.RpcError) -> List[PreconditionViolation]:
    """Every condition a `FAILED_PRECONDITION` names (a tool call id that no
    earlier message makes, or one already used); empty for any other error."""
    found = []
    for detail in _details(error):
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            found.extend(
                PreconditionViolation(v.type, v.subject, v.description) for v in failure.violations
            )
    return found
