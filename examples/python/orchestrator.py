"""A small tool-using AI orchestrator on top of convo, as a stateless replica
would run it.

Each turn: resume the conversation (one call), ask a stand-in model what to
do, and store what it did as typed parts: the model's reasoning (with the
opaque signature a provider would insist on getting back), its tool calls,
the tool results that answer them by id, and the final answer with its token
usage. Every append carries a request_id (a retry after a lost reply cannot
duplicate it) and expected_last_sequence (two replicas working on one
conversation cannot interleave); when another writer got there first, the
append fails with ABORTED and the turn starts again from a fresh read.
"""

import json
import os
import sys
import uuid

import grpc

from convo_client import ConvoClient, new_message, pb

ADDR = os.environ.get("CONVO_ADDR", "127.0.0.1:50051")
USER = os.environ.get("CONVO_USER", "python-example")
MODEL = "stand-in-model-1"
FORECASTS = {"lisbon": "21°C and sunny", "porto": "18°C and cloudy"}


def get_weather(city):
    """The one tool: a forecast from a table."""
    return FORECASTS.get(city.lower(), "no forecast")


def stand_in_model(history, turn):
    """Pretends to be a model. Reads the conversation as a model API would:
    if the last user message asks about weather and no tool results answer
    it yet, it calls get_weather once per city it knows; once the results
    are in, it answers from them. Returns (parts, usage)."""
    results = {}
    question = ""
    for message in history:
        if message.role == pb.ROLE_USER:
            question, results = message.content, {}
        for part in message.parts:
            if part.WhichOneof("kind") == "tool_result":
                results[part.tool_result.tool_call_id] = part.tool_result.content
    usage = pb.Usage(input_tokens=40 * len(history) + 20, output_tokens=30,
                     cached_input_tokens=40 * (len(history) - 1) if history else 0,
                     reasoning_tokens=10)
    cities = [c for c in FORECASTS if c in question.lower()]
    if "weather" in question.lower() and cities and not results:
        thinking = pb.Part(reasoning=pb.Reasoning(text="The user asks for forecasts; look them up."),
                           signature=bytes([0, 1, 2, 250, 255]) + turn.encode())
        calls = [pb.Part(tool_call=pb.ToolCall(
            id=f"call_{turn}_{city}", name="get_weather",
            arguments=json.dumps({"city": city.title()}))) for city in cities]
        return [thinking] + calls, usage
    if results:
        answer = "; ".join(f"{call_id.rsplit('_', 1)[-1].title()}: {text}"
                           for call_id, text in results.items())
    else:
        answer = f"You said {question!r}."
    return [pb.Part(text=answer)], usage


def take_turn(client, conversation_id, turn_id, prompt, meanwhile=None):
    """One orchestrator turn, tool calls included; returns how many messages
    it stored. `meanwhile` runs once between the first read and the first
    write, standing in for another replica."""
    while True:
        resumed = client.resume_conversation(conversation_id, max_messages=50)
        if meanwhile:
            meanwhile()
            meanwhile = None
        last = resumed.conversation.message_count
        pending = [pb.NewMessage(role=pb.ROLE_USER, content=prompt)]
        history = list(resumed.messages) + [pb.Message(role=pb.ROLE_USER, content=prompt)]
        try:
            step = 0
            while True:
                parts, usage = stand_in_model(history, turn_id)
                reply = pb.NewMessage(role=pb.ROLE_ASSISTANT, parts=parts, model=MODEL, usage=usage)
                pending.append(reply)
                calls = [p.tool_call for p in parts if p.WhichOneof("kind") == "tool_call"]
                # The tool results answer the calls by id, one message each.
                pending += [pb.NewMessage(role=pb.ROLE_TOOL, name=c.name, parts=[
                    pb.Part(tool_result=pb.ToolResult(
                        tool_call_id=c.id, content=get_weather(json.loads(c.arguments)["city"])))])
                    for c in calls]
                # Store this step: the user message (first step only), the
                # model's message and its tool results, as one atomic batch.
                stored = client.append_messages(
                    conversation_id, pending,
                    request_id=f"{turn_id}-step{step}", expected_last_sequence=last)
                history += stored[1 if step == 0 else 0:]
                last = stored[-1].sequence
                pending, step = [], step + 1
                if not calls:
                    return last - resumed.conversation.message_count
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ABORTED:
                raise
            print(f"  ABORTED ({error.details()}); re-reading and trying again")
            # A fresh turn id: the earlier request ids may already name
            # messages of the interrupted attempt.
            turn_id = f"{turn_id}-retry"


