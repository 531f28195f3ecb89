//! The service: every operation on behalf of an owner, and what its outcome
//! means for the caller.
//!
//! Requests arrive already parsed into domain commands, and every call names
//! its owner, whom the gRPC edge resolved before anything else; this layer
//! knows neither protobuf nor SQL. Where each rule is enforced:
//! - **ownership**: every store call is scoped by the owner; a foreign
//!   conversation reads as missing (`ConversationNotFound`);
//! - **idempotency**: the store finds an earlier append with the same
//!   request_id inside the append's transaction; this layer decides whether
//!   the payload is the same ([`Conversations::append_messages`]);
//! - **`expected_last_sequence` and the fork's bound**: checked by the store
//!   under the conversation's lock (they must hold at commit), reported as
//!   outcomes that this layer turns into refusals;
//! - **watch ordering**: this layer's watch task reads `sequence > last sent`
//!   after every wake, or delivers an append handed over in memory only when
//!   it continues exactly after the last message sent, so a stream has no gap
//!   and no duplicate;
//! - **change announcements**: after a write commits, this layer tells the
//!   change feed (never from inside the write's transaction: see ADR 0010).

mod error;

pub use error::{ServiceError, WatchCap};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::{
    domain::{
        AppendMessages, Conversation, ConversationChanges, ConversationCursor, ConversationId,
        Erased, ForkConversation, ListConversations, ListMessages, Message, MessageCursor,
        MessageId, MessageOrder, NewConversation, Page, PageSize, ResumeConversation, Resumed,
        SearchCursor, SearchHit, SearchMessages, Sequence, TruncateConversation, UserId,
        WatchConversation,
    },
    store::{
        AppendOutcome, Appended, ChangeFeed, Follows, ForkOutcome, SearchOutcome, Store,
        StoreError, TruncateOutcome, Wake,
    },
};

/// What a watch stream yields: messages in sequence order, then possibly one
/// error that ends it.
pub type WatchStream = mpsc::Receiver<std::result::Result<Outgoing, ServiceError>>;

/// A message on its way to a watcher. While it waits in the stream's buffer
/// it holds its size's share of the stream's byte budget
/// ([`WATCH_BUFFER_BYTES`]), so a client that stops reading holds about that
/// much buffered, whatever its messages weigh; taking the message out
/// releases the share.
#[derive(Debug)]
pub struct Outgoing {
    message: Message,
    _share: OwnedSemaphorePermit,
}

impl Outgoing {
    pub fn into_message(self) -> Message {
        self.message
    }
}

/// The longest prefix of `messages` whose sizes add up to at most `budget`
/// bytes, never empty when `messages` is not (the rule of [`Page::fit`]),
/// and whether anything was left out.
fn within_budget(messages: Vec<Message>, budget: usize) -> (Vec<Message>, bool) {
    let page = Page {
        items: messages,
        next: None,
    }
    .fit(budget, Message::wire_size_bound, |_| ());
    (page.items, page.next.is_some())
}

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

/// How many messages a watcher reads per query; what it holds is bounded by
/// bytes as well (see [`Outgoing`]).
const WATCH_BATCH: PageSize = PageSize::fixed(64);

/// What one watch stream may hold in messages not yet taken by the
/// transport, and in a page read but not yet queued: a live feed needs little
/// (a message larger than this still goes, alone), and a thousand stalled
/// watchers must not hold gigabytes.
const WATCH_BUFFER_BYTES: usize = 256 * 1024;

/// Where a watch stream stands: the last sequence it delivered (or was asked
/// to start after) and, once known, the id of the message there.
///
/// Every read starts one message early, at that position, so the stream sees
/// whether the message it stands on is still the same one: a truncation
/// below it removes it (or a later append puts another message with a new id
/// in its place), and the stream then ends with ABORTED instead of going on
/// from a history the client no longer shares.
struct Position {
    sequence: Sequence,
    anchor: Option<MessageId>,
}

impl Position {
    fn new(after: Sequence) -> Self {
        Self {
            sequence: after,
            anchor: None,
        }
    }

    fn read_after(&self) -> Sequence {
        Sequence::before(self.sequence)
    }

    /// The messages of a read that are new to the stream, or why it must end.
    fn check(&mut self, mut read: Vec<Message>) -> std::result::Result<Vec<Message>, ServiceError> {
        if self.sequence.is_start() {
            return Ok(read);
        }
        let truncated = || ServiceError::WatchTruncated {
            position: self.sequence.get(),
        };
        match read.first() {
            Some(first) if first.sequence == self.sequence.get() => {
                if self.anchor.is_some_and(|anchor| anchor != first.id) {
                    return Err(truncated());
                }
                self.anchor = Some(first.id);
                read.remove(0);
                Ok(read)
            }
            // The message the stream stands on is gone.
            _ if self.anchor.is_some() => Err(truncated()),
            // Asked to start beyond the end: nothing there yet.
            _ => Ok(read),
        }
    }

