//! What a caller asks for, parsed: each request of the API becomes one of
//! these at the gRPC edge and travels inward unchanged, through the service
//! to the store.

use super::{
    ConversationCursor, ConversationId, MessageCursor, MessageOrder, Metadata, NewMessage,
    PageSize, RequestId, SearchCursor, SearchQuery, Sequence, Title,
};

/// What a new conversation starts with.
#[derive(Debug, Clone, PartialEq)]
pub struct NewConversation {
    pub title: Title,
    pub metadata: Metadata,
    /// A retry with the same id returns the conversation first created with it.
    pub request_id: Option<RequestId>,
}

/// A page of the caller's conversations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListConversations {
    pub size: PageSize,
    pub cursor: Option<ConversationCursor>,
}

/// Which fields of a conversation an update replaces; `None` leaves a field
/// as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationChanges {
    pub title: Option<Title>,
    pub metadata: Option<Metadata>,
}

/// An append of one or more messages, all or nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendMessages {
    pub conversation_id: ConversationId,
    /// 1 to `max_batch_messages` messages, in order.
    pub messages: Vec<NewMessage>,
    pub request_id: Option<RequestId>,
    /// When set, the append happens only if the conversation's last sequence
    /// (its message count) equals this.
    pub expected_last_sequence: Option<Sequence>,
}

/// Which messages of a conversation to list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListMessages {
    pub conversation_id: ConversationId,
    pub size: PageSize,
    /// Only messages with a greater sequence.
    pub after_sequence: Sequence,
    pub order: MessageOrder,
    pub cursor: Option<MessageCursor>,
}

/// A conversation's latest messages, for an orchestrator picking it back up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResumeConversation {
    pub conversation_id: ConversationId,
    pub max_messages: PageSize,
}

/// A stream of a conversation's messages after a position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchConversation {
    pub conversation_id: ConversationId,
    pub after_sequence: Sequence,
}

/// A copy of a conversation, or of its first messages.
#[derive(Debug, Clone, PartialEq)]
pub struct ForkConversation {
    pub source: ConversationId,
    /// The last sequence to copy; `None` copies every message.
    pub up_to_sequence: Option<Sequence>,
    /// The new title; `None` keeps the source's.
    pub title: Option<Title>,
}

/// A search of the caller's messages.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchMessages {
    pub query: SearchQuery,
    pub conversation_id: Option<ConversationId>,
    pub size: PageSize,
    pub cursor: Option<SearchCursor>,
}

/// A rewind: remove every message after a position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TruncateConversation {
    pub conversation_id: ConversationId,
    /// Keep messages up to this one; remove the rest.
    pub after_sequence: Sequence,
    /// When set, the cut happens only if the conversation's last sequence
    /// equals this.
    pub expected_last_sequence: Option<Sequence>,
}
