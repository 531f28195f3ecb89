//! Parsed domain types shared by every layer.
//!
//! Each type is built only by parsing (`parse`/`TryFrom`), so a value that
//! travels inward from the gRPC edge is already known to be valid.

mod ids;
mod limits;
mod message;
mod metadata;
mod paging;
#[cfg(test)]
mod properties;
mod role;
mod search;
mod text;
mod violation;

pub use ids::{ConversationId, MessageId, RequestId, UserId};
pub use limits::Limits;
pub use message::{Conversation, Erased, Message, NewConversation, NewMessage};
pub use metadata::Metadata;
pub use paging::{ConversationCursor, MessageCursor, PageSize, PageTokenCodec, SearchCursor};
pub use role::Role;
pub use search::{SearchHit, SearchQuery};
pub use text::{Content, Title};
pub use violation::{FieldViolation, Violations};
