use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    Store, StoreError, changes, conversations,
    schema::{append_requests, messages},
    values::{metadata_from_json, metadata_to_json, now_micros},
};
use crate::domain::{
    AppendMessages, ConversationId, ListMessages, Message, MessageCursor, MessageId, MessageOrder,
    Page, ResumeConversation, Resumed, Role, UserId,
};

#[derive(Debug, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = messages, check_for_backend(diesel::pg::Pg))]
pub(super) struct MessageRow {
    id: Uuid,
    conversation_id: Uuid,
    sequence: i64,
    role: i16,
    content: String,
    metadata: serde_json::Value,
    create_time: DateTime<Utc>,
}

impl TryFrom<MessageRow> for Message {
    type Error = StoreError;

    fn try_from(row: MessageRow) -> Result<Self, StoreError> {
        let role = Role::parse("role", i32::from(row.role))
            .map_err(|_| StoreError::Corrupt(format!("message {}: role {}", row.id, row.role)))?;
        Ok(Message {
            id: MessageId::from_uuid(row.id),
            conversation_id: ConversationId::from_uuid(row.conversation_id),
            sequence: row.sequence,
            role,
            content: row.content,
            metadata: metadata_from_json(row.metadata),
            create_time: row.create_time,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = messages)]
struct NewMessageRow<'a> {
    user_id: &'a str,
    conversation_id: Uuid,
    sequence: i64,
    id: Uuid,
    role: i16,
    content: &'a str,
    metadata: serde_json::Value,
    create_time: DateTime<Utc>,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    /// The messages were written now.
    Appended(Vec<Message>),
    /// The request_id was seen before on this conversation: these are the
    /// messages it wrote then, and nothing was written now. Whether the payload
    /// matches is the caller's to judge.
    Replayed(Vec<Message>),
    /// `expected_last_sequence` was set and the conversation is at `current`
    /// instead; nothing was written.
    Stale { current: i64 },
}

impl Store {
    /// Appends `batch` at the end of the conversation, all or nothing.
    ///
    /// The conversation row is locked (`FOR UPDATE`) for the transaction, so
    /// concurrent appenders to one conversation take turns: each reads the
    /// count left by the previous one and sequences are gapless and unique
    /// (the primary key backs this). Appenders to different conversations do
    /// not wait for each other.
    pub async fn append_messages(
        &self,
        owner: &UserId,
        append: &AppendMessages,
    ) -> Result<AppendOutcome, StoreError> {
        let conversation_id = append.conversation_id;
        let batch = &append.messages;
        let request_id = append.request_id.as_ref();
        self.with_conn(async |conn| {
            conn.transaction(async |conn| {
                let (count, update_time) =
                    conversations::lock_for_append(conn, owner, conversation_id).await?;

                // An idempotent replay is recognised before any precondition: the
                // retry of a call that succeeded must see that success.
                if let Some(request_id) = request_id {
                    let earlier: Option<(i64, i32)> = append_requests::table
                        .filter(append_requests::user_id.eq(owner.as_str()))
                        .filter(append_requests::conversation_id.eq(conversation_id.as_uuid()))
                        .filter(append_requests::request_id.eq(request_id.as_str()))
                        .select((
                            append_requests::first_sequence,
                            append_requests::message_count,
                        ))
                        .first(conn)
                        .await
                        .optional()?;
                    if let Some((first, n)) = earlier {
                        let rows: Vec<MessageRow> = messages::table
                            .filter(messages::user_id.eq(owner.as_str()))
                            .filter(messages::conversation_id.eq(conversation_id.as_uuid()))
                            .filter(messages::sequence.between(first, first + i64::from(n) - 1))
                            .order(messages::sequence.asc())
                            .select(MessageRow::as_select())
                            .load(conn)
                            .await?;
                        let stored = rows
                            .into_iter()
                            .map(Message::try_from)
                            .collect::<Result<_, _>>()?;
                        return Ok(AppendOutcome::Replayed(stored));
                    }
                }

                if let Some(expected) = append.expected_last_sequence
                    && expected.get() != count
                {
                    return Ok(AppendOutcome::Stale { current: count });
                }

                // Never earlier than the conversation's last change, so create_time
                // does not decrease along sequence even if replica clocks disagree.
                let now = now_micros().max(update_time);
                let rows: Vec<NewMessageRow<'_>> = batch
                    .iter()
                    .zip(count + 1..)
                    .map(|(message, sequence)| NewMessageRow {
                        user_id: owner.as_str(),
                        conversation_id: *conversation_id.as_uuid(),
                        sequence,
                        id: *MessageId::generate().as_uuid(),
                        role: message.role.number() as i16,
                        content: message.content.as_str(),
                        metadata: metadata_to_json(&message.metadata),
                        create_time: now,
                    })
                    .collect();
                let written: Vec<MessageRow> = diesel::insert_into(messages::table)
                    .values(&rows)
                    .returning(MessageRow::as_returning())
                    .get_results(conn)
                    .await?;
                if written.len() != batch.len() {
                    return Err(StoreError::Corrupt(format!(
                        "an append of {} messages to {conversation_id} wrote {}",
                        batch.len(),
                        written.len()
                    )));
                }
                let appended = written.len() as i64;

                if let Some(request_id) = request_id {
                    diesel::insert_into(append_requests::table)
                        .values((
                            append_requests::user_id.eq(owner.as_str()),
                            append_requests::conversation_id.eq(conversation_id.as_uuid()),
                            append_requests::request_id.eq(request_id.as_str()),
                            append_requests::first_sequence.eq(count + 1),
                            append_requests::message_count.eq(appended as i32),
                            append_requests::create_time.eq(now),
                        ))
                        .execute(conn)
                        .await?;
                }

                conversations::record_append(conn, owner, conversation_id, count + appended, now)
                    .await?;
                changes::notify(conn, &changes::conversation_changed(conversation_id)).await?;

                let mut stored = written
                    .into_iter()
                    .map(Message::try_from)
                    .collect::<Result<Vec<_>, _>>()?;
                stored.sort_by_key(|m| m.sequence);
                Ok(AppendOutcome::Appended(stored))
            })
            .await
        })
        .await
    }

