"""convo's Python client: sync and asyncio clients for convo.v1, and
adapters for LangChain (`convo_client.langchain`) and the OpenAI Agents SDK
(`convo_client.openai_agents`).

The protocol's messages are `convo.v1.convo_pb2`, generated from the
contract when this package was built.
"""

from convo.v1 import convo_pb2 as pb

from ._aio import AsyncConvoClient
from ._client import ConvoClient
from ._common import NO_RETRY, ConvoError, Retry, StillRacing, Truncated, new_message
from ._details import FieldViolation, PreconditionViolation, field_violations, precondition_violations

__all__ = [
    "AsyncConvoClient",
    "ConvoClient",
    "ConvoError",
    "FieldViolation",
    "NO_RETRY",
    "PreconditionViolation",
    "Retry",
    "StillRacing",
    "Truncated",
    "field_violations",
    "new_message",
    "pb",
    "precondition_violations",
]
