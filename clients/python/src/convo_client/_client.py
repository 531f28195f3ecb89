"""The synchronous client."""

from __future__ import annotations

import time
from typing import Callable, Iterator, Mapping, Optional, Sequence

import grpc

from convo.v1 import convo_pb2 as pb
from convo.v1 import convo_pb2_grpc as rpc

from ._common import (
    Metadata,
    Retry,
    StillRacing,
    Truncated,
    append_request,
    channel_credentials,
    identity_metadata,
    new_request_id,
)


class ConvoClient:
    """A convo.v1 client acting for one user.

    Identity is `user_id` (sent as `x-user-id`, for a trusted network) or
    `token` (a bearer JWT). TLS is on when `tls=True` or certificate material
    is given (`root_certificates`; `private_key` and `certificate_chain` for
    mTLS). Every call has a deadline (`timeout` seconds unless the call is
    given its own) and is retried per `retry` (see `Retry`): appends and
    creates always carry a request_id, generated when none is given and reused
    by every retry, so a retry can never write twice. `options` are gRPC
    channel options; `interceptors` are gRPC client interceptors.
    """

    def __init__(
        self,
        target: str,
        *,
        user_id: Optional[str] = None,
        token: Optional[str] = None,
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        timeout: float = 30.0,
        retry: Retry = Retry(),
        options: Sequence = (),
        interceptors: Sequence = (),
    ):
        self._metadata: Metadata = identity_metadata(user_id, token)
        credentials = channel_credentials(tls, root_certificates, private_key, certificate_chain)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=list(options))
        else:
            self._channel = grpc.secure_channel(target, credentials, options=list(options))
        channel = grpc.intercept_channel(self._channel, *interceptors)
        self._stub = rpc.ConversationServiceStub(channel)
        self.timeout = timeout
        self.retry = retry

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ConvoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # The one place calls are made.
    def _call(self, method: str, request, *, idempotent: bool, timeout: Optional[float] = None):
        attempt = 0
        while True:
            attempt += 1
            try:
                return getattr(self._stub, method)(
                    request,
                    timeout=self.timeout if timeout is None else timeout,
                    metadata=self._metadata,
                )
            except grpc.RpcError as error:
                if not self.retry.should_retry(error, attempt, idempotent):
                    raise
                time.sleep(self.retry.delay(attempt))

    # Conversations.
    def create_conversation(
        self,
        title: str = "",
        *,
        metadata: Optional[Mapping[str, str]] = None,
        request_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> pb.Conversation:
        request = pb.CreateConversationRequest(
            title=title, metadata=dict(metadata or {}), request_id=request_id or new_request_id()
        )
        return self._call("CreateConversation", request, idempotent=True, timeout=timeout)

    def get_conversation(self, conversation_id: str, *, timeout: Optional[float] = None):
        request = pb.GetConversationRequest(conversation_id=conversation_id)
        return self._call("GetConversation", request, idempotent=True, timeout=timeout)

    def list_conversations(self, *, page_size: int = 0, page_token: str = "", timeout=None):
        request = pb.ListConversationsRequest(page_size=page_size, page_token=page_token)
        return self._call("ListConversations", request, idempotent=True, timeout=timeout)

    def update_conversation(
        self,
        conversation_id: str,
        *,
        title: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> pb.Conversation:
        request = pb.UpdateConversationRequest(conversation_id=conversation_id)
        if title is not None:
            request.title = title
            request.update_mask.paths.append("title")
        if metadata is not None:
            request.metadata.update(metadata)
            request.update_mask.paths.append("metadata")
        return self._call("UpdateConversation", request, idempotent=True, timeout=timeout)

    def delete_conversation(self, conversation_id: str, *, timeout: Optional[float] = None):
        request = pb.DeleteConversationRequest(conversation_id=conversation_id)
        return self._call("DeleteConversation", request, idempotent=False, timeout=timeout)

    def fork_conversation(
        self, conversation_id: str, *, up_to_sequence: int = 0, title: str = "", timeout=None
    ) -> pb.Conversation:
        request = pb.ForkConversationRequest(
            conversation_id=conversation_id, up_to_sequence=up_to_sequence, title=title
        )
        return self._call("ForkConversation", request, idempotent=False, timeout=timeout)

    def truncate_conversation(
        self,
        conversation_id: str,
        after_sequence: int,
        *,
        expected_last_sequence: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> pb.TruncateConversationResponse:
        request = pb.TruncateConversationRequest(
            conversation_id=conversation_id, after_sequence=after_sequence
        )
        if expected_last_sequence is not None:
            request.expected_last_sequence = expected_last_sequence
        return self._call("TruncateConversation", request, idempotent=False, timeout=timeout)

    def delete_user_data(self, *, timeout: Optional[float] = None) -> pb.DeleteUserDataResponse:
        return self._call(
            "DeleteUserData", pb.DeleteUserDataRequest(), idempotent=True, timeout=timeout
        )

    # Messages.
    def append_messages(
        self,
        conversation_id: str,
        messages: Sequence[pb.NewMessage],
        *,
        request_id: Optional[str] = None,
        expected_last_sequence: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Sequence[pb.Message]:
        """Appends a batch, all or nothing. The request_id (generated when not
        given) makes every retry of this call return the first one's messages."""
        request = append_request(conversation_id, messages, request_id, expected_last_sequence)
        response = self._call("AppendMessages", request, idempotent=True, timeout=timeout)
        return list(response.messages)

    def append_message(
        self,
        conversation_id: str,
        message: pb.NewMessage,
        *,
        request_id: Optional[str] = None,
        expected_last_sequence: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> pb.Message:
        return self.append_messages(
            conversation_id,
            [message],
            request_id=request_id,
            expected_last_sequence=expected_last_sequence,
            timeout=timeout,
        )[0]

    def append_if_last(
        self,
        conversation_id: str,
        build: Callable[[pb.ResumeConversationResponse], Sequence[pb.NewMessage]],
        *,
        max_messages: int = 50,
        attempts: int = 5,
    ) -> Sequence[pb.Message]:
        """Reads the conversation, asks `build` what to append given what it
        read, and appends that only if nobody appended in between
        (`expected_last_sequence`). When someone did (ABORTED), reads again and
        asks `build` again, up to `attempts` times."""
        for _ in range(attempts):
            resumed = self.resume_conversation(conversation_id, max_messages=max_messages)
            messages = build(resumed)
            try:
                return self.append_messages(
                    conversation_id,
                    messages,
                    expected_last_sequence=resumed.conversation.message_count,
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.ABORTED:
                    raise
        raise StillRacing(f"{conversation_id}: other writers appended first {attempts} times")

    def list_messages(
        self,
        conversation_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        after_sequence: int = 0,
        newest_first: bool = False,
        timeout: Optional[float] = None,
    ) -> pb.ListMessagesResponse:
        request = pb.ListMessagesRequest(
            conversation_id=conversation_id,
            page_size=page_size,
            page_token=page_token,
            after_sequence=after_sequence,
            newest_first=newest_first,
        )
        return self._call("ListMessages", request, idempotent=True, timeout=timeout)

    def resume_conversation(
        self, conversation_id: str, *, max_messages: int = 0, timeout: Optional[float] = None
    ) -> pb.ResumeConversationResponse:
        request = pb.ResumeConversationRequest(
            conversation_id=conversation_id, max_messages=max_messages
        )
        return self._call("ResumeConversation", request, idempotent=True, timeout=timeout)

    def search_messages(
        self,
        query: str,
        *,
        conversation_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: Optional[float] = None,
    ) -> pb.SearchMessagesResponse:
        request = pb.SearchMessagesRequest(
            query=query,
            conversation_id=conversation_id,
            page_size=page_size,
            page_token=page_token,
        )
        return self._call("SearchMessages", request, idempotent=True, timeout=timeout)

    # Walking pages.
    def iter_conversations(self, *, page_size: int = 0) -> Iterator[pb.Conversation]:
        """Every conversation of the user, most recently updated first."""
        yield from _walk(
            lambda token: self.list_conversations(page_size=page_size, page_token=token),
            "conversations",
        )

    def iter_messages(
        self,
        conversation_id: str,
        *,
        after_sequence: int = 0,
        newest_first: bool = False,
        page_size: int = 0,
    ) -> Iterator[pb.Message]:
        """Every message of the conversation after `after_sequence`."""
        yield from _walk(
            lambda token: self.list_messages(
                conversation_id,
                page_size=page_size,
                page_token=token,
                after_sequence=after_sequence,
                newest_first=newest_first,
            ),
            "messages",
        )

    def iter_search(
        self, query: str, *, conversation_id: str = "", page_size: int = 0
    ) -> Iterator[pb.SearchHit]:
        """Every hit of a search, most relevant first."""
        yield from _walk(
            lambda token: self.search_messages(
                query, conversation_id=conversation_id, page_size=page_size, page_token=token
            ),
            "hits",
        )

    # Watching.
    def watch(
        self, conversation_id: str, *, after_sequence: int = 0, max_reconnects: int = 100
    ) -> Iterator[pb.Message]:
        """Every message after `after_sequence`, then each new one as it is
        appended, for as long as the caller iterates. When the stream breaks
        (UNAVAILABLE: a server restart, a lost connection), it reconnects from
        the last sequence it yielded, so nothing is missed or repeated.
        Raises `Truncated` when the conversation is cut below its position.
        Closing the generator cancels the stream."""
        position = after_sequence
        failures = 0
        while True:
            call = self._stub.WatchConversation(
                pb.WatchConversationRequest(
                    conversation_id=conversation_id, after_sequence=position
                ),
                metadata=self._metadata,
            )
            try:
                for message in call:
                    failures = 0
                    position = message.sequence
                    yield message
                return
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.ABORTED:
                    raise Truncated(error) from error
                if code not in self.retry.codes or failures >= max_reconnects:
                    raise
                failures += 1
                time.sleep(self.retry.delay(min(failures, self.retry.attempts)))
            finally:
                call.cancel()


def _walk(fetch, field: str):
    """The items of every page, fetching the next while a token comes back."""
    token = ""
    while True:
        page = fetch(token)
        yield from getattr(page, field)
        token = page.next_page_token
        if not token:
            return
