"""The LangChain adapter, proven with LangChain's own classes: a turn of
LangChain's fake chat model that calls a tool, run directly (read the
history, invoke, add what the turn produced), then one through the deprecated
RunnableWithMessageHistory that older code still uses, each read back by a
fresh history object, as another process would."""

import grpc
import pytest

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory
from langchain_core.tools import tool

from convo_client import ConvoClient
from convo_client.langchain import ConvoChatMessageHistory

MODEL = "fake-model-1"


@tool
def get_weather(city: str) -> str:
    """The forecast for a city."""
    return {"Lisbon": "21°C and sunny"}.get(city, "no forecast")


def usage(i, o):
    return {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}


def scripted_model():
    return GenericFakeChatModel(
        messages=iter(
            [
                AIMessage(
                    content="",
                    tool_calls=[
                        {"id": "call_lisbon_1", "name": "get_weather", "args": {"city": "Lisbon"}}
                    ],
                    usage_metadata=usage(52, 18),
                    response_metadata={"model_name": MODEL},
                ),
                AIMessage(
                    content="It is 21°C and sunny in Lisbon.",
                    usage_metadata=usage(90, 11),
                    response_metadata={"model_name": MODEL},
                ),
                AIMessage(
                    content="You're welcome.",
                    usage_metadata=usage(120, 4),
                    response_metadata={"model_name": MODEL},
                ),
            ]
        )
    )


def same_turn(stored, original):
    """The fields convo keeps, compared one by one."""
    assert type(stored) is type(original)
    assert stored.content == original.content
    assert stored.name == original.name
    if isinstance(original, AIMessage):
        assert [(c["id"], c["name"], c["args"]) for c in stored.tool_calls] == [
            (c["id"], c["name"], c["args"]) for c in original.tool_calls
        ]
        assert stored.usage_metadata == original.usage_metadata
        assert stored.response_metadata.get("model_name") == original.response_metadata.get(
            "model_name"
        )
    if isinstance(original, ToolMessage):
        assert stored.tool_call_id == original.tool_call_id
        assert stored.status == original.status


@pytest.mark.filterwarnings("ignore:RunnableWithMessageHistory is deprecated")
def test_a_tool_using_chain_with_history_round_trips(convo_addr, user):
    model = scripted_model()
    seen_by_model = []

    def agent(messages):
        seen_by_model.append(len(messages))
        answer = model.invoke(messages)
        produced = [answer]
        for call in answer.tool_calls:
            produced.append(get_weather.invoke(call))  # a ToolMessage
        if answer.tool_calls:
            produced.append(model.invoke(list(messages) + produced))
        return produced

    with ConvoClient(convo_addr, user_id=user) as client:
        conversation = client.create_conversation("weather")
        history = ConvoChatMessageHistory(client, conversation.id)
        question = HumanMessage(content="What's the weather in Lisbon?")
        produced = agent(history.messages + [question])
        history.add_messages([question, *produced])
        assert [type(m).__name__ for m in produced] == ["AIMessage", "ToolMessage", "AIMessage"]

    # Another process, another client, a fresh history object.
    with ConvoClient(convo_addr, user_id=user) as elsewhere:
        history = ConvoChatMessageHistory(elsewhere, conversation.id)
        stored = history.messages
        originals = [question, *produced]
        assert len(stored) == len(originals)
        for s, o in zip(stored, originals):
            same_turn(s, o)
        assert stored[2].tool_call_id == "call_lisbon_1"
        assert stored[1].tool_calls[0]["args"] == {"city": "Lisbon"}
        assert all(m.id for m in stored)  # convo's message ids

        # The next turn sees the whole conversation, here through
        # RunnableWithMessageHistory (deprecated by LangChain, still in use).
        chain = RunnableWithMessageHistory(
            RunnableLambda(agent),
            lambda session_id: ConvoChatMessageHistory(elsewhere, session_id),
        )
        chain.invoke(
            [HumanMessage(content="Thanks!")],
            config={"configurable": {"session_id": conversation.id}},
        )
        assert seen_by_model[-1] == 5
        assert len(history.messages) == 6

        history.clear()
        assert history.messages == []


def test_every_mapped_field_survives_the_store(convo_addr, user):
    originals = [
        SystemMessage(content="Be brief."),
        HumanMessage(
            content=[
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
            name="alice",
        ),
        AIMessage(
            content=[
                {"type": "thinking", "thinking": "A cat, probably.", "signature": "sig-abc"},
                {"type": "text", "text": "Let me look closer."},
            ],
            tool_calls=[
                {"id": "toolu_1", "name": "zoom", "args": {"x": 10, "y": 20, "factor": 2.5}},
                {"id": "toolu_2", "name": "classify", "args": {}},
            ],
            usage_metadata={
                "input_tokens": 1200,
                "output_tokens": 300,
                "total_tokens": 1500,
                "input_token_details": {"cache_read": 1000},
                "output_token_details": {"reasoning": 120},
            },
            response_metadata={"model_name": "claude-sonnet"},
            name="vision-agent",
        ),
        ToolMessage(content="zoomed", tool_call_id="toolu_1"),
        ToolMessage(content="classifier offline", tool_call_id="toolu_2", status="error"),
        AIMessage(content="A cat.", response_metadata={"model_name": "claude-sonnet"}),
    ]
    with ConvoClient(convo_addr, user_id=user) as client:
        conversation = client.create_conversation()
        ConvoChatMessageHistory(client, conversation.id).add_messages(originals)
        stored = ConvoChatMessageHistory(client, conversation.id).messages
    assert len(stored) == len(originals)
    for s, o in zip(stored, originals):
        same_turn(s, o)


def test_a_turn_is_not_added_on_top_of_another_replicas(convo_addr, user):
    with ConvoClient(convo_addr, user_id=user) as client:
        conversation = client.create_conversation("two replicas")
        first = ConvoChatMessageHistory(client, conversation.id, if_unchanged=True)
        second = ConvoChatMessageHistory(client, conversation.id, if_unchanged=True)
        question = HumanMessage(content="Hi!")
        first.add_messages([question])  # nothing read yet: no expectation
        assert [m.content for m in first.messages] == ["Hi!"]
        assert [m.content for m in second.messages] == ["Hi!"]

        # Both answer the same question; the second to add is refused.
        first.add_messages([AIMessage(content="Hello from the first.")])
        with pytest.raises(grpc.RpcError) as refused:
            second.add_messages([AIMessage(content="Hello from the second.")])
        assert refused.value.code() == grpc.StatusCode.ABORTED
        assert [m.content for m in second.messages] == ["Hi!", "Hello from the first."]

        # Having re-read, it adds; the first's next turn follows its own.
        second.add_messages([HumanMessage(content="And you?")])
        with pytest.raises(grpc.RpcError):
            first.add_messages([AIMessage(content="stale")])
        assert len(first.messages) == 3  # re-read
        first.add_messages([AIMessage(content="Fine.")])
        first.add_messages([HumanMessage(content="Good.")])  # after its own add

        # Without the option, a history appends whatever came before.
        ConvoChatMessageHistory(client, conversation.id).add_messages(
            [AIMessage(content="unchecked")]
        )
        with pytest.raises(grpc.RpcError):
            first.add_messages([AIMessage(content="stale again")])
        first.clear()
        first.add_messages([HumanMessage(content="From the start.")])
        assert [m.content for m in second.messages] == ["From the start."]
