"""LangChain chat history backed by one convo conversation.

`ConvoChatMessageHistory` is a `BaseChatMessageHistory`: read `messages`
before a turn and `add_messages` what the turn produced (around a chat
model, an agent or a LangGraph node), or hand it to the older
`RunnableWithMessageHistory`. Every message goes to convo as typed parts, so
another process, another replica, or another framework reading the same
conversation sees the same turns.

What maps, both ways:
- `HumanMessage` ↔ ROLE_USER, `SystemMessage` ↔ ROLE_SYSTEM,
  `AIMessage` ↔ ROLE_ASSISTANT, `ToolMessage` ↔ ROLE_TOOL;
- string content ↔ the message's content; content blocks (`text`,
  `image_url`, Anthropic-style `thinking` with its `signature`) ↔ parts;
- `AIMessage.tool_calls` (id, name, args) ↔ tool_call parts (args as JSON);
- `ToolMessage.tool_call_id` and `status` ↔ a tool_result part (`is_error`);
- `usage_metadata` (input, output, cache_read, reasoning tokens) ↔ usage;
- `response_metadata["model_name"]` ↔ model; `name` ↔ name;
- convo's message id comes back as the message's `id`.
Other `additional_kwargs` and `response_metadata` keys are not stored.
"""

from __future__ import annotations

import json
import mimetypes
from typing import List, Optional, Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from convo.v1 import convo_pb2 as pb

from ._client import ConvoClient
from ._common import new_message

# Set on a message whose LangChain content was a list of blocks, so it comes
# back as a list even when it holds one text block.
BLOCKS = "langchain.content"

ROLES = {
    HumanMessage: pb.ROLE_USER,
    SystemMessage: pb.ROLE_SYSTEM,
    AIMessage: pb.ROLE_ASSISTANT,
    ToolMessage: pb.ROLE_TOOL,
}


def _block_to_part(block) -> pb.Part:
    if isinstance(block, str):
        return pb.Part(text=block)
    kind = block.get("type")
    if kind == "text":
        return pb.Part(text=block["text"])
    if kind == "image_url":
        url = block["image_url"]["url"] if isinstance(block["image_url"], dict) else block["image_url"]
        return pb.Part(blob=pb.Blob(uri=url, mime_type=_image_type(url)))
    if kind == "thinking":
        return pb.Part(
            reasoning=pb.Reasoning(text=block.get("thinking", "")),
            signature=block.get("signature", "").encode(),
        )
    raise ValueError(f"convo does not store LangChain content blocks of type {kind!r}")


def _image_type(url: str) -> str:
    """The media type of an image URL: a data URL says it, a file name may."""
    if url.startswith("data:"):
        declared = url[5:].split(";", 1)[0].split(",", 1)[0]
        if "/" in declared:
            return declared
    return mimetypes.guess_type(url)[0] or "image/*"


def _part_to_block(part: pb.Part):
    kind = part.WhichOneof("kind")
    if kind == "text":
        return {"type": "text", "text": part.text}
    if kind == "blob":
        return {"type": "image_url", "image_url": {"url": part.blob.uri}}
    if kind == "reasoning":
        return {
            "type": "thinking",
            "thinking": part.reasoning.text,
            "signature": part.signature.decode(),
        }
    return None


def _usage_to_convo(usage) -> pb.Usage:
    return pb.Usage(
        input_tokens=usage.get("input_tokens", 0),
        output_tokens=usage.get("output_tokens", 0),
        cached_input_tokens=(usage.get("input_token_details") or {}).get("cache_read", 0),
        reasoning_tokens=(usage.get("output_token_details") or {}).get("reasoning", 0),
    )


def _usage_from_convo(usage: pb.Usage):
    result = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
    if usage.cached_input_tokens:
        result["input_token_details"] = {"cache_read": usage.cached_input_tokens}
    if usage.reasoning_tokens:
        result["output_token_details"] = {"reasoning": usage.reasoning_tokens}
    return result