    /// A page of the conversation's messages with `sequence > after_sequence`,
    /// continuing after `cursor`. Walks the primary key from a bound, so the
    /// cost does not grow with the conversation's length.
    pub async fn list_messages(
        &self,
        owner: &UserId,
        list: &ListMessages,
    ) -> Result<Page<Message, MessageCursor>, StoreError> {
        let ListMessages {
            conversation_id,
            size,
            after_sequence,
            order,
            cursor,
        } = *list;
        self.with_conn(async |conn| {
            let mut query = messages::table
                .filter(messages::user_id.eq(owner.as_str()))
                .filter(messages::conversation_id.eq(conversation_id.as_uuid()))
                .filter(messages::sequence.gt(after_sequence.get()))
                .select(MessageRow::as_select())
                .limit(size.limit_with_lookahead())
                .into_boxed();
            query = match order {
                MessageOrder::OldestFirst => {
                    if let Some(cursor) = cursor {
                        query = query.filter(messages::sequence.gt(cursor.sequence));
                    }
                    query.order(messages::sequence.asc())
                }
                MessageOrder::NewestFirst => {
                    if let Some(cursor) = cursor {
                        query = query.filter(messages::sequence.lt(cursor.sequence));
                    }
                    query.order(messages::sequence.desc())
                }
            };
            let rows: Vec<MessageRow> = query.load(conn).await?;
            // An empty page may mean "no such conversation": ask only then, so the
            // common case stays one round trip.
            if rows.is_empty() && !conversations::exists_for(conn, owner, conversation_id).await? {
                return Err(StoreError::NotFound);
            }
            let items = rows
                .into_iter()
                .map(Message::try_from)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Page::cut(items, size, |last| {
                MessageCursor::after(order, last)
            }))
        })
        .await
    }

    /// The conversation and its last `max_messages` messages in ascending order,
    /// and whether older ones exist.
    ///
    /// Sequences are gapless and messages are never removed one by one, so the
    /// last N are exactly `sequence > message_count - N`: a primary-key range,
    /// whatever the conversation's length, and consistent with the count read.
    pub async fn resume_conversation(
        &self,
        owner: &UserId,
        resume: ResumeConversation,
    ) -> Result<Resumed, StoreError> {
        let ResumeConversation {
            conversation_id,
            max_messages,
        } = resume;
        self.with_conn(async |conn| {
            let conversation = conversations::find(conn, owner, conversation_id).await?;
            let count = conversation.message_count;
            let first = (count - i64::from(max_messages.get())).max(0);
            let rows: Vec<MessageRow> = messages::table
                .filter(messages::user_id.eq(owner.as_str()))
                .filter(messages::conversation_id.eq(conversation_id.as_uuid()))
                .filter(messages::sequence.gt(first))
                .filter(messages::sequence.le(count))
                .order(messages::sequence.asc())
                .select(MessageRow::as_select())
                .load(conn)
                .await?;
            let messages = rows
                .into_iter()
                .map(Message::try_from)
                .collect::<Result<_, _>>()?;
            Ok(Resumed {
                conversation,
                messages,
                has_more: first > 0,
            })
        })
        .await
    }
}
