use chrono::{DateTime, Utc};
use diesel::{
    dsl::exists,
    prelude::*,
    sql_types::{BigInt, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    Store, StoreError,
    pool::OneRow,
    schema::conversations,
    statement::{fixed, fixed_text, one_text},
    values::{StoredMetadata, StoredTime, metadata_to_json, now_micros, tally_columns, tally_of},
};
use crate::domain::{
    Conversation, ConversationChanges, ConversationId, ForkConversation, MessageId, Metadata,
    Title, Usage, UserId,
};

#[diesel::declare_sql_function]
extern "SQL" {
    /// PostgreSQL's GREATEST for timestamps: `update_time` never moves back,
    /// even when replica clocks disagree.
    fn greatest(a: Timestamptz, b: Timestamptz) -> Timestamptz;

    /// PostgreSQL's COALESCE: a new value when one is given, else the old.
    fn coalesce<T: diesel::sql_types::SingleValue>(new: Nullable<T>, old: T) -> T;
}

/// [`Store::update_conversation`]'s statement, which writes one text.
enum UpdateConversation {}

#[derive(Debug, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = conversations, check_for_backend(diesel::pg::Pg))]
pub(super) struct ConversationRow {
    pub(super) user_id: String,
    pub(super) id: Uuid,
    pub(super) title: String,
    #[diesel(deserialize_as = StoredMetadata)]
    pub(super) metadata: Metadata,
    #[diesel(deserialize_as = StoredTime)]
    pub(super) create_time: DateTime<Utc>,
    #[diesel(deserialize_as = StoredTime)]
    pub(super) update_time: DateTime<Utc>,
    pub(super) message_count: i64,
    pub(super) forked_from_conversation_id: Option<Uuid>,
    pub(super) forked_at_sequence: Option<i64>,
    pub(super) usage_input_tokens: i64,
    pub(super) usage_output_tokens: i64,
    pub(super) usage_cached_input_tokens: i64,
    pub(super) usage_reasoning_tokens: i64,
}

/// The columns of a [`ConversationRow`], in order, for statements that read
/// rows by position.
pub(super) type ConversationColumns = (
    Text,
    SqlUuid,
    Text,
    Jsonb,
    Timestamptz,
    Timestamptz,
    BigInt,
    Nullable<SqlUuid>,
    Nullable<BigInt>,
    BigInt,
    BigInt,
    BigInt,
    BigInt,
);

/// The columns of a [`ConversationRow`] in the order of
/// [`ConversationColumns`], for hand-written statements.
pub(super) const CONVERSATION_COLUMNS: &str = "\
user_id, id, title, metadata, create_time, update_time, message_count,
       forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
       usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens";

/// A [`ConversationRow`] read as one `record` column (`ROW(...)` of its
/// columns in the order of [`ConversationColumns`]): a statement whose other
/// rows are messages then carries one NULL column on each, not thirteen.
pub(super) type ConversationRecord = (
    String,
    Uuid,
    String,
    StoredMetadata,
    StoredTime,
    StoredTime,
    i64,
    Option<Uuid>,
    Option<i64>,
    i64,
    i64,
    i64,
    i64,
);

impl From<ConversationRecord> for ConversationRow {
    fn from(record: ConversationRecord) -> Self {
        Self {
            user_id: record.0,
            id: record.1,
            title: record.2,
            metadata: record.3.into(),
            create_time: record.4.into(),
            update_time: record.5.into(),
            message_count: record.6,
            forked_from_conversation_id: record.7,
            forked_at_sequence: record.8,
            usage_input_tokens: record.9,
            usage_output_tokens: record.10,
            usage_cached_input_tokens: record.11,
            usage_reasoning_tokens: record.12,
        }
    }
}

impl From<ConversationRow> for Conversation {
    fn from(row: ConversationRow) -> Self {
        let forked_from = match (row.forked_from_conversation_id, row.forked_at_sequence) {
            (Some(source), Some(sequence)) => Some((ConversationId::from_uuid(source), sequence)),
            _ => None,
        };
        Conversation {
            id: ConversationId::from_uuid(row.id),
            user_id: UserId::from_stored(row.user_id),
            title: row.title,
            metadata: row.metadata,
            create_time: row.create_time,
            update_time: row.update_time,
            message_count: row.message_count,
            forked_from,
            usage: Usage {
                input_tokens: row.usage_input_tokens,
                output_tokens: row.usage_output_tokens,
                cached_input_tokens: row.usage_cached_input_tokens,
                reasoning_tokens: row.usage_reasoning_tokens,
            },
        }
    }
}

/// A new conversation: created empty, or forked with messages copied in.
/// `None` is written as NULL (the columns' default), not as `DEFAULT`: the
/// statement's text then never varies, so diesel keeps it prepared instead
/// of preparing it at every call.
#[derive(Insertable)]
#[diesel(table_name = conversations, treat_none_as_default_value = false)]
pub(super) struct NewConversationRow<'a> {
    pub(super) user_id: &'a str,
    pub(super) id: Uuid,
    pub(super) title: &'a str,
    pub(super) metadata: serde_json::Value,
    pub(super) create_time: DateTime<Utc>,
    pub(super) update_time: DateTime<Utc>,
    pub(super) message_count: i64,
    pub(super) forked_from_conversation_id: Option<Uuid>,
    pub(super) forked_at_sequence: Option<i64>,
    pub(super) request_id: Option<&'a str>,
    pub(super) usage_input_tokens: i64,
    pub(super) usage_output_tokens: i64,
    pub(super) usage_cached_input_tokens: i64,
    pub(super) usage_reasoning_tokens: i64,
}

