"""The OpenAI Agents SDK adapter, proven with the SDK's own Runner, a
function tool and a scripted model, side by side with the SDK's own
SQLiteSession."""

import asyncio

import grpc

from agents import Agent, Runner, SQLiteSession, function_tool, set_tracing_disabled
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
)
from openai.types.responses.response_reasoning_item import Summary

from convo_client import AsyncConvoClient
from convo_client.openai_agents import ConvoSession

set_tracing_disabled(True)


@function_tool
def get_weather(city: str) -> str:
    """The forecast for a city."""
    return {"Lisbon": "21°C and sunny"}.get(city, "no forecast")


def answer(text, id):
    return ResponseOutputMessage(
        id=id,
        content=[ResponseOutputText(text=text, annotations=[], type="output_text")],
        role="assistant",
        status="completed",
        type="message",
    )


class ScriptedModel(Model):
    """Answers from a script, one list of output items per model call, and
    records what it was given."""

    def __init__(self, turns):
        self.turns = list(turns)
        self.inputs = []

    async def get_response(self, system_instructions, input, model_settings, tools,
                           output_schema, handoffs, tracing, **kwargs):
        self.inputs.append(input if isinstance(input, str) else [dict(i) for i in input])
        return ModelResponse(
            output=self.turns.pop(0),
            usage=Usage(requests=1, input_tokens=40, output_tokens=12, total_tokens=52),
            response_id=None,
        )

    def stream_response(self, *args, **kwargs):
        raise NotImplementedError("the scripted model does not stream")


def first_run_script():
    return [
        [
            ResponseReasoningItem(
                id="rs_1",
                summary=[Summary(text="The user wants a forecast.", type="summary_text")],
                type="reasoning",
                encrypted_content="gAAAAB-opaque-state",
            ),
            ResponseFunctionToolCall(
                id="fc_1",
                call_id="call_lisbon",
                name="get_weather",
                arguments='{"city": "Lisbon"}',
                type="function_call",
                status="completed",
            ),
        ],
        [answer("It is 21°C and sunny in Lisbon.", "msg_1")],
    ]


def second_run_script():
    return [[answer("You're welcome.", "msg_2")]]


def agent(model):
    return Agent(name="weather", instructions="Answer briefly.", model=model, tools=[get_weather])


async def run_both_turns(make_session):
    first = ScriptedModel(first_run_script())
    result = await Runner.run(agent(first), "What's the weather in Lisbon?", session=make_session())
    assert result.final_output == "It is 21°C and sunny in Lisbon."
    # A new session object, as another worker would make, continues.
    second = ScriptedModel(second_run_script())
    await Runner.run(agent(second), "Thanks!", session=make_session())
    return second.inputs[0]


def test_runs_continue_across_session_objects_and_match_sqlite(convo_addr, user, tmp_path):
    database = str(tmp_path / "sessions.db")

    async def scenario():
        async with AsyncConvoClient(convo_addr, user_id=user) as client:
            conversation = await client.create_conversation("agents")
            convo_seen = await run_both_turns(lambda: ConvoSession(client, conversation.id))
            sqlite_seen = await run_both_turns(lambda: SQLiteSession("side-by-side", database))
            # The second run's model saw the first run's items, the same as
            # with the SDK's own session.
            assert convo_seen == sqlite_seen
            kinds = [i.get("type", "message") for i in convo_seen]
            assert kinds == ["message", "reasoning", "function_call", "function_call_output",
                             "message", "message"]

            convo, sqlite = ConvoSession(client, conversation.id), SQLiteSession("side-by-side", database)
            assert await convo.get_items() == await sqlite.get_items()
            assert await convo.get_items(limit=3) == await sqlite.get_items(limit=3)
            items = await convo.get_items()
            reasoning = items[1]
            assert reasoning["encrypted_content"] == "gAAAAB-opaque-state"
            assert items[2]["call_id"] == items[3]["call_id"] == "call_lisbon"

            for _ in range(3):
                assert await convo.pop_item() == await sqlite.pop_item()
            assert await convo.get_items() == await sqlite.get_items()
            await convo.clear_session()
            await sqlite.clear_session()
            assert await convo.get_items() == await sqlite.get_items() == []
            assert await convo.pop_item() is None and await sqlite.pop_item() is None

    asyncio.run(scenario())


def test_two_workers_never_pop_the_same_item(convo_addr, user):
    async def scenario():
        async with AsyncConvoClient(convo_addr, user_id=user) as a, AsyncConvoClient(
            convo_addr, user_id=user
        ) as b:
            conversation = await a.create_conversation("pops")
            items = [{"role": "user", "content": f"item {i}"} for i in range(10)]
            await ConvoSession(a, conversation.id).add_items(items)
            workers = [ConvoSession(a, conversation.id), ConvoSession(b, conversation.id)]
            popped = await asyncio.gather(*(workers[i % 2].pop_item() for i in range(10)))
            assert sorted(p["content"] for p in popped) == sorted(i["content"] for i in items)
            assert await workers[0].get_items() == []

    asyncio.run(scenario())


class HeldModel(ScriptedModel):
    """A scripted model that answers only once `release` is set."""

    def __init__(self, turns):
        super().__init__(turns)
        self.called = asyncio.Event()
        self.release = asyncio.Event()

    async def get_response(self, *args, **kwargs):
        self.called.set()
        await self.release.wait()
        return await super().get_response(*args, **kwargs)


def test_overlapping_runs_cannot_interleave_their_turns(convo_addr, user):
    async def scenario():
        async with AsyncConvoClient(convo_addr, user_id=user) as client:
            conversation = await client.create_conversation("two workers")

            def session():
                return ConvoSession(client, conversation.id, if_unchanged=True)

            # Runs one after the other are not refused.
            await run_both_turns(session)
            before = await session().get_items()

            # A run whose model is slow, and another that starts and ends
            # while it thinks: the slow one's answer would land after the
            # other's, so it is refused and adds nothing more.
            slow = HeldModel(second_run_script())
            held = asyncio.create_task(Runner.run(agent(slow), "Still there?", session=session()))
            await slow.called.wait()
            fast = ScriptedModel(second_run_script())
            await Runner.run(agent(fast), "Thanks again!", session=session())
            settled = await session().get_items()
            slow.release.set()
            try:
                await held
                raise AssertionError("the slow run added its items after the other's")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.ABORTED
            assert await session().get_items() == settled
            # The slow run's question was saved when it started; its answer
            # never was. The other run answered its own question after it.
            added = settled[len(before):]
            assert [i["content"] for i in added[:2]] == ["Still there?", "Thanks again!"]
            assert added[2]["role"] == "assistant" and len(added) == 3

    asyncio.run(scenario())