    /// What to do with an append handed over by this process: deliver it
    /// when it continues exactly where the stream stands (the message it
    /// follows is the one the stream stands on), else read.
    fn hand_off(&self, appended: &Appended) -> Option<Vec<Message>> {
        let first = appended.messages.first()?;
        let continues = first.sequence == self.sequence.get() + 1
            && if self.sequence.is_start() {
                first.sequence == 1
            } else {
                self.anchor.is_some() && appended.follows == self.anchor
            };
        continues.then(|| appended.messages.clone())
    }

    fn delivered(&mut self, message: &Message) {
        self.sequence = Sequence::of(message);
        self.anchor = Some(message.id);
    }
}

/// How many watch streams may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    pub per_user: usize,
    pub per_server: usize,
}

/// The watch streams open in this process, by owner; a stream holds a
/// [`WatchSlot`] for as long as it lives.
#[derive(Debug)]
struct WatchSlots {
    limits: WatchLimits,
    open: std::sync::Mutex<(usize, std::collections::HashMap<UserId, usize>)>,
}

impl WatchSlots {
    fn take(self: &std::sync::Arc<Self>, owner: &UserId) -> Result<WatchSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_owner) = &mut *open;
        if *total >= self.limits.per_server {
            return Err(ServiceError::TooManyWatches(WatchCap::Server(
                self.limits.per_server,
            )));
        }
        let mine = by_owner.entry(owner.clone()).or_default();
        if *mine >= self.limits.per_user {
            return Err(ServiceError::TooManyWatches(WatchCap::PerUser(
                self.limits.per_user,
            )));
        }
        *mine += 1;
        *total += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            owner: owner.clone(),
        })
    }
}

struct WatchSlot {
    slots: std::sync::Arc<WatchSlots>,
    owner: UserId,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        let (total, by_owner) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(mine) = by_owner.get_mut(&self.owner) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                by_owner.remove(&self.owner);
            }
        }
    }
}

/// convo's operations, each on behalf of an owner.
#[derive(Debug, Clone)]
pub struct Conversations {
    store: Store,
    changes: ChangeFeed,
    /// No page or resume answer is larger than this, encoded.
    max_response_bytes: usize,
    watches: std::sync::Arc<WatchSlots>,
}

type Result<T> = std::result::Result<T, ServiceError>;

impl Conversations {
    pub fn new(
        store: Store,
        changes: ChangeFeed,
        max_response_bytes: usize,
        watch_limits: WatchLimits,
    ) -> Self {
        Self {
            store,
            changes,
            max_response_bytes,
            watches: std::sync::Arc::new(WatchSlots {
                limits: watch_limits,
                open: Default::default(),
            }),
        }
    }

    pub async fn create_conversation(
        &self,
        owner: &UserId,
        new: NewConversation,
    ) -> Result<Conversation> {
        Ok(self.store.create_conversation(owner, &new).await?)
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
        list: ListConversations,
    ) -> Result<Page<Conversation, ConversationCursor>> {
        let page = self.store.list_conversations(owner, list).await?;
        Ok(page.fit(
            self.max_response_bytes,
            Conversation::wire_size_bound,
            ConversationCursor::after,
        ))
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
        self.store.delete_conversation(owner, id).await?;
        // Its watchers end with NOT_FOUND.
        self.changes.changed(id);
        Ok(())
    }

    /// Appends messages, or returns what an earlier call with the same
    /// request_id appended if the payload is the same.
    pub async fn append_messages(
        &self,
        owner: &UserId,
        append: AppendMessages,
    ) -> Result<Vec<Message>> {
        // The message before the batch matters only to a watcher here.
        let follows = if self.changes.is_watched(append.conversation_id) {
            Follows::Wanted
        } else {
            Follows::NotWanted
        };
        match self.store.append_messages(owner, &append, follows).await? {
            AppendOutcome::Appended { messages, follows } => {
                // Committed: now (never inside the write) watchers hear of it.
                self.changes
                    .appended(append.conversation_id, &messages, follows);
                Ok(messages)
            }
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
            AppendOutcome::Stale { current } => Err(ServiceError::SequenceMismatch {
                expected: append.expected_last_sequence.map_or(current, |s| s.get()),
                current,
            }),
            AppendOutcome::UnansweredToolResult(id) => Err(ServiceError::UnansweredToolResult(id)),
            AppendOutcome::ToolCallIdTaken(id) => Err(ServiceError::ToolCallIdTaken(id)),
        }
    }