/// What a fork did.
#[derive(Debug, Clone, PartialEq)]
pub enum ForkOutcome {
    /// The new conversation, with its messages copied in.
    Forked(Conversation),
    /// The fork asked for more messages than the source's `length`; nothing
    /// was written.
    BeyondEnd { length: i64 },
}

/// Reads one of the owner's conversations.
pub(super) async fn find(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    id: ConversationId,
) -> Result<Conversation, StoreError> {
    conversations::table
        .filter(conversations::user_id.eq(owner.as_str()))
        .filter(conversations::id.eq(id.as_uuid()))
        .select(ConversationRow::as_select())
        .one_row(conn)
        .await
        .optional()?
        .map(Conversation::from)
        .ok_or(StoreError::NotFound)
}

/// True when the owner has this conversation.
pub(super) async fn exists_for(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    id: ConversationId,
) -> Result<bool, StoreError> {
    Ok(diesel::select(exists(
        conversations::table
            .filter(conversations::user_id.eq(owner.as_str()))
            .filter(conversations::id.eq(id.as_uuid())),
    ))
    .one_row(conn)
    .await?)
}

/// Locks the owner's conversation as an append does (so a truncate waits
/// for appends in flight, and they for it) and reads its message count.
/// `FOR NO KEY UPDATE` is the weakest lock that serializes them: it does not
/// wait for a fork's `FOR KEY SHARE` on the same row, so a long fork holds
/// neither back.
pub(super) async fn lock_for_truncate(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    id: ConversationId,
) -> Result<i64, StoreError> {
    conversations::table
        .filter(conversations::user_id.eq(owner.as_str()))
        .filter(conversations::id.eq(id.as_uuid()))
        .select(conversations::message_count)
        .for_no_key_update()
        .one_row(conn)
        .await
        .optional()?
        .ok_or(StoreError::NotFound)
}

impl Store {
    pub async fn get_conversation(
        &self,
        owner: &UserId,
        id: ConversationId,
    ) -> Result<Conversation, StoreError> {
        self.with_conn(async |conn| find(conn, owner, id).await)
            .await
    }

    /// Replaces the fields named in `changes` and bumps `update_time`.
    pub async fn update_conversation(
        &self,
        owner: &UserId,
        id: ConversationId,
        changes: &ConversationChanges,
    ) -> Result<Conversation, StoreError> {
        let update = async |conn: &mut AsyncPgConnection| {
            let title = changes.title.as_ref().map(Title::as_str);
            let metadata = changes.metadata.as_ref().map(metadata_to_json);
            // Both columns at every call, each kept when not given: one
            // statement text, which diesel then keeps prepared.
            let statement = diesel::update(conversations::table)
                .filter(conversations::user_id.eq(owner.as_str()))
                .filter(conversations::id.eq(id.as_uuid()))
                .set((
                    conversations::title.eq(coalesce(title, conversations::title)),
                    conversations::metadata.eq(coalesce(metadata, conversations::metadata)),
                    conversations::update_time
                        .eq(greatest(now_micros(), conversations::update_time)),
                ))
                .returning(ConversationRow::as_returning());
            // In autocommit: the row once committed (see `OneRow`).
            one_text::<UpdateConversation, _>(statement)
                .one_row(conn)
                .await
                .optional()?
                .map(Conversation::from)
                .ok_or(StoreError::NotFound)
        };
        self.with_conn(async |conn| self.write_once(conn, update).await)
            .await
    }

