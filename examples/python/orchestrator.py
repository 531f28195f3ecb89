"""A small AI orchestrator on top of convo, as a stateless replica would run it.

Each turn: resume the conversation (one call), ask a stand-in model for a
reply, then append the user's message and the reply. Both appends carry a
request_id (so a retry after a lost reply cannot duplicate them) and
expected_last_sequence (so two replicas working on one conversation cannot
interleave). When another writer got there first the append fails with
ABORTED: re-read and try the turn again.
"""

import os
import sys
import uuid

import grpc

from convo.v1 import convo_pb2 as pb
from convo.v1 import convo_pb2_grpc as rpc

ADDR = os.environ.get("CONVO_ADDR", "127.0.0.1:50051")
USER = os.environ.get("CONVO_USER", "python-example")
METADATA = (("x-user-id", USER),)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.DEADLINE_EXCEEDED}


def stand_in_model(history, prompt):
    """Pretends to be a model: answers from the prompt and the history length."""
    return f"(turn {len(history) // 2 + 1}) You said {prompt!r}; I have read {len(history)} messages."


def call(method, request, attempts=5):
    """Calls with retries for transient failures. Safe for appends because
    every append carries a request_id."""
    for attempt in range(attempts):
        try:
            return method(request, metadata=METADATA, timeout=10)
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == attempts - 1:
                raise


def take_turn(stub, conversation_id, turn_id, prompt, meanwhile=None):
    """One orchestrator turn; returns the two messages stored. `meanwhile`
    runs once between reading and writing, standing in for another replica."""
    while True:
        resumed = call(stub.ResumeConversation, pb.ResumeConversationRequest(
            conversation_id=conversation_id, max_messages=50))
        if meanwhile:
            meanwhile()
            meanwhile = None
        history = list(resumed.messages)
        last = resumed.conversation.message_count
        reply = stand_in_model(history, prompt)
        try:
            asked = call(stub.AppendMessage, pb.AppendMessageRequest(
                conversation_id=conversation_id, role=pb.ROLE_USER, content=prompt,
                request_id=f"{turn_id}-user", expected_last_sequence=last))
            answered = call(stub.AppendMessage, pb.AppendMessageRequest(
                conversation_id=conversation_id, role=pb.ROLE_ASSISTANT, content=reply,
                request_id=f"{turn_id}-assistant", expected_last_sequence=asked.sequence))
            return asked, answered
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ABORTED:
                raise
            print(f"  ABORTED ({error.details()}); re-reading and trying again")
            # A fresh turn id: the earlier request ids may already name
            # messages of the interrupted attempt.
            turn_id = f"{turn_id}-retry"


def main():
    with grpc.insecure_channel(ADDR) as channel:
        stub = rpc.ConversationServiceStub(channel)
        run = uuid.uuid4().hex[:8]
        conversation = call(stub.CreateConversation, pb.CreateConversationRequest(
            title="Python orchestrator example", metadata={"client": "python"},
            request_id=f"example-{run}"))
        print(f"conversation {conversation.id} for {USER} at {ADDR}")

        take_turn(stub, conversation.id, f"{run}-t1", "Where should I travel in May?")

        # Another replica appends between our read and our write: the
        # turn's first attempt is ABORTED, and the retry sees its message.
        def another_replica_appends():
            call(stub.AppendMessage, pb.AppendMessageRequest(
                conversation_id=conversation.id, role=pb.ROLE_SYSTEM,
                content="(another replica added a note)", request_id=f"{run}-intruder"))

        take_turn(stub, conversation.id, f"{run}-t2", "And what should I eat there?",
                  meanwhile=another_replica_appends)

        # A retried append with the same request_id returns the original.
        final = call(stub.ResumeConversation, pb.ResumeConversationRequest(
            conversation_id=conversation.id))
        first = final.messages[0]
        again = call(stub.AppendMessage, pb.AppendMessageRequest(
            conversation_id=conversation.id, role=first.role, content=first.content,
            request_id=f"{run}-t1-user", expected_last_sequence=0))
        assert again.id == first.id and again.sequence == 1, "a retry must not duplicate"

        print("transcript:")
        for message in final.messages:
            print(f"  {message.sequence:>2} {pb.Role.Name(message.role):<15} {message.content}")
        roles = [m.role for m in final.messages]
        expected = [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT]
        if roles != expected or final.conversation.message_count != 5:
            print(f"unexpected transcript: {roles}", file=sys.stderr)
            return 1
        print("ok: 2 turns, 1 ABORTED retried, 1 idempotent replay")
        return 0


if __name__ == "__main__":
    sys.exit(main())