    /// Appends one message (an [`AppendMessages`] holding exactly one) and
    /// returns it as stored.
    pub async fn append_message(&self, owner: &UserId, append: AppendMessages) -> Result<Message> {
        let stored = self.append_messages(owner, append).await?;
        // The store wrote (or replayed, with a payload of the same length)
        // exactly the one message asked for.
        let count = stored.len();
        let mut stored = stored.into_iter();
        match (stored.next(), stored.next()) {
            (Some(message), None) => Ok(message),
            _ => Err(ServiceError::Internal(StoreError::Corrupt(format!(
                "an append of one message returned {count}"
            )))),
        }
    }

    pub async fn list_messages(
        &self,
        owner: &UserId,
        list: ListMessages,
    ) -> Result<Page<Message, MessageCursor>> {
        let page = self
            .store
            .list_messages(owner, &list, self.max_response_bytes)
            .await?;
        Ok(
            page.fit(self.max_response_bytes, Message::wire_size_bound, |last| {
                MessageCursor::after(list.order, last)
            }),
        )
    }

    pub async fn resume_conversation(
        &self,
        owner: &UserId,
        resume: ResumeConversation,
    ) -> Result<Resumed> {
        let resumed = self
            .store
            .resume_conversation(owner, resume, self.max_response_bytes)
            .await?;
        Ok(resumed.fit(self.max_response_bytes))
    }

