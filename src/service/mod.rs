//! The rules of the service: ownership, idempotency and preconditions.
//!
//! Requests arrive already parsed into domain types and every call names its
//! owner; this layer knows neither protobuf nor SQL.

mod error;

pub use error::ServiceError;

use crate::{
    domain::{
        Conversation, ConversationCursor, ConversationId, Message, MessageCursor, NewConversation,
        NewMessage, PageSize, RequestId, UserId,
    },
    store::{AppendOutcome, ConversationChanges, MessageOrder, Page, Store},
};

/// An append of one or more messages.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendMessages {
    pub conversation_id: ConversationId,
    /// 1 to `max_batch_messages` messages, in order.
    pub messages: Vec<NewMessage>,
    pub request_id: Option<RequestId>,
    /// When set, the append happens only if the conversation's last sequence
    /// (its message count) equals this.
    pub expected_last_sequence: Option<i64>,
}

/// Which messages of a conversation to list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListMessages {
    pub conversation_id: ConversationId,
    pub size: PageSize,
    /// Only messages with a greater sequence.
    pub after_sequence: i64,
    pub order: MessageOrder,
    pub cursor: Option<MessageCursor>,
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

/// convo's operations, each on behalf of an owner.
#[derive(Debug, Clone)]
pub struct Conversations {
    store: Store,
}

type Result<T> = std::result::Result<T, ServiceError>;

impl Conversations {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn create_conversation(
        &self,
        owner: &UserId,
        new: NewConversation,
        request_id: Option<RequestId>,
    ) -> Result<Conversation> {
        Ok(self
            .store
            .create_conversation(owner, &new, request_id.as_ref())
            .await?)
    }

    pub async fn get_conversation(
        &self,
        owner: &UserId,
        id: ConversationId,
    ) -> Result<Conversation> {
        Ok(self.store.get_conversation(owner, id).await?)
    }

    pub async fn list_conversations(
        &self,
        owner: &UserId,
        size: PageSize,
        after: Option<ConversationCursor>,
    ) -> Result<Page<Conversation>> {
        Ok(self.store.list_conversations(owner, size, after).await?)
    }

    pub async fn update_conversation(
        &self,
        owner: &UserId,
        id: ConversationId,
        changes: ConversationChanges,
    ) -> Result<Conversation> {
        Ok(self.store.update_conversation(owner, id, &changes).await?)
    }

    pub async fn delete_conversation(&self, owner: &UserId, id: ConversationId) -> Result<()> {
        Ok(self.store.delete_conversation(owner, id).await?)
    }

    /// Appends messages, or returns what an earlier call with the same
    /// request_id appended if the payload is the same.
    pub async fn append_messages(
        &self,
        owner: &UserId,
        append: AppendMessages,
    ) -> Result<Vec<Message>> {
        let outcome = self
            .store
            .append_messages(
                owner,
                append.conversation_id,
                &append.messages,
                append.request_id.as_ref(),
                append.expected_last_sequence,
            )
            .await?;
        match outcome {
            AppendOutcome::Appended(messages) => Ok(messages),
            AppendOutcome::Replayed(stored) => {
                let same_payload = stored.len() == append.messages.len()
                    && append
                        .messages
                        .iter()
                        .zip(&stored)
                        .all(|(new, old)| new.matches(old));
                if same_payload {
                    Ok(stored)
                } else {
                    Err(ServiceError::RequestIdReused)
                }
            }
        }
    }

    pub async fn list_messages(&self, owner: &UserId, list: ListMessages) -> Result<Page<Message>> {
        Ok(self
            .store
            .list_messages(
                owner,
                list.conversation_id,
                list.size,
                list.after_sequence,
                list.order,
                list.cursor,
            )
            .await?)
    }

    pub async fn resume_conversation(
        &self,
        owner: &UserId,
        id: ConversationId,
        max_messages: PageSize,
    ) -> Result<Resumed> {
        let (conversation, page) = self
            .store
            .resume_conversation(owner, id, max_messages)
            .await?;
        Ok(Resumed {
            conversation,
            messages: page.items,
            has_more: page.has_more,
        })
    }
}
