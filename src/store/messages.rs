use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{BigInt, Text},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    Store, StoreError, changes, conversations, parts,
    schema::{append_requests, messages, tool_calls},
    values::{TALLY_OF_ROWS, Tally, metadata_from_json, metadata_to_json, now_micros},
};
use crate::domain::{
    AppendMessages, Conversation, ConversationId, ListMessages, Message, MessageCursor, MessageId,
    MessageOrder, Name, NewMessage, Page, Parts, ResumeConversation, Resumed, Role, ToolCallId,
    TruncateConversation, Usage, UserId,
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
    parts: Option<Vec<u8>>,
    name: String,
    model: String,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_input_tokens: Option<i64>,
    reasoning_tokens: Option<i64>,
    answers_from: Option<i64>,
}

impl TryFrom<MessageRow> for Message {
    type Error = StoreError;

    fn try_from(row: MessageRow) -> Result<Self, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt(format!("message {}: {why}", row.id));
        let role = Role::parse("role", i32::from(row.role))
            .map_err(|_| corrupt(format!("role {}", row.role)))?;
        let parts = match &row.parts {
            Some(bytes) => parts::decode(bytes).map_err(corrupt)?,
            None => Vec::new(),
        };
        let usage = match (
            row.input_tokens,
            row.output_tokens,
            row.cached_input_tokens,
            row.reasoning_tokens,
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
            id: MessageId::from_uuid(row.id),
            conversation_id: ConversationId::from_uuid(row.conversation_id),
            sequence: row.sequence,
            role,
            content: row.content,
            metadata: metadata_from_json(row.metadata),
            create_time: row.create_time,
            parts,
            name: Name::from_stored(row.name),
            model: Name::from_stored(row.model),
            usage,
        })
    }
}