    /// Starts a watch: checks ownership before anything streams, then sends
    /// every message after `after_sequence` and each new one as it commits.
    ///
    /// The subscription is taken (after the ownership check) before the first
    /// read, and every read asks
    /// the database for `sequence > last sent`, so the stream has no gap and no
    /// duplicate whatever the timing of notifications. A client that goes
    /// away ends the task at its next send or wait.
    pub async fn watch_conversation(
        &self,
        owner: &UserId,
        watch: WatchConversation,
    ) -> Result<WatchStream> {
        let id = watch.conversation_id;
        // A slot first: past the caps, a watch is refused before any work.
        let slot = self.watches.take(owner)?;
        // Ownership next: only the owner's interest is ever recorded in the
        // change feed. Nothing committed after this check is missed: the
        // first read below comes after the subscription.
        self.store.get_conversation(owner, id).await?;
        let mut subscription = self.changes.subscribe(owner, id);
        let (sender, stream) = mpsc::channel(WATCH_BATCH.get() as usize);
        let store = self.store.clone();
        let owner = owner.clone();
        let budget = WATCH_BUFFER_BYTES;
        let shares = std::sync::Arc::new(Semaphore::new(budget));
        tokio::spawn(async move {
            let _slot = slot;
            let _open = OpenWatch::start();
            let mut position = Position::new(watch.after_sequence);
            // Messages an append in this process handed over, when they
            // continue the stream: delivered without a read.
            let mut handed: Option<Vec<Message>> = None;
            loop {
                let (fresh, more) = match handed.take() {
                    Some(messages) => (messages, false),
                    None => {
                        let read = ListMessages {
                            conversation_id: id,
                            size: WATCH_BATCH,
                            after_sequence: position.read_after(),
                            order: MessageOrder::OldestFirst,
                            cursor: None,
                        };
                        let page = match store.list_messages_for_watch(&owner, &read, budget).await
                        {
                            Ok(page) => page,
                            Err(error) => {
                                // NOT_FOUND once the conversation is deleted; an
                                // outage ends the stream as UNAVAILABLE, to be
                                // resumed.
                                let _ = sender.send(Err(error.into())).await;
                                return;
                            }
                        };
                        let more = page.next.is_some();
                        match position.check(page.items) {
                            Ok(fresh) => {
                                let (fresh, cut) = within_budget(fresh, budget);
                                (fresh, more || cut)
                            }
                            Err(truncated) => {
                                let _ = sender.send(Err(truncated)).await;
                                return;
                            }
                        }
                    }
                };
                for message in fresh {
                    position.delivered(&message);
                    let share = message.wire_size_bound().min(budget) as u32;
                    let share = tokio::select! {
                        share = shares.clone().acquire_many_owned(share) => match share {
                            Ok(share) => share,
                            Err(_) => return,
                        },
                        () = sender.closed() => return,
                    };
                    let outgoing = Outgoing {
                        message,
                        _share: share,
                    };
                    if sender.send(Ok(outgoing)).await.is_err() {
                        return;
                    }
                }
                if more {
                    continue;
                }
                tokio::select! {
                    wake = subscription.next() => match wake {
                        Wake::Closing => {
                            let _ = sender.send(Err(ServiceError::ShuttingDown)).await;
                            return;
                        }
                        Wake::Changed(Some(appended)) => handed = position.hand_off(&appended),
                        Wake::Changed(None) => {}
                    },
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
        match self.store.fork_conversation(owner, &fork).await? {
            ForkOutcome::Forked(conversation) => Ok(conversation),
            ForkOutcome::BeyondEnd { length } => Err(ServiceError::ForkBeyondEnd {
                requested: fork.up_to_sequence.map_or(length, |s| s.get()),
                length,
            }),
        }
    }

    pub async fn search_messages(
        &self,
        owner: &UserId,
        search: &SearchMessages,
    ) -> Result<Page<SearchHit, SearchCursor>> {
        let page = match self
            .store
            .search_messages(owner, search, self.max_response_bytes)
            .await?
        {
            SearchOutcome::Found(page) => page,
            SearchOutcome::MatchesEverything => return Err(ServiceError::SearchMatchesEverything),
            SearchOutcome::OverBudget(budget) => {
                return Err(ServiceError::SearchOverBudget(budget));
            }
        };
        Ok(page.fit(
            self.max_response_bytes,
            SearchHit::wire_size_bound,
            SearchCursor::after,
        ))
    }

    /// Removes every message after a position: a rewind. Returns the
    /// conversation after the cut and how many messages went.
    pub async fn truncate_conversation(
        &self,
        owner: &UserId,
        truncate: TruncateConversation,
    ) -> Result<(Conversation, i64)> {
        match self.store.truncate_conversation(owner, &truncate).await? {
            TruncateOutcome::Truncated {
                conversation,
                removed,
            } => {
                // Watchers past the cut end with ABORTED.
                self.changes.changed(truncate.conversation_id);
                Ok((conversation, removed))
            }
            TruncateOutcome::Stale { current } => Err(ServiceError::SequenceMismatch {
                expected: truncate.expected_last_sequence.map_or(current, |s| s.get()),
                current,
            }),
            TruncateOutcome::BeyondEnd { length } => Err(ServiceError::TruncateBeyondEnd {
                requested: truncate.after_sequence.get(),
                length,
            }),
        }
    }

    /// Erases everything stored for the caller.
    pub async fn delete_user_data(&self, owner: &UserId) -> Result<Erased> {
        let erased = self.store.delete_user_data(owner).await?;
        if erased.conversations > 0 {
            self.changes.user_changed(owner);
        }
        Ok(erased)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sequence: i64) -> Message {
        Message::example(ConversationId::from_uuid(uuid::Uuid::nil()), sequence)
    }

    fn appended(follows: Option<MessageId>, sequences: std::ops::RangeInclusive<i64>) -> Appended {
        Appended {
            follows,
            messages: sequences.map(message).collect(),
        }
    }

    #[test]
    fn an_append_is_handed_over_only_when_it_continues_the_stream_exactly() {
        // From the start: the conversation's first messages continue it.
        let start = Position::new(Sequence::START);
        assert!(start.hand_off(&appended(None, 1..=2)).is_some());
        assert!(start.hand_off(&appended(None, 2..=3)).is_none(), "a gap");

        let mut position = Position::new(Sequence::START);
        let delivered = message(1);
        position.delivered(&delivered);
        // Follows the message the stream stands on: delivered as is.
        let next = appended(Some(delivered.id), 2..=3);
        assert_eq!(position.hand_off(&next).map(|m| m.len()), Some(2));
        // Follows another message at that position (a truncation and a new
        // append came between): read instead, which ends the stream.
        assert!(
            position
                .hand_off(&appended(Some(MessageId::generate()), 2..=2))
                .is_none()
        );
        // Not known what it follows (a concurrent append committed first).
        assert!(position.hand_off(&appended(None, 2..=2)).is_none());
        // Already delivered, or further ahead: read.
        assert!(
            position
                .hand_off(&appended(Some(delivered.id), 1..=1))
                .is_none()
        );
        assert!(
            position
                .hand_off(&appended(Some(delivered.id), 3..=3))
                .is_none()
        );

        // Asked to start after 5 without having read anything yet: the
        // message at 5 is unknown, so nothing is handed over.
        let asked = Position::new(Sequence::parse("after_sequence", 5, "").unwrap());
        assert!(
            asked
                .hand_off(&appended(Some(MessageId::generate()), 6..=6))
                .is_none()
        );
    }

    #[test]
    fn a_watch_holds_messages_up_to_its_byte_budget_and_always_one() {
        let page: Vec<Message> = (1..=5).map(message).collect();
        let size = page[0].wire_size_bound();
        let (kept, cut) = within_budget(page.clone(), 2 * size);
        assert_eq!((kept.len(), cut), (2, true));
        let (kept, cut) = within_budget(page.clone(), 10 * size);
        assert_eq!((kept.len(), cut), (5, false));
        // A message larger than the whole budget still goes, alone.
        let (kept, cut) = within_budget(page, size / 2);
        assert_eq!((kept.len(), cut), (1, true));
        assert_eq!(within_budget(Vec::new(), size), (Vec::new(), false));
    }
}
