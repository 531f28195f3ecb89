//! The rules of the service: ownership, idempotency and preconditions.
//!
//! Requests arrive already parsed into domain types and every call names its
//! owner; this layer knows neither protobuf nor SQL.

mod error;

pub use error::ServiceError;

use tokio::sync::mpsc;

use crate::{
    domain::{
        Conversation, ConversationCursor, ConversationId, Erased, Message, MessageCursor,
        NewConversation, NewMessage, PageSize, RequestId, SearchCursor, SearchHit, SearchQuery,
        Title, UserId,
    },
    store::{AppendOutcome, ChangeFeed, ConversationChanges, MessageOrder, Page, Store, Wake},
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

/// A search of the caller's messages.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchMessages {
    pub query: SearchQuery,
    pub conversation_id: Option<ConversationId>,
    pub size: PageSize,
    pub cursor: Option<SearchCursor>,
}

/// A fork of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ForkConversation {
    pub source: ConversationId,
    /// The last sequence to copy; `None` copies every message.
    pub up_to_sequence: Option<i64>,
    /// The new title; `None` keeps the source's.
    pub title: Option<Title>,
}

/// What a watch stream yields: messages in sequence order, then possibly one
/// error that ends it.
pub type WatchStream = mpsc::Receiver<std::result::Result<Message, ServiceError>>;

/// Counts a watch stream in `convo_watch_streams` for as long as it lives.
struct OpenWatch;

impl OpenWatch {
    fn start() -> Self {
        metrics::gauge!("convo_watch_streams").increment(1.0);
        Self
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        metrics::gauge!("convo_watch_streams").decrement(1.0);
    }
}

/// How many messages a watcher reads per query, and buffers for its client.
const WATCH_BATCH: PageSize = PageSize::fixed(256);

/// convo's operations, each on behalf of an owner.
#[derive(Debug, Clone)]
pub struct Conversations {
    store: Store,
    changes: ChangeFeed,
}

type Result<T> = std::result::Result<T, ServiceError>;

impl Conversations {
    pub fn new(store: Store, changes: ChangeFeed) -> Self {
        Self { store, changes }
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

    /// Starts a watch: checks ownership before anything streams, then sends
    /// every message after `after_sequence` and each new one as it commits.
    ///
    /// The subscription is taken before the first read, and every read asks
    /// the database for `sequence > last sent`, so the stream has no gap and no
    /// duplicate whatever the timing of notifications. A client that goes
    /// away ends the task at its next send or wait.
    pub async fn watch_conversation(
        &self,
        owner: &UserId,
        id: ConversationId,
        after_sequence: i64,
    ) -> Result<WatchStream> {
        let mut subscription = self.changes.subscribe(owner, id);
        self.store.get_conversation(owner, id).await?;
        let (sender, stream) = mpsc::channel(WATCH_BATCH.get() as usize);
        let store = self.store.clone();
        let owner = owner.clone();
        let batch = WATCH_BATCH;
        tokio::spawn(async move {
            let _open = OpenWatch::start();
            let mut last = after_sequence;
            loop {
                let page = store
                    .list_messages(&owner, id, batch, last, MessageOrder::OldestFirst, None)
                    .await;
                match page {
                    Ok(page) => {
                        for message in page.items {
                            last = message.sequence;
                            if sender.send(Ok(message)).await.is_err() {
                                return;
                            }
                        }
                        if page.has_more {
                            continue;
                        }
                    }
                    Err(error) => {
                        // NOT_FOUND once the conversation is deleted; an outage
                        // ends the stream as UNAVAILABLE, to be resumed.
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                }
                tokio::select! {
                    wake = subscription.next() => {
                        if wake == Wake::Closing {
                            let _ = sender.send(Err(ServiceError::ShuttingDown)).await;
                            return;
                        }
                    }
                    () = sender.closed() => return,
                }
            }
        });
        Ok(stream)
    }

    /// Copies a conversation, or its first messages, into a new one.
    pub async fn fork_conversation(
        &self,
        owner: &UserId,
        fork: ForkConversation,
    ) -> Result<Conversation> {
        Ok(self
            .store
            .fork_conversation(owner, fork.source, fork.up_to_sequence, fork.title.as_ref())
            .await?)
    }

    pub async fn search_messages(
        &self,
        owner: &UserId,
        search: &SearchMessages,
    ) -> Result<Page<SearchHit>> {
        Ok(self
            .store
            .search_messages(
                owner,
                &search.query,
                search.conversation_id,
                search.size,
                search.cursor,
            )
            .await?)
    }

    /// Erases everything stored for the caller.
    pub async fn delete_user_data(&self, owner: &UserId) -> Result<Erased> {
        Ok(self.store.delete_user_data(owner).await?)
    }
}