fn non_empty(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

fn messages_of(rows: Vec<MessageRow>) -> Result<Vec<Message>, StoreError> {
    rows.into_iter().map(Message::try_from).collect()
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
    parts: Option<Vec<u8>>,
    /// `None` inserts the column's default (''), so a message without a name
    /// or model binds nothing more than before they existed.
    name: Option<&'a str>,
    model: Option<&'a str>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cached_input_tokens: Option<i64>,
    reasoning_tokens: Option<i64>,
    answers_from: Option<i64>,
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
    /// A tool result answers no call made earlier in the conversation or the
    /// batch; nothing was written.
    UnansweredToolResult(ToolCallId),
    /// A tool call reuses an id already taken in the conversation; nothing
    /// was written.
    ToolCallIdTaken(ToolCallId),
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

/// How a batch's tool exchanges hold together, checked under the
/// conversation's lock: every result answers an earlier call, no call reuses
/// a taken id. `answers_from[i]` is, for message `i`, the lowest sequence
/// holding a call it answers.
struct ToolExchanges {
    answers_from: Vec<Option<i64>>,
    /// The batch's new calls and the sequences of their messages.
    calls: Vec<(ToolCallId, i64)>,
}

async fn check_tool_exchanges(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    conversation_id: ConversationId,
    batch: &[NewMessage],
    first_sequence: i64,
) -> Result<Result<ToolExchanges, AppendOutcome>, StoreError> {
    let mut calls: Vec<(ToolCallId, i64)> = Vec::new();
    let mut asked: Vec<&str> = Vec::new();
    for (message, sequence) in batch.iter().zip(first_sequence..) {
        if let Some(parts) = message.parts() {
            for call in parts.tool_calls() {
                calls.push((call.id.clone(), sequence));
                asked.push(call.id.as_str());
            }
            asked.extend(parts.answered_calls().map(ToolCallId::as_str));
        }
    }
    if asked.is_empty() {
        return Ok(Ok(ToolExchanges {
            answers_from: vec![None; batch.len()],
            calls,
        }));
    }
    // One lookup on the primary key of tool_calls, whatever the
    // conversation's length.
    let known: HashMap<String, i64> = tool_calls::table
        .filter(tool_calls::user_id.eq(owner.as_str()))
        .filter(tool_calls::conversation_id.eq(conversation_id.as_uuid()))
        .filter(tool_calls::tool_call_id.eq_any(&asked))
        .select((tool_calls::tool_call_id, tool_calls::sequence))
        .load::<(String, i64)>(conn)
        .await?
        .into_iter()
        .collect();
    if let Some((taken, _)) = calls.iter().find(|(id, _)| known.contains_key(id.as_str())) {
        return Ok(Err(AppendOutcome::ToolCallIdTaken(taken.clone())));
    }
    let mut answers_from = Vec::with_capacity(batch.len());
    for (message, sequence) in batch.iter().zip(first_sequence..) {
        let mut lowest: Option<i64> = None;
        for answered in message.parts().into_iter().flat_map(Parts::answered_calls) {
            let made_in = known.get(answered.as_str()).copied().or_else(|| {
                calls
                    .iter()
                    .find(|(id, at)| id == answered && *at < sequence)
                    .map(|(_, at)| *at)
            });
            match made_in {
                Some(at) => lowest = Some(lowest.map_or(at, |l| l.min(at))),
                None => return Ok(Err(AppendOutcome::UnansweredToolResult(answered.clone()))),
            }
        }
        answers_from.push(lowest);
    }
    Ok(Ok(ToolExchanges {
        answers_from,
        calls,
    }))
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
                        return Ok(AppendOutcome::Replayed(messages_of(rows)?));
                    }
                }

                if let Some(expected) = append.expected_last_sequence
                    && expected.get() != count
                {
                    return Ok(AppendOutcome::Stale { current: count });
                }

                let exchanges =
                    match check_tool_exchanges(conn, owner, conversation_id, batch, count + 1)
                        .await?
                    {
                        Ok(exchanges) => exchanges,
                        Err(refused) => return Ok(refused),
                    };

                // Never earlier than the conversation's last change, so create_time
                // does not decrease along sequence even if replica clocks disagree.
                let now = now_micros().max(update_time);
                // What the batch becomes, built here: the insert needs nothing
                // back from the database (no RETURNING of what was just sent).
                let stored: Vec<Message> = batch
                    .iter()
                    .zip(count + 1..)
                    .map(|(message, sequence)| Message {
                        id: MessageId::generate(),
                        conversation_id,
                        sequence,
                        role: message.role,
                        content: message.text().into_owned(),
                        metadata: message.metadata.clone(),
                        create_time: now,
                        parts: message
                            .parts()
                            .map(|parts| parts.as_slice().to_vec())
                            .unwrap_or_default(),
                        name: message.name.clone(),
                        model: message.model.clone(),
                        usage: message.usage,
                    })
                    .collect();
                let rows: Vec<NewMessageRow<'_>> = batch
                    .iter()
                    .zip(&stored)
                    .zip(&exchanges.answers_from)
                    .map(|((message, row), answers_from)| {
                        let usage = message.usage;
                        NewMessageRow {
                            user_id: owner.as_str(),
                            conversation_id: *conversation_id.as_uuid(),
                            sequence: row.sequence,
                            id: *row.id.as_uuid(),
                            role: message.role.number() as i16,
                            content: &row.content,
                            metadata: metadata_to_json(&message.metadata),
                            create_time: now,
                            parts: message.parts().map(parts::encode),
                            name: non_empty(message.name.as_str()),
                            model: non_empty(message.model.as_str()),
                            input_tokens: usage.map(|u| u.input_tokens),
                            output_tokens: usage.map(|u| u.output_tokens),
                            cached_input_tokens: usage.map(|u| u.cached_input_tokens),
                            reasoning_tokens: usage.map(|u| u.reasoning_tokens),
                            answers_from: *answers_from,
                        }
                    })
                    .collect();
                let written = diesel::insert_into(messages::table)
                    .values(&rows)
                    .execute(conn)
                    .await?;
                if written != batch.len() {
                    return Err(StoreError::Corrupt(format!(
                        "an append of {} messages to {conversation_id} wrote {written}",
                        batch.len(),
                    )));
                }
                let appended = written as i64;
                if !exchanges.calls.is_empty() {
                    let rows: Vec<_> = exchanges
                        .calls
                        .iter()
                        .map(|(id, sequence)| {
                            (
                                tool_calls::user_id.eq(owner.as_str()),
                                tool_calls::conversation_id.eq(conversation_id.as_uuid()),
                                tool_calls::tool_call_id.eq(id.as_str()),
                                tool_calls::sequence.eq(*sequence),
                            )
                        })
                        .collect();
                    diesel::insert_into(tool_calls::table)
                        .values(&rows)
                        .execute(conn)
                        .await?;
                }

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

                let usage = batch
                    .iter()
                    .filter_map(|m| m.usage)
                    .reduce(|sum, u| sum.plus(&u));
                conversations::record_append(
                    conn,
                    owner,
                    conversation_id,
                    count + appended,
                    usage.as_ref(),
                    now,
                )
                .await?;
                changes::notify(conn, &changes::conversation_changed(conversation_id)).await?;

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
            let items = messages_of(rows)?;
            Ok(Page::cut(items, size, |last| {
                MessageCursor::after(order, last)
            }))
        })
        .await
    }

    /// The conversation and its last `max_messages` messages in ascending order,
    /// and whether older ones exist.
    ///
    /// Sequences are gapless and messages are removed only from the end, so the
    /// last N are exactly `sequence > message_count - N`: a primary-key range,
    /// whatever the conversation's length, and consistent with the count read.
    /// When that window begins with tool results whose calls lie before it,
    /// it starts instead at the earliest message holding those calls (each
    /// tool message records it in `answers_from`), so a tool exchange is
    /// never split; that costs one more range read, only then.
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
            let start = (count - i64::from(max_messages.get())).max(0) + 1;
            let mut rows = message_range(conn, owner, conversation_id, start, count).await?;
            let widened = rows
                .iter()
                .take_while(|row| row.role == Role::Tool.number() as i16)
                .filter_map(|row| row.answers_from)
                .min()
                .filter(|&from| from < start);
            let first = match widened {
                Some(from) => {
                    let mut earlier =
                        message_range(conn, owner, conversation_id, from, start - 1).await?;
                    earlier.append(&mut rows);
                    rows = earlier;
                    from
                }
                None => start,
            };
            Ok(Resumed {
                conversation,
                messages: messages_of(rows)?,
                has_more: first > 1,
            })
        })
        .await
    }

    /// Removes every message after `after_sequence`, in one transaction under
    /// the conversation's lock: the cut messages, their tool calls (by
    /// cascade) and the request_ids that wrote them go; the conversation's
    /// count and usage follow, and its watchers are woken.
    pub async fn truncate_conversation(
        &self,
        owner: &UserId,
        truncate: &TruncateConversation,
    ) -> Result<TruncateOutcome, StoreError> {
        let conversation_id = truncate.conversation_id;
        let after = truncate.after_sequence.get();
        self.with_conn(async |conn| {
            conn.transaction(async |conn| {
                let (count, update_time) =
                    conversations::lock_for_append(conn, owner, conversation_id).await?;
                if let Some(expected) = truncate.expected_last_sequence
                    && expected.get() != count
                {
                    return Ok(TruncateOutcome::Stale { current: count });
                }
                if after > count {
                    return Ok(TruncateOutcome::BeyondEnd { length: count });
                }
                let removed: Tally = diesel::sql_query(format!("{REMOVE_AFTER}{TALLY_OF_ROWS}"))
                    .bind::<Text, _>(owner.as_str())
                    .bind::<diesel::sql_types::Uuid, _>(conversation_id.as_uuid())
                    .bind::<BigInt, _>(after)
                    .get_result(conn)
                    .await?;
                diesel::sql_query(FORGET_REQUESTS_AFTER)
                    .bind::<Text, _>(owner.as_str())
                    .bind::<diesel::sql_types::Uuid, _>(conversation_id.as_uuid())
                    .bind::<BigInt, _>(after)
                    .execute(conn)
                    .await?;
                let usage = removed.usage();
                let now = now_micros().max(update_time);
                let conversation = conversations::record_messages(
                    conn,
                    owner,
                    conversation_id,
                    after,
                    (&Usage::default(), &usage),
                    now,
                )
                .await?;
                changes::notify(conn, &changes::conversation_changed(conversation_id)).await?;
                Ok(TruncateOutcome::Truncated {
                    conversation,
                    removed: removed.count,
                })
            })
            .await
        })
        .await
    }
}

/// The owner's messages `from..=to` of a conversation, in order.
async fn message_range(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    conversation_id: ConversationId,
    from: i64,
    to: i64,
) -> Result<Vec<MessageRow>, StoreError> {
    Ok(messages::table
        .filter(messages::user_id.eq(owner.as_str()))
        .filter(messages::conversation_id.eq(conversation_id.as_uuid()))
        .filter(messages::sequence.between(from, to))
        .order(messages::sequence.asc())
        .select(MessageRow::as_select())
        .load(conn)
        .await?)
}

/// Forgets the request_ids that wrote any message after `$3`: a retry of
/// such a call appends anew instead of returning removed messages.
const FORGET_REQUESTS_AFTER: &str = "\
    DELETE FROM append_requests \
    WHERE user_id = $1 AND conversation_id = $2 AND first_sequence + message_count - 1 > $3";

/// Deletes the messages after `$3`; summed by [`TALLY_OF_ROWS`].
const REMOVE_AFTER: &str = "\
    WITH rows AS ( \
        DELETE FROM messages \
        WHERE user_id = $1 AND conversation_id = $2 AND sequence > $3 \
        RETURNING input_tokens, output_tokens, cached_input_tokens, reasoning_tokens \
    ) ";
