use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{self as sql, BigInt, Text},
};
use diesel_async::{AsyncConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    Store, StoreError,
    conversations::{self, CONVERSATION_COLUMNS, CountedConversation},
    list::{ListStatement, NewestFirst, OldestFirst},
    parts,
    pool::OneRow,
    schema::messages,
    statement::{fixed, fixed_text},
    values::{StoredMetadata, StoredTime, now_micros, tally_columns, tally_of},
};
use crate::domain::{
    Conversation, ConversationId, ListMessages, Message, MessageCursor, MessageId, MessageOrder,
    Metadata, Name, Page, Role, TruncateConversation, Usage, UserId,
};

/// A message as stored: its conversation's id, then the rest.
#[derive(Debug, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = messages, check_for_backend(diesel::pg::Pg))]
pub(super) struct MessageRow {
    conversation_id: Uuid,
    #[diesel(embed)]
    message: ConversationMessageRow,
}

/// A message of the one conversation a statement reads: a [`MessageRow`]
/// without `conversation_id`, which the caller named. Every row of a resume
/// or a page would otherwise carry and decode the same id again.
#[derive(Debug, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = messages, check_for_backend(diesel::pg::Pg))]
pub(super) struct ConversationMessageRow {
    id: Uuid,
    sequence: i64,
    role: i16,
    content: String,
    #[diesel(deserialize_as = StoredMetadata)]
    metadata: Metadata,
    #[diesel(deserialize_as = StoredTime)]
    create_time: DateTime<Utc>,
    parts: Option<Vec<u8>>,
    name: String,
    model: String,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_input_tokens: Option<i64>,
    reasoning_tokens: Option<i64>,
}

/// The columns of a [`ConversationMessageRow`], in order, for statements
/// that read rows by position.
pub(super) type ConversationMessageColumns = (
    sql::Uuid,
    sql::BigInt,
    sql::SmallInt,
    sql::Text,
    sql::Jsonb,
    sql::Timestamptz,
    sql::Nullable<sql::Bytea>,
    sql::Text,
    sql::Text,
    sql::Nullable<sql::BigInt>,
    sql::Nullable<sql::BigInt>,
    sql::Nullable<sql::BigInt>,
    sql::Nullable<sql::BigInt>,
);

impl ConversationMessageRow {
    pub(super) fn into_message(self, conversation_id: Uuid) -> Result<Message, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt(format!("message {}: {why}", self.id));
        let role = Role::parse("role", i32::from(self.role))
            .map_err(|_| corrupt(format!("role {}", self.role)))?;
        let parts = match &self.parts {
            Some(bytes) => parts::decode(bytes).map_err(corrupt)?,
            None => Vec::new(),
        };
        let usage = match (
            self.input_tokens,
            self.output_tokens,
            self.cached_input_tokens,
            self.reasoning_tokens,
        ) {
            (Some(input_tokens), Some(output_tokens), Some(cached), Some(reasoning)) => {
                Some(Usage {
                    input_tokens,
                    output_tokens,
                    cached_input_tokens: cached,
                    reasoning_tokens: reasoning,
                })
            }
            _ => None,
        };
        Ok(Message {
            id: MessageId::from_uuid(self.id),
            conversation_id: ConversationId::from_uuid(conversation_id),
            sequence: self.sequence,
            role,
            content: self.content,
            metadata: self.metadata,
            create_time: self.create_time,
            parts,
            name: Name::from_stored(self.name),
            model: Name::from_stored(self.model),
            usage,
        })
    }
}

impl TryFrom<MessageRow> for Message {
    type Error = StoreError;

    fn try_from(row: MessageRow) -> Result<Self, StoreError> {
        row.message.into_message(row.conversation_id)
    }
}

pub(super) fn messages_of(rows: Vec<MessageRow>) -> Result<Vec<Message>, StoreError> {
    rows.into_iter().map(Message::try_from).collect()
}

/// What a truncation did.
#[derive(Debug, Clone, PartialEq)]
pub enum TruncateOutcome {
    /// The conversation after the cut, and how many messages went.
    Truncated {
        conversation: Conversation,
        removed: i64,
    },
    /// `expected_last_sequence` was set and the conversation is at `current`
    /// instead; nothing was removed.
    Stale { current: i64 },
    /// The cut lies beyond the conversation's `length`; nothing was removed.
    BeyondEnd { length: i64 },
}