    /// Deletes a conversation; its messages go with it (ON DELETE CASCADE),
    /// and its watchers on every replica are told.
    pub async fn delete_conversation(
        &self,
        owner: &UserId,
        id: ConversationId,
    ) -> Result<(), StoreError> {
        let delete = async |conn: &mut AsyncPgConnection| -> Result<usize, StoreError> {
            Ok(diesel::delete(conversations::table)
                .filter(conversations::user_id.eq(owner.as_str()))
                .filter(conversations::id.eq(id.as_uuid()))
                .execute(conn)
                .await?)
        };
        let deleted = self
            .with_conn(async |conn| self.write_once(conn, delete).await)
            .await?;
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Copies messages 1..=`up_to` (all when `None`) of a conversation into a
    /// new conversation of the same owner, in one transaction: the locks,
    /// then one statement ([`Fork`]) that makes the conversation and copies
    /// the messages and their tool calls. The new ids are derived in SQL from
    /// one id the service generates, so the copy has no volatile function (on
    /// Citus it runs on the user's worker) and no per-message array is built.
    /// The source is held with `FOR KEY SHARE` (it cannot be deleted
    /// mid-copy), which appends to it (`FOR NO KEY UPDATE`) do not wait for;
    /// the copy, a statement after that lock, sees every message it counted.
    pub async fn fork_conversation(
        &self,
        owner: &UserId,
        fork: &ForkConversation,
    ) -> Result<ForkOutcome, StoreError> {
        let source = fork.source;
        let title = fork.title.as_ref();
        self.with_conn(async |conn| {
            conn.transaction(async |conn| {
                self.bound_lock_waits(conn).await?;
                // The user row first, as an erasure locks it first: the new
                // conversation's foreign key would otherwise take it after
                // the source's lock, the opposite order (a deadlock).
                fixed::<LockUser, _>(|q| q.bind::<Text, _>(owner.as_str()))
                    .execute(conn)
                    .await?;
                // FOR KEY SHARE keeps the source from being deleted mid-copy
                // without blocking appends to it.
                let source_row: ConversationRow = conversations::table
                    .filter(conversations::user_id.eq(owner.as_str()))
                    .filter(conversations::id.eq(source.as_uuid()))
                    .select(ConversationRow::as_select())
                    .for_key_share()
                    .one_row(conn)
                    .await
                    .optional()?
                    .ok_or(StoreError::NotFound)?;
                let length = source_row.message_count;
                let copied = match fork.up_to_sequence {
                    None => length,
                    Some(n) if n.get() <= length => n.get(),
                    Some(_) => return Ok(ForkOutcome::BeyondEnd { length }),
                };
                // One fresh UUIDv7 for the whole copy; message n's id is it
                // with n mixed into its random low bits (see COPY_MESSAGES).
                let base = MessageId::generate().as_uuid().as_u64_pair();
                let id = ConversationId::generate();
                let forked: CountedConversation = fixed::<Fork, _>(|q| {
                    q.bind::<Text, _>(owner.as_str())
                        .bind::<diesel::sql_types::Uuid, _>(id.as_uuid())
                        .bind::<BigInt, _>(base.0 as i64)
                        .bind::<diesel::sql_types::Uuid, _>(source_row.id)
                        .bind::<BigInt, _>(copied)
                        .bind::<BigInt, _>(base.1 as i64)
                        .bind::<Text, _>(title.map_or(source_row.title.as_str(), Title::as_str))
                        .bind::<Jsonb, _>(metadata_to_json(&source_row.metadata))
                        .bind::<Timestamptz, _>(now_micros())
                })
                .one_row(conn)
                .await?;
                if forked.messages != copied {
                    return Err(StoreError::Corrupt(format!(
                        "conversation {source} counts {copied} messages up to the fork point but {} were copied",
                        forked.messages
                    )));
                }
                Ok(ForkOutcome::Forked(forked.conversation.into()))
            })
            .await
        })
        .await
    }
}

fixed_text!(pub(super) LockUser = LOCK_USER);
fixed_text!(pub(super) Fork = fork_statement());

/// Inserts the user row, or locks it if it exists: `ON CONFLICT DO UPDATE`
/// locks the conflicting row even when its `WHERE` updates nothing.
const LOCK_USER: &str = "\
    INSERT INTO users (user_id) VALUES ($1) \
    ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id WHERE false";

/// Copies the source's first `$5` messages into `$2`. Each copy's id is the
/// UUIDv7 whose high half is `$3` and low half `$6 XOR sequence`: the time
/// and version of one fresh id, the variant bits untouched (sequences stay
/// far below 2^62), distinct per message, and no volatile function, so the
/// statement stays on one shard under Citus, with no per-message array sent.
/// A prefix keeps its running byte totals.
const COPY_MESSAGES: &str = "\
    INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, metadata, \
                          create_time, parts, name, model, input_tokens, output_tokens, \
                          cached_input_tokens, reasoning_tokens, answers_from, bytes_through) \
    SELECT m.user_id, $2, m.sequence, \
           (lpad(to_hex($3::bigint), 16, '0') \
            || lpad(to_hex($6::bigint # m.sequence), 16, '0'))::uuid, \
           m.role, m.content, m.metadata, \
           m.create_time, m.parts, m.name, m.model, m.input_tokens, m.output_tokens, \
           m.cached_input_tokens, m.reasoning_tokens, m.answers_from, m.bytes_through \
    FROM messages m \
    WHERE m.user_id = $1 AND m.conversation_id = $4 AND m.sequence <= $5";

/// Copies the tool calls of the source's first `$5` messages into `$2`, so
/// results appended to the fork can answer them.
const COPY_TOOL_CALLS: &str = "\
    INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence) \
    SELECT user_id, $2, tool_call_id, sequence FROM tool_calls \
    WHERE user_id = $1 AND conversation_id = $4 AND sequence <= $5";

/// The fork, once the user row and the source are locked: the conversation
/// `$2` inserted (title `$7`, metadata `$8`, made at `$9`) with the count,
/// usage and size of the source's first `$5` messages, those messages
/// copied ([`COPY_MESSAGES`]) and their tool calls ([`COPY_TOOL_CALLS`]).
/// Returns the new conversation and how many messages were copied.
///
/// One statement, where it was four round trips (the insert, the two copies,
/// then the totals). The copies insert rows whose foreign keys point at the
/// conversation inserted beside them: PostgreSQL checks those keys at the
/// end of the statement, when it is there. The totals are summed from the
/// source's rows, which the copies read in the same snapshot.
fn fork_statement() -> String {
    format!(
        "\
WITH kept AS (
    SELECT {kept}
      FROM messages
     WHERE user_id = $1 AND conversation_id = $4 AND sequence <= $5
), total AS ({total}), made AS (
    INSERT INTO conversations (user_id, id, title, metadata, create_time, update_time,
                               message_count, forked_from_conversation_id, forked_at_sequence,
                               usage_input_tokens, usage_output_tokens, usage_cached_input_tokens,
                               usage_reasoning_tokens, total_bytes)
    SELECT $1, $2, $7, $8, $9, $9, $5, $4, $5, input_tokens, output_tokens, cached_input_tokens,
           reasoning_tokens, bytes
      FROM total
    RETURNING {CONVERSATION_COLUMNS}
), copied AS (
    {COPY_MESSAGES}
    RETURNING 1
), calls AS (
    {COPY_TOOL_CALLS}
)
SELECT {CONVERSATION_COLUMNS}, (SELECT count(*) FROM copied) AS messages
  FROM made",
        kept = tally_columns(),
        total = tally_of("kept"),
    )
}

