use chrono::{DateTime, Utc};

use super::{Content, ConversationId, MessageId, Metadata, Name, Part, Parts, Role, Usage, UserId};

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
    /// The sum of its messages' usage.
    pub usage: Usage,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub sequence: i64,
    pub role: Role,
    /// The content it was stored with, or the text projection of its parts.
    pub content: String,
    pub metadata: Metadata,
    pub create_time: DateTime<Utc>,
    /// Empty for a message stored from content.
    pub parts: Vec<Part>,
    pub name: Name,
    pub model: Name,
    pub usage: Option<Usage>,
}

/// What a new message says: plain content, or typed parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Content(Content),
    Parts(Parts),
}

/// A validated message to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub role: Role,
    pub body: Body,
    pub metadata: Metadata,
    pub name: Name,
    pub model: Name,
    pub usage: Option<Usage>,
}

impl NewMessage {
    /// True when `stored` carries this payload, parts included: how an
    /// idempotent retry is told apart from a reused request_id with a
    /// different message.
    pub fn matches(&self, stored: &Message) -> bool {
        let same_body = match &self.body {
            Body::Content(content) => stored.parts.is_empty() && content.as_str() == stored.content,
            Body::Parts(parts) => parts.as_slice() == stored.parts.as_slice(),
        };
        same_body
            && self.role == stored.role
            && self.metadata == stored.metadata
            && self.name == stored.name
            && self.model == stored.model
            && self.usage == stored.usage
    }

    /// The text stored in `content`: the content itself, or the text
    /// projection of the parts.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match &self.body {
            Body::Content(content) => content.as_str().into(),
            Body::Parts(parts) => parts.text_projection().into(),
        }
    }

    pub fn parts(&self) -> Option<&Parts> {
        match &self.body {
            Body::Content(_) => None,
            Body::Parts(parts) => Some(parts),
        }
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
