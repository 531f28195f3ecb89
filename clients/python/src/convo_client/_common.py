"""What the sync and asyncio clients share: identity, channel security,
retry policy and the requests each call sends."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import grpc

from convo.v1 import convo_pb2 as pb

Metadata = Tuple[Tuple[str, str], ...]


class ConvoError(Exception):
    """Base class of the errors this package raises itself."""


class Truncated(ConvoError):
    """A watched conversation was truncated below the stream's position
    (ABORTED): re-read it and watch again from its new end."""

    def __init__(self, status: grpc.RpcError):
        super().__init__(status.details() if hasattr(status, "details") else str(status))
        self.status = status


class StillRacing(ConvoError):
    """`append_if_last` gave up: other writers kept appending first."""


@dataclass(frozen=True)
class Retry:
    """Retries of calls the server refused for load or could not reach the
    database for, with exponential backoff and full jitter.

    UNAVAILABLE may come after the server committed (the reply was lost), so
    it is retried only for calls that cannot apply twice: reads, and writes
    that carry a request_id (appends and creates always do here).
    RESOURCE_EXHAUSTED from the in-flight bound means the call never ran, so
    it is retried for every call.
    """

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    codes: frozenset = field(
        default_factory=lambda: frozenset(
            {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
        )
    )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1 for the first)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0, ceiling)

    def should_retry(self, error: grpc.RpcError, attempt: int, idempotent: bool) -> bool:
        if attempt >= self.attempts:
            return False
        code = error.code() if hasattr(error, "code") else None
        if code not in self.codes:
            return False
        return idempotent or code == grpc.StatusCode.RESOURCE_EXHAUSTED


NO_RETRY = Retry(attempts=1)


def identity_metadata(user_id: Optional[str], token: Optional[str]) -> Metadata:
    if (user_id is None) == (token is None):
        raise ValueError("give exactly one of user_id (x-user-id) and token (bearer JWT)")
    if token is not None:
        return (("authorization", f"Bearer {token}"),)
    return (("x-user-id", user_id),)


def channel_credentials(
    tls: bool,
    root_certificates: Optional[bytes],
    private_key: Optional[bytes],
    certificate_chain: Optional[bytes],
) -> Optional[grpc.ChannelCredentials]:
    """TLS when asked for or when any certificate material is given; mTLS when
    a client key and certificate are."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("mTLS needs both private_key and certificate_chain")
    if not (tls or root_certificates or private_key):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
    )


def new_request_id() -> str:
    return uuid.uuid4().hex


def new_message(
    role: int,
    content: str = "",
    *,
    parts: Optional[Iterable[pb.Part]] = None,
    metadata: Optional[Mapping[str, str]] = None,
    name: str = "",
    model: str = "",
    usage: Optional[pb.Usage] = None,
) -> pb.NewMessage:
    """A message to append, in the contract's terms."""
    message = pb.NewMessage(
        role=role,
        content=content,
        parts=list(parts or ()),
        metadata=dict(metadata or {}),
        name=name,
        model=model,
    )
    if usage is not None:
        message.usage.CopyFrom(usage)
    return message


def append_request(
    conversation_id: str,
    messages: Sequence[pb.NewMessage],
    request_id: Optional[str],
    expected_last_sequence: Optional[int],
) -> pb.AppendMessagesRequest:
    request = pb.AppendMessagesRequest(
        conversation_id=conversation_id,
        messages=list(messages),
        request_id=request_id or new_request_id(),
    )
    if expected_last_sequence is not None:
        request.expected_last_sequence = expected_last_sequence
    return request