def describe(message):
    """One line per message, parts spelled out."""
    kinds = []
    for part in message.parts:
        kind = part.WhichOneof("kind")
        if kind == "tool_call":
            kinds.append(f"tool_call {part.tool_call.id} {part.tool_call.name}({part.tool_call.arguments})")
        elif kind == "tool_result":
            kinds.append(f"tool_result {part.tool_result.tool_call_id}: {part.tool_result.content}")
        elif kind == "reasoning":
            kinds.append(f"reasoning ({len(part.signature)}-byte signature)")
        else:
            kinds.append(f"{kind}: {getattr(part, kind)}")
    return "; ".join(kinds) or message.content


def main():
    # Retries of UNAVAILABLE and RESOURCE_EXHAUSTED, with backoff, are the
    # client's: every append carries a request_id, so none can write twice.
    with ConvoClient(ADDR, user_id=USER, timeout=10) as client:
        run = uuid.uuid4().hex[:8]
        conversation = client.create_conversation(
            "Python tool-using orchestrator", metadata={"client": "python"},
            request_id=f"example-{run}")
        print(f"conversation {conversation.id} for {USER} at {ADDR}")

        # Turn 1: the model calls a tool for each city; the results come
        # back; the model answers from them.
        stored = take_turn(client, conversation.id, f"{run}-t1",
                           "What is the weather in Lisbon and Porto?")
        assert stored == 5, f"turn 1 stored {stored} messages"

        # Turn 2: another replica appends between our read and our write:
        # the first attempt is ABORTED, and the retry sees its message.
        def another_replica_appends():
            client.append_message(
                conversation.id, new_message(pb.ROLE_SYSTEM, "(another replica added a note)"),
                request_id=f"{run}-intruder")

        take_turn(client, conversation.id, f"{run}-t2", "Thanks!", meanwhile=another_replica_appends)

        # A retried append with the same request_id returns the original.
        final = client.resume_conversation(conversation.id)
        first = final.messages[0]
        again = client.append_messages(
            conversation.id, request_id=f"{run}-t1-step0", expected_last_sequence=0, messages=[
                pb.NewMessage(role=first.role, content=first.content),
                pb.NewMessage(role=final.messages[1].role, parts=final.messages[1].parts,
                              model=final.messages[1].model, usage=final.messages[1].usage),
                *[pb.NewMessage(role=m.role, name=m.name, parts=m.parts) for m in final.messages[2:4]]])
        assert again[0].id == first.id, "a retry must not duplicate"

        # Resume with a window that would start at the second tool result:
        # it widens back to the assistant message that made the calls.
        narrow = client.resume_conversation(conversation.id, max_messages=5)
        assert narrow.messages[0].role == pb.ROLE_ASSISTANT, "the exchange is kept whole"
        assert narrow.messages[0].sequence == 2 and narrow.has_more

        print("transcript:")
        for message in final.messages:
            print(f"  {message.sequence:>2} {pb.Role.Name(message.role):<15} {describe(message)}")
        print(f"usage: {final.conversation.usage.input_tokens} in, "
              f"{final.conversation.usage.output_tokens} out")
        roles = [m.role for m in final.messages]
        expected = [pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL, pb.ROLE_TOOL, pb.ROLE_ASSISTANT,
                    pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT]
        if roles != expected or final.conversation.message_count != 8:
            print(f"unexpected transcript: {roles}", file=sys.stderr)
            return 1
        if final.messages[1].parts[0].signature[:5] != bytes([0, 1, 2, 250, 255]):
            print("the reasoning signature changed", file=sys.stderr)
            return 1
        print("ok: 1 tool exchange of 2 calls, 1 ABORTED retried, 1 idempotent replay, "
              "resume kept the exchange whole")
        return 0


if __name__ == "__main__":
    sys.exit(main())
