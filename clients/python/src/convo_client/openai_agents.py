"""An OpenAI Agents SDK session backed by one convo conversation.

`ConvoSession` implements the SDK's `Session` (`get_items`, `add_items`,
`pop_item`, `clear_session`), so `Runner.run(agent, …, session=…)` keeps its
history in convo: any replica, any process, picks the conversation up where
it stopped. Each Responses-API input item is one convo message:

| item | convo message |
|---|---|
| `{"role": "user"/"system"/"developer", "content": …}` | that role; text content, or `input_text` parts |
| `{"type": "message", "role": "assistant", "content": [output_text…]}` | ROLE_ASSISTANT, text parts |
| `{"type": "function_call", "call_id", "name", "arguments"}` | ROLE_ASSISTANT, a tool_call part |
| `{"type": "function_call_output", "call_id", "output"}` | ROLE_TOOL, a tool_result part |
| `{"type": "reasoning", "summary", "encrypted_content"}` | ROLE_ASSISTANT, reasoning parts; `encrypted_content` as the signature |

An item's `id`, `status` and whether it had an explicit `type` are kept in the
message's metadata (`openai.*`), so items come back as they went in. Output
text annotations and other item types are not stored: adding one raises
`ValueError`.

`pop_item` truncates with `expected_last_sequence`, so two workers popping at
once cannot both remove the same item: the loser re-reads and pops the next.
With `if_unchanged=True`, `add_items` appends the same way: a run whose
session another run added to since it read is refused (`ABORTED`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import grpc

from convo.v1 import convo_pb2 as pb

from ._aio import AsyncConvoClient
from ._common import new_message

try:  # the SDK's base class, when installed; the protocol is structural anyway
    from agents.memory.session import SessionABC as _Base
except ImportError:  # pragma: no cover
    _Base = object

TYPE = "openai.type"
ID = "openai.id"
STATUS = "openai.status"
# How the item's content was given: "text" (a string) or "parts" (a list).
CONTENT = "openai.content"

ROLES = {
    "user": pb.ROLE_USER,
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_DEVELOPER,
    "assistant": pb.ROLE_ASSISTANT,
}
ROLE_NAMES = {number: name for name, number in ROLES.items()}


def _keep(metadata: Dict[str, str], item: Dict[str, Any]) -> None:
    if "type" in item:
        metadata[TYPE] = item["type"]
    for key, field in ((ID, "id"), (STATUS, "status")):
        if item.get(field) is not None:
            metadata[key] = item[field]


def to_convo(item: Dict[str, Any]) -> pb.NewMessage:
    """A Responses-API input item as a convo message to append."""
    kind = item.get("type", "message")
    metadata: Dict[str, str] = {}
    _keep(metadata, item)
    if kind == "function_call":
        call = pb.ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"])
        return new_message(pb.ROLE_ASSISTANT, parts=[pb.Part(tool_call=call)], metadata=metadata)
    if kind == "function_call_output":
        output = item["output"]
        if not isinstance(output, str):
            raise ValueError("convo stores a function_call_output's output as text")
        result = pb.ToolResult(tool_call_id=item["call_id"], content=output)
        return new_message(pb.ROLE_TOOL, parts=[pb.Part(tool_result=result)], metadata=metadata)
    if kind == "reasoning":
        signature = (item.get("encrypted_content") or "").encode()
        summaries = item.get("summary") or []
        parts = [
            pb.Part(reasoning=pb.Reasoning(text=s["text"]), signature=signature)
            for s in summaries
        ] or [pb.Part(reasoning=pb.Reasoning(text=""), signature=signature)]
        metadata[CONTENT] = str(len(summaries))
        return new_message(pb.ROLE_ASSISTANT, parts=parts, metadata=metadata)
    if kind != "message":
        raise ValueError(f"convo does not store Responses items of type {kind!r}")
    role = ROLES.get(item.get("role", ""))
    if role is None:
        raise ValueError(f"convo has no role {item.get('role')!r}")
    content = item.get("content", "")
    if isinstance(content, str):
        metadata[CONTENT] = "text"
        return new_message(role, content, metadata=metadata)
    metadata[CONTENT] = "parts"
    parts = []
    for piece in content:
        if piece.get("type") not in ("input_text", "output_text"):
            raise ValueError(f"convo does not store content of type {piece.get('type')!r}")
        if piece.get("annotations"):
            raise ValueError("convo does not store output_text annotations")
        parts.append(pb.Part(text=piece["text"]))
    metadata["openai.text_type"] = content[0]["type"] if content else "input_text"
    return new_message(role, parts=parts, metadata=metadata)


def _restore(item: Dict[str, Any], message: pb.Message) -> Dict[str, Any]:
    if ID in message.metadata:
        item["id"] = message.metadata[ID]
    if STATUS in message.metadata:
        item["status"] = message.metadata[STATUS]
    return item


def to_item(message: pb.Message) -> Dict[str, Any]:
    """A stored convo message as the input item it was."""
    kinds = [p.WhichOneof("kind") for p in message.parts]
    stored_type = message.metadata.get(TYPE)
    if "tool_call" in kinds:
        call = message.parts[kinds.index("tool_call")].tool_call
        item = {"type": "function_call", "call_id": call.id, "name": call.name,
                "arguments": call.arguments}
        return _restore(item, message)
    if "tool_result" in kinds:
        result = message.parts[kinds.index("tool_result")].tool_result
        item = {"type": "function_call_output", "call_id": result.tool_call_id,
                "output": result.content}
        return _restore(item, message)
    if kinds and all(k == "reasoning" for k in kinds):
        count = int(message.metadata.get(CONTENT, "1"))
        item = {
            "type": "reasoning",
            "summary": [
                {"type": "summary_text", "text": p.reasoning.text} for p in message.parts[:count]
            ],
        }
        if message.parts[0].signature:
            item["encrypted_content"] = message.parts[0].signature.decode()
        return _restore(item, message)
    item: Dict[str, Any] = {"role": ROLE_NAMES.get(message.role, "user")}
    if message.metadata.get(CONTENT) == "parts":
        text_type = message.metadata.get("openai.text_type", "input_text")
        item["content"] = [
            {"type": text_type, "text": p.text, **({"annotations": []} if text_type == "output_text" else {})}
            for p in message.parts
        ]
    else:
        item["content"] = message.content
    if stored_type is not None:
        item["type"] = stored_type
    return _restore(item, message)


class ConvoSession(_Base):
    """The items of one convo conversation, as the Agents SDK sees a session.

    With `if_unchanged=True`, a run cannot add its items on top of another
    run's: once this session has read (`get_items`), added or cleared,
    `add_items` appends only if the conversation still ends where it left it
    (`expected_last_sequence`), and otherwise raises the call's
    `grpc.aio.AioRpcError` with `ABORTED`, having added nothing. Two workers
    running the same session at once cannot interleave their turns this way.
    """

    session_settings = None

    def __init__(
        self, client: AsyncConvoClient, conversation_id: str, *, if_unchanged: bool = False
    ):
        self.client = client
        self.conversation_id = conversation_id
        self.session_id = conversation_id
        self.if_unchanged = if_unchanged
        # The sequence of the last message this session saw; None until it
        # has read, added or cleared.
        self._last_sequence: Optional[int] = None

    async def get_items(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        if limit is None:
            messages = [m async for m in self.client.iter_messages(self.conversation_id)]
        else:
            messages = []
            async for message in self.client.iter_messages(
                self.conversation_id, newest_first=True, page_size=min(max(limit, 1), 1000)
            ):
                if len(messages) >= limit:
                    break
                messages.append(message)
            messages.reverse()
        if messages or limit is None or limit > 0:
            # A limit of 0 reads nothing, so it says nothing of the end.
            self._last_sequence = messages[-1].sequence if messages else 0
        return [to_item(m) for m in messages]

    async def add_items(self, items: List[Dict[str, Any]]) -> None:
        if not items:
            return
        expected = self._last_sequence if self.if_unchanged else None
        appended = await self.client.append_messages(
            self.conversation_id,
            [to_convo(dict(i)) for i in items],
            expected_last_sequence=expected,
        )
        self._last_sequence = appended[-1].sequence

    async def pop_item(self) -> Optional[Dict[str, Any]]:
        while True:
            resumed = await self.client.resume_conversation(self.conversation_id, max_messages=1)
            count = resumed.conversation.message_count
            if count == 0 or not resumed.messages:
                return None
            try:
                await self.client.truncate_conversation(
                    self.conversation_id, count - 1, expected_last_sequence=count
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.ABORTED:
                    continue  # another writer moved the end: pop what is last now
                raise
            self._last_sequence = count - 1
            return to_item(resumed.messages[-1])

    async def clear_session(self) -> None:
        await self.client.truncate_conversation(self.conversation_id, 0)
        self._last_sequence = 0

