use chrono::{DateTime, Utc};

use super::{Content, ConversationId, MessageId, Metadata, Role, UserId};

/// A conversation as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: ConversationId,
    pub user_id: UserId,
    pub title: String,
    pub metadata: Metadata,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub message_count: i64,
    /// The source conversation and the last sequence copied from it.
    pub forked_from: Option<(ConversationId, i64)>,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub sequence: i64,
    pub role: Role,
    pub content: String,
    pub metadata: Metadata,
    pub create_time: DateTime<Utc>,
}

/// A validated message to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub role: Role,
    pub content: Content,
    pub metadata: Metadata,
}

impl NewMessage {
    /// True when `stored` carries this payload: how an idempotent retry is told
    /// apart from a reused request_id with different content.
    pub fn matches(&self, stored: &Message) -> bool {
        self.role == stored.role
            && self.content.as_str() == stored.content
            && self.metadata == stored.metadata
    }
}

/// What an orchestrator needs to pick a conversation back up.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumed {
    pub conversation: Conversation,
    /// The latest messages, oldest first.
    pub messages: Vec<Message>,
    /// True iff older messages exist.
    pub has_more: bool,
}

/// What an erasure of a user's data removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    pub conversations: i64,
    pub messages: i64,
}
