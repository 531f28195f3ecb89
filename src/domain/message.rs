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

/// Bytes a field's tag and length prefix may take in protobuf.
pub(super) const FIELD_OVERHEAD: usize = 8;

impl Message {
    /// An upper bound of the message's protobuf encoding, in bytes: every
    /// string and byte it holds, plus the framing of each field. What a page
    /// is measured with against the response size limit.
    pub fn wire_size_bound(&self) -> usize {
        let parts: usize = self
            .parts
            .iter()
            .map(|part| part.size_bytes() + 8 * FIELD_OVERHEAD)
            .sum();
        // Two ids, the times, sequence, role, usage and their framing.
        const FIXED: usize = 256;
        FIXED
            + self.content.len()
            + self.metadata.wire_size_bound()
            + parts
            + self.name.as_str().len()
            + self.model.as_str().len()
    }
}

impl Conversation {
    /// An upper bound of the conversation's protobuf encoding, in bytes.
    pub fn wire_size_bound(&self) -> usize {
        const FIXED: usize = 384;
        FIXED + self.title.len() + self.user_id.as_str().len() + self.metadata.wire_size_bound()
    }
}

impl Resumed {
    /// Keeps the newest messages whose encoding fits `budget` bytes (never
    /// fewer than one), and says there is more when any were left out. A
    /// window cut this way starts at a tool-exchange boundary: tool results
    /// at its start, whose calls were left out, are left out too (the byte
    /// limit wins over keeping an exchange whole).
    pub fn fit(mut self, budget: usize) -> Self {
        let mut used = self.conversation.wire_size_bound();
        let mut keep = 0;
        for message in self.messages.iter().rev() {
            used += message.wire_size_bound();
            if used > budget && keep > 0 {
                break;
            }
            keep += 1;
        }
        let cut = self.messages.len() - keep;
        if cut > 0 {
            self.messages.drain(..cut);
            let results = self
                .messages
                .iter()
                .take_while(|m| m.role == Role::Tool)
                .count();
            if results < self.messages.len() {
                self.messages.drain(..results);
            }
            self.has_more = true;
        }
        self
    }
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

#[cfg(test)]
impl Message {
    /// A stored user message at `sequence` of `conversation_id`, for tests.
    pub fn example(conversation_id: ConversationId, sequence: i64) -> Self {
        Self {
            id: MessageId::generate(),
            conversation_id,
            sequence,
            role: Role::User,
            content: format!("message {sequence}"),
            metadata: Metadata::from_stored(Default::default()),
            create_time: Utc::now(),
            parts: Vec::new(),
            name: Name::default(),
            model: Name::default(),
            usage: None,
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