/// A conversation as a statement left it, and how many messages that
/// statement wrote or removed (a fork's copies, a truncate's cut).
#[derive(QueryableByName)]
pub(super) struct CountedConversation {
    #[diesel(embed)]
    pub(super) conversation: ConversationRow,
    #[diesel(sql_type = BigInt)]
    pub(super) messages: i64,
}

/// The owners' conversations of [`Store::conversation_versions`], as columns.
const VERSIONS: &str = "\
    SELECT c.id, c.message_count, c.update_time \
    FROM unnest($1::text[], $2::uuid[]) AS w (user_id, id) \
    JOIN conversations c ON c.user_id = w.user_id AND c.id = w.id";

#[derive(QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = BigInt)]
    message_count: i64,
    #[diesel(sql_type = Timestamptz)]
    update_time: DateTime<Utc>,
}

impl Store {
    /// The message count and update time of each of these conversations that
    /// exists, in one query: how the change feed's catch-up sees what moved.
    /// Like retention, it spans owners (the watchers of one process).
    pub async fn conversation_versions(
        &self,
        watched: &[(UserId, ConversationId)],
    ) -> Result<std::collections::HashMap<ConversationId, (i64, DateTime<Utc>)>, StoreError> {
        let owners: Vec<&str> = watched.iter().map(|(owner, _)| owner.as_str()).collect();
        let ids: Vec<&Uuid> = watched.iter().map(|(_, id)| id.as_uuid()).collect();
        let rows: Vec<VersionRow> = self
            .across_owners(async |conn| {
                Ok(diesel::sql_query(VERSIONS)
                    .bind::<diesel::sql_types::Array<Text>, _>(&owners)
                    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(&ids)
                    .load(conn)
                    .await?)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    ConversationId::from_uuid(row.id),
                    (row.message_count, row.update_time),
                )
            })
            .collect())
    }
}