impl Store {
    /// A page of the conversation's messages with `sequence > after_sequence`,
    /// continuing after `cursor`. Walks the primary key from a bound, so the
    /// cost does not grow with the conversation's length; reads no more than
    /// about `max_bytes` of messages (see `list.rs`), so the page may end
    /// early, with a next cursor, for the caller to trim exactly.
    pub async fn list_messages(
        &self,
        owner: &UserId,
        list: &ListMessages,
        max_bytes: usize,
    ) -> Result<Page<Message, MessageCursor>, StoreError> {
        let ListMessages {
            conversation_id,
            size,
            after_sequence,
            order,
            cursor,
        } = *list;
        self.with_conn(async |conn| {
            let statement = ListStatement {
                user: owner.as_str(),
                conversation: conversation_id.as_uuid(),
                after: after_sequence.get(),
                cursor: cursor.map(|c| c.sequence),
                limit: size.limit_with_lookahead(),
                budget: i64::try_from(max_bytes).unwrap_or(i64::MAX),
            };
            let rows: Vec<ConversationMessageRow> = match order {
                MessageOrder::OldestFirst => OldestFirst(statement).load(conn).await?,
                MessageOrder::NewestFirst => NewestFirst(statement).load(conn).await?,
            };
            // An empty page may mean "no such conversation": ask only then, so the
            // common case stays one round trip.
            if rows.is_empty() && !conversations::exists_for(conn, owner, conversation_id).await? {
                return Err(StoreError::NotFound);
            }
            let items = rows
                .into_iter()
                .map(|row| row.into_message(*conversation_id.as_uuid()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Page::cut(items, size, |last| {
                MessageCursor::after(order, last)
            }))
        })
        .await
    }

    /// Lists messages for a watch stream. Watch reads take turns: at most a
    /// quarter of the pool's sessions serve them at once, so a thousand
    /// watchers woken together (a burst of notifications from another
    /// replica, or the listener's resync, which wakes them all) queue among
    /// themselves instead of taking every session from the calls.
    pub async fn list_messages_for_watch(
        &self,
        owner: &UserId,
        list: &ListMessages,
        max_bytes: usize,
    ) -> Result<Page<Message, MessageCursor>, StoreError> {
        let _turn = self
            .watch_reads
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".to_owned()))?;
        self.list_messages(owner, list, max_bytes).await
    }

    /// Removes every message after `after_sequence`, in one transaction under
    /// the conversation's lock: the cut messages, their tool calls (by
    /// cascade) and the request_ids that wrote them go; the conversation's
    /// count and usage follow. Watchers are told by the caller, after the
    /// commit.
    ///
    /// Two statements, the lock and then the cut, not one as a create or an
    /// append is: a statement reads with the snapshot it began with, so if
    /// its lock on the conversation waited for an append, its DELETE would
    /// not see that append's messages, and they would outlive the cut. The
    /// cut, a statement of its own after the lock, takes a snapshot that
    /// holds every message written before the lock was granted.
    pub async fn truncate_conversation(
        &self,
        owner: &UserId,
        truncate: &TruncateConversation,
    ) -> Result<TruncateOutcome, StoreError> {
        let conversation_id = truncate.conversation_id;
        let after = truncate.after_sequence.get();
        self.with_conn(async |conn| {
            conn.transaction(async |conn| {
                self.bound_lock_waits(conn).await?;
                let count = conversations::lock_for_truncate(conn, owner, conversation_id).await?;
                if let Some(expected) = truncate.expected_last_sequence
                    && expected.get() != count
                {
                    return Ok(TruncateOutcome::Stale { current: count });
                }
                if after > count {
                    return Ok(TruncateOutcome::BeyondEnd { length: count });
                }
                // The conversation after the cut, and how many messages went.
                let cut: CountedConversation = fixed::<Truncate, _>(|q| {
                    q.bind::<Text, _>(owner.as_str())
                        .bind::<sql::Uuid, _>(conversation_id.as_uuid())
                        .bind::<BigInt, _>(after)
                        .bind::<sql::Timestamptz, _>(now_micros())
                })
                .one_row(conn)
                .await?;
                Ok(TruncateOutcome::Truncated {
                    conversation: cut.conversation.into(),
                    removed: cut.messages,
                })
            })
            .await
        })
        .await
    }
}

/// The cut, once the conversation is locked: the messages after `$3` go
/// (their tool calls by cascade), the request_ids that wrote any of them are
/// forgotten (a retry of such a call appends anew instead of returning
/// removed messages), and the conversation's count, usage and size drop by
/// what went, its update time set to `$4` (or kept, should the row's be
/// later: another replica's clock may run ahead). One statement: three would be
/// three round trips, in a transaction already holding the lock.
fn truncate_statement() -> String {
    format!(
        "\
WITH forgotten AS (
    DELETE FROM append_requests
     WHERE user_id = $1 AND conversation_id = $2 AND first_sequence + message_count - 1 > $3
), removed AS (
    DELETE FROM messages
     WHERE user_id = $1 AND conversation_id = $2 AND sequence > $3
    RETURNING {returned}
), cut AS ({tally})
UPDATE conversations
   SET message_count = $3,
       update_time = greatest($4, update_time),
       usage_input_tokens = usage_input_tokens - cut.input_tokens,
       usage_output_tokens = usage_output_tokens - cut.output_tokens,
       usage_cached_input_tokens = usage_cached_input_tokens - cut.cached_input_tokens,
       usage_reasoning_tokens = usage_reasoning_tokens - cut.reasoning_tokens,
       total_bytes = total_bytes - cut.bytes
  FROM cut
 WHERE user_id = $1 AND id = $2
RETURNING {CONVERSATION_COLUMNS}, cut.count AS messages",
        returned = tally_columns(),
        tally = tally_of("removed"),
    )
}

fixed_text!(pub(super) Truncate = truncate_statement());