def to_convo(message: BaseMessage) -> pb.NewMessage:
    """A LangChain message as a convo message to append."""
    role = next((r for cls, r in ROLES.items() if isinstance(message, cls)), None)
    if role is None:
        raise ValueError(f"convo has no role for LangChain {type(message).__name__}")
    metadata = {}
    parts: List[pb.Part] = []
    content = ""
    if isinstance(message, ToolMessage):
        if not isinstance(message.content, str):
            raise ValueError("convo stores a ToolMessage's content as text")
        parts.append(
            pb.Part(
                tool_result=pb.ToolResult(
                    tool_call_id=message.tool_call_id,
                    content=message.content,
                    is_error=message.status == "error",
                )
            )
        )
    elif isinstance(message.content, str):
        content = message.content
    else:
        metadata[BLOCKS] = "blocks"
        parts.extend(_block_to_part(block) for block in message.content)
    usage = None
    model = ""
    if isinstance(message, AIMessage):
        if message.tool_calls:
            if content:
                parts.insert(0, pb.Part(text=content))
                content = ""
            for call in message.tool_calls:
                parts.append(
                    pb.Part(
                        tool_call=pb.ToolCall(
                            id=call["id"], name=call["name"], arguments=json.dumps(call["args"])
                        )
                    )
                )
        if message.usage_metadata:
            usage = _usage_to_convo(message.usage_metadata)
        model = message.response_metadata.get("model_name", "")
    return new_message(
        role,
        content,
        parts=parts,
        metadata=metadata,
        name=message.name or "",
        model=model,
        usage=usage,
    )


def to_langchain(message: pb.Message) -> BaseMessage:
    """A stored convo message as the LangChain message it was."""
    as_blocks = message.metadata.get(BLOCKS) == "blocks"
    blocks = [b for b in (_part_to_block(p) for p in message.parts) if b is not None]
    if as_blocks:
        content = blocks
    elif message.parts:
        content = "".join(p.text for p in message.parts if p.WhichOneof("kind") == "text")
    else:
        content = message.content
    common = {"id": message.id}
    if message.name:
        common["name"] = message.name
    if message.role == pb.ROLE_USER:
        return HumanMessage(content=content, **common)
    if message.role in (pb.ROLE_SYSTEM, pb.ROLE_DEVELOPER):
        return SystemMessage(content=content, **common)
    if message.role == pb.ROLE_TOOL:
        result = next(
            (p.tool_result for p in message.parts if p.WhichOneof("kind") == "tool_result"), None
        )
        if result is None:
            return ToolMessage(content=message.content, tool_call_id="", **common)
        return ToolMessage(
            content=result.content,
            tool_call_id=result.tool_call_id,
            status="error" if result.is_error else "success",
            **common,
        )
    tool_calls = [
        {
            "id": p.tool_call.id,
            "name": p.tool_call.name,
            "args": json.loads(p.tool_call.arguments or "{}"),
            "type": "tool_call",
        }
        for p in message.parts
        if p.WhichOneof("kind") == "tool_call"
    ]
    extra = {}
    if message.HasField("usage"):
        extra["usage_metadata"] = _usage_from_convo(message.usage)
    if message.model:
        extra["response_metadata"] = {"model_name": message.model}
    return AIMessage(content=content, tool_calls=tool_calls, **common, **extra)


class ConvoChatMessageHistory(BaseChatMessageHistory):
    """The messages of one convo conversation, as LangChain sees a history.

    `add_messages` appends a batch in one call (all or nothing, retried
    safely with one request_id); `clear` truncates the conversation to empty.

    With `if_unchanged=True`, a turn cannot be added on top of someone
    else's: once this object has read `messages` (or added or cleared),
    `add_messages` appends only if the conversation still ends where it left
    it (`expected_last_sequence`), and otherwise raises the call's
    `grpc.RpcError` with `ABORTED`, having added nothing. Re-read `messages`
    and run the turn again. Two replicas answering the same conversation at
    once cannot interleave their turns this way.
    """

    def __init__(self, client: ConvoClient, conversation_id: str, *, if_unchanged: bool = False):
        self.client = client
        self.conversation_id = conversation_id
        self.if_unchanged = if_unchanged
        # The sequence of the last message this object saw; None until it
        # has read, added or cleared.
        self._last_sequence: Optional[int] = None

    @property
    def messages(self) -> List[BaseMessage]:  # type: ignore[override]
        stored = list(self.client.iter_messages(self.conversation_id))
        self._last_sequence = stored[-1].sequence if stored else 0
        return [to_langchain(m) for m in stored]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        expected = self._last_sequence if self.if_unchanged else None
        appended = self.client.append_messages(
            self.conversation_id,
            [to_convo(m) for m in messages],
            expected_last_sequence=expected,
        )
        self._last_sequence = appended[-1].sequence

    def clear(self) -> None:
        self.client.truncate_conversation(self.conversation_id, 0)
        self._last_sequence = 0
