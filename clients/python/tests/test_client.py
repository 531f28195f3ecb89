import asyncio
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from convo.v1 import convo_pb2
from convo_client import (
    AsyncConvoClient,
    ConvoClient,
    FieldViolation,
    Retry,
    StillRacing,
    field_violations,
    new_message,
    pb,
    precondition_violations,
)

REPO = Path(__file__).resolve().parents[3]


def text(content):
    return new_message(pb.ROLE_USER, content)


def test_the_installed_stubs_are_the_contract_in_this_checkout():
    """Stubs are generated when the package is built; an install older than
    the proto in this checkout fails here."""
    with tempfile.TemporaryDirectory() as out:
        descriptors = Path(out) / "convo.pb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{REPO / 'proto'}",
                f"--descriptor_set_out={descriptors}",
                "convo/v1/convo.proto",
            ],
            check=True,
        )
        fresh = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file[0]
    installed = descriptor_pb2.FileDescriptorProto.FromString(convo_pb2.DESCRIPTOR.serialized_pb)
    # protoc's Python output leaves out the derived json_name of each field.
    for message in fresh.message_type:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            for field in nested.field:
                field.ClearField("json_name")
    assert installed == fresh


class _LostReply(grpc.RpcError, grpc.Call, grpc.Future):
    """What a client sees when the server committed but the reply was lost."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection reset after the request was sent"

    def result(self, timeout=None):
        raise self

    def exception(self, timeout=None):
        return self

    def traceback(self, timeout=None):
        return None

    def add_done_callback(self, fn):
        fn(self)

    def cancel(self):
        return False

    def cancelled(self):
        return False

    def running(self):
        return False

    def done(self):
        return True

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def add_callback(self, callback):
        return False

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()


class LoseFirstAppendReply(grpc.UnaryUnaryClientInterceptor):
    """Lets the first AppendMessages reach the server, then drops its reply."""

    def __init__(self):
        self.sent = []

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        if details.method.endswith("/AppendMessages"):
            self.sent.append(request.request_id)
            if len(self.sent) == 1:
                outcome.result()  # the server has committed
                return _LostReply()
        return outcome


def test_a_retry_after_a_lost_reply_does_not_write_twice(convo_addr, user):
    lossy = LoseFirstAppendReply()
    fast = Retry(initial_backoff=0.01)
    with ConvoClient(convo_addr, user_id=user, retry=fast, interceptors=[lossy]) as client:
        conversation = client.create_conversation("lossy")
        stored = client.append_message(conversation.id, text("only once"))
        assert len(lossy.sent) == 2 and lossy.sent[0] == lossy.sent[1]  # same request_id
        assert stored.sequence == 1
        messages = list(client.iter_messages(conversation.id))
        assert [m.content for m in messages] == ["only once"]


def test_without_retries_the_lost_reply_surfaces(convo_addr, user):
    with ConvoClient(
        convo_addr, user_id=user, retry=Retry(attempts=1), interceptors=[LoseFirstAppendReply()]
    ) as client:
        conversation = client.create_conversation()
        with pytest.raises(grpc.RpcError) as raised:
            client.append_message(conversation.id, text("lost"))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_append_if_last_rereads_when_another_writer_got_there_first(convo_addr, user):
    with ConvoClient(convo_addr, user_id=user) as client, ConvoClient(
        convo_addr, user_id=user
    ) as other:
        conversation = client.create_conversation()
        client.append_message(conversation.id, text("question"))
        seen = []

        def build(resumed):
            seen.append(resumed.conversation.message_count)
            if len(seen) == 1:
                other.append_message(conversation.id, text("interjection"))
            return [new_message(pb.ROLE_ASSISTANT, f"answer after {len(resumed.messages)}")]

        written = client.append_if_last(conversation.id, build)
        assert seen == [1, 2]
        assert [m.sequence for m in written] == [3]
        assert written[0].content == "answer after 2"

        def always_late(resumed):
            other.append_message(conversation.id, text("again"))
            return [new_message(pb.ROLE_ASSISTANT, "never")]

        with pytest.raises(StillRacing):
            client.append_if_last(conversation.id, always_late, attempts=2)


def test_iterators_walk_every_page(convo_addr, user):
    with ConvoClient(convo_addr, user_id=user) as client:
        conversation = client.create_conversation("paged")
        client.append_messages(conversation.id, [text(f"m{i}") for i in range(1, 26)])
        oldest_first = [m.sequence for m in client.iter_messages(conversation.id, page_size=10)]
        assert oldest_first == list(range(1, 26))
        newest_first = [
            m.sequence
            for m in client.iter_messages(conversation.id, page_size=10, newest_first=True)
        ]
        assert newest_first == list(range(25, 0, -1))
        for i in range(24):
            client.create_conversation(f"more {i}")
        ids = [c.id for c in client.iter_conversations(page_size=10)]
        assert len(ids) == 25 and len(set(ids)) == 25
        client.append_messages(conversation.id, [text(f"needle {i}") for i in range(25)])
        hits = list(client.iter_search("needle", page_size=10))
        assert len(hits) == 25


def test_watch_reconnects_from_the_last_sequence_it_saw(convo_addr, proxy, user):
    fast = Retry(initial_backoff=0.05, max_backoff=0.2)
    with ConvoClient(convo_addr, user_id=user) as writer, ConvoClient(
        f"127.0.0.1:{proxy.port}", user_id=user, retry=fast
    ) as watcher:
        conversation = writer.create_conversation("watched")
        writer.append_messages(conversation.id, [text("one"), text("two")])
        received = []
        stream = watcher.watch(conversation.id)
        done = threading.Event()

        def read():
            for message in stream:
                received.append(message.sequence)
                if message.sequence == 5:
                    break
            done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = 100
        while len(received) < 2 and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        proxy.cut()  # the stream breaks; the client reconnects after sequence 2
        writer.append_message(conversation.id, text("three"))
        writer.append_messages(conversation.id, [text("four"), text("five")])
        assert done.wait(15), f"watch stalled at {received}"
        assert received == [1, 2, 3, 4, 5]


def test_refusals_name_the_fields_and_conditions_they_fail_on(convo_addr, user):
    with ConvoClient(convo_addr, user_id=user) as client:
        conversation = client.create_conversation()
        with pytest.raises(grpc.RpcError) as raised:
            client.append_messages(
                conversation.id, [text("fine"), new_message(pb.ROLE_UNSPECIFIED, "")]
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        fields = [violation.field for violation in field_violations(raised.value)]
        assert fields == ["messages[1].role", "messages[1].content"]
        assert precondition_violations(raised.value) == []

        answer = pb.Part(tool_result=pb.ToolResult(tool_call_id="call_9", content="18C"))
        with pytest.raises(grpc.RpcError) as raised:
            client.append_message(conversation.id, new_message(pb.ROLE_TOOL, parts=[answer]))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        [violation] = precondition_violations(raised.value)
        assert (violation.type, violation.subject) == ("TOOL_CALL_NOT_FOUND", "call_9")
        assert "call_9" in violation.description
        assert field_violations(raised.value) == []

        # An error without details (here NOT_FOUND) has none to read.
        with pytest.raises(grpc.RpcError) as raised:
            client.get_conversation("00000000-0000-0000-0000-000000000000")
        assert field_violations(raised.value) == []

    async def scenario():
        async with AsyncConvoClient(convo_addr, user_id=user) as client:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.get_conversation("not-an-id")
            [violation] = field_violations(raised.value)
            assert isinstance(violation, FieldViolation)
            assert violation.field == "conversation_id"

    asyncio.run(scenario())


def test_the_asyncio_client(convo_addr, user):
    async def scenario():
        async with AsyncConvoClient(convo_addr, user_id=user) as client:
            conversation = await client.create_conversation("async")
            written = await client.append_messages(
                conversation.id, [text(f"m{i}") for i in range(1, 13)]
            )
            assert [m.sequence for m in written] == list(range(1, 13))
            seen = [m.sequence async for m in client.iter_messages(conversation.id, page_size=5)]
            assert seen == list(range(1, 13))

            async def build(resumed):
                return [new_message(pb.ROLE_ASSISTANT, "reply")]

            reply = await client.append_if_last(conversation.id, build)
            assert reply[0].sequence == 13
            watched = []
            async for message in client.watch(conversation.id, after_sequence=11):
                watched.append(message.sequence)
                if message.sequence == 13:
                    break
            assert watched == [12, 13]
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.get_conversation("00000000-0000-0000-0000-000000000000")
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    asyncio.run(scenario())
