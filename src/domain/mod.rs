//! Parsed domain types shared by every layer.
//!
//! Each type is built only by parsing (`parse`/`TryFrom`), so a value that
//! travels inward from the gRPC edge is already known to be valid. Requests
//! become the commands of [`commands`]; listings are cut into pages whose
//! cursors are built in [`paging`].

mod commands;
mod ids;
mod limits;
mod message;
mod metadata;
mod paging;
mod parts;
#[cfg(test)]
mod properties;
mod role;
mod search;
mod sequence;
mod text;
mod violation;

pub use commands::{
    AppendMessages, ConversationChanges, ForkConversation, ListConversations, ListMessages,
    NewConversation, ResumeConversation, SearchMessages, TruncateConversation, WatchConversation,
};
pub use ids::{ConversationId, MessageId, RequestId, UserId};
pub use limits::Limits;
pub use message::{Body, Conversation, Erased, Message, NewMessage, Resumed};
pub use metadata::Metadata;
pub use paging::{ConversationCursor, MessageCursor, MessageOrder, Page, PageSize, SearchCursor};
pub use parts::{
    Blob, BlobSource, Name, Part, PartKind, Parts, ToolCall, ToolCallId, ToolResult, Usage,
    parse_projected_text, parse_signature,
};
pub use role::Role;
pub use search::{SearchHit, SearchQuery};
pub use sequence::Sequence;
pub use text::{Content, Title};
pub use violation::{BadRequest, FieldViolation, Violations};
