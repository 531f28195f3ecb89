//! CreateConversation: on PostgreSQL, one statement in autocommit.
//!
//! The statement makes (or locks) the user row, inserts the conversation
//! and, when a `request_id` was seen before, returns the conversation it
//! made then. As a transaction of three statements it was four round trips
//! (BEGIN, the user row, the insert, COMMIT); as one it is one.
//!
//! The user row is written first, as in the transaction, and for the same
//! reason: an erasure locks the user row before the user's conversations, so
//! a create that holds that row either finished before the erasure (which
//! then erases its conversation too) or waits for it (and makes the row
//! anew). The conversation's insert reads a count of the user row's CTE,
//! which runs that CTE to its end before the insert begins; left unread, a
//! data-modifying CTE runs after the main statement.
//!
//! A retry whose first call committed before this statement began finds
//! that conversation in the statement's snapshot. One that raced it (the
//! first call committed while this one waited on its key) does not: the
//! statement then returns nothing and [`Store::create_conversation`] reads
//! the row in a second statement, which sees it.
//!
//! On Citus, a statement writing two tables through CTEs is pulled to the
//! coordinator (scale-out rule 11), so there the create stays a transaction
//! of single-shard statements.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use diesel::{
    pg::Pg,
    prelude::*,
    query_builder::{AstPass, QueryFragment},
    result::QueryResult,
    sql_types::{Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    Store, StoreError,
    conversations::{
        CONVERSATION_COLUMNS, ConversationColumns, ConversationRow, LockUser, NewConversationRow,
    },
    pool::OneRow,
    schema::conversations,
    statement::{Template, fixed, prepared_statement, unknown_parameter},
    values::{metadata_to_json, now_micros},
};
use crate::domain::{Conversation, ConversationId, NewConversation, RequestId, UserId};

/// The user row made or locked (as [`LockUser`]), then the conversation
/// inserted, or else the one this `request_id` made before. The columns not
/// named take their defaults: no messages, no usage, not a fork.
static CREATE: LazyLock<Template> = LazyLock::new(|| {
    Template::parse(&format!(
        "\
WITH owner AS (
    INSERT INTO users (user_id) VALUES ($user)
    ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id WHERE false
    RETURNING user_id
), made AS (
    INSERT INTO conversations (user_id, id, title, metadata, create_time, update_time, request_id)
    SELECT $user, $id, $title, $metadata, $now, $now, $request_id
      FROM (SELECT count(*) FROM owner) AS after_owner
    ON CONFLICT (user_id, request_id) DO NOTHING
    RETURNING {CONVERSATION_COLUMNS}
)
SELECT {CONVERSATION_COLUMNS}
  FROM made
UNION ALL
SELECT {CONVERSATION_COLUMNS}
  FROM conversations
 WHERE user_id = $user AND request_id = $request_id AND NOT EXISTS (SELECT FROM made)"
    ))
});

/// The create statement, for the plan checks (see `store::hot_statements`).
pub(super) fn statement() -> &'static Template {
    &CREATE
}

struct Create<'a> {
    user: &'a str,
    id: Uuid,
    title: &'a str,
    metadata: serde_json::Value,
    now: DateTime<Utc>,
    request_id: Option<&'a str>,
}

prepared_statement!(Create, sql_type = ConversationColumns);

impl QueryFragment<Pg> for Create<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        CREATE.push(&mut out, |name, out| match name {
            "user" => out.push_bind_param::<Text, _>(self.user),
            "id" => out.push_bind_param::<SqlUuid, _>(&self.id),
            "title" => out.push_bind_param::<Text, _>(self.title),
            "metadata" => out.push_bind_param::<Jsonb, _>(&self.metadata),
            "now" => out.push_bind_param::<Timestamptz, _>(&self.now),
            "request_id" => out.push_bind_param::<Nullable<Text>, _>(&self.request_id),
            other => Err(unknown_parameter(other)),
        })
    }
}

impl Store {
    /// Creates a conversation, or returns the one this owner first created with
    /// the same `request_id`.
    pub async fn create_conversation(
        &self,
        owner: &UserId,
        new: &NewConversation,
    ) -> Result<Conversation, StoreError> {
        let create = Create {
            user: owner.as_str(),
            id: *ConversationId::generate().as_uuid(),
            title: new.title.as_str(),
            metadata: metadata_to_json(&new.metadata),
            now: now_micros(),
            request_id: new.request_id.as_ref().map(RequestId::as_str),
        };
        self.with_conn(async |conn| {
            let created = if self.distributed(conn).await? {
                self.create_in_steps(conn, create).await?
            } else {
                create.one_row(conn).await.optional()?
            };
            match created {
                Some(row) => Ok(row.into()),
                None => made_by_request(conn, owner, new.request_id.as_ref()).await,
            }
        })
        .await
    }

    /// The create as a transaction of single-shard statements (Citus): the
    /// new conversation, or `None` when the `request_id` made one before.
    async fn create_in_steps(
        &self,
        conn: &mut AsyncPgConnection,
        create: Create<'_>,
    ) -> Result<Option<ConversationRow>, StoreError> {
        conn.transaction(async |conn| {
            self.bound_lock_waits(conn).await?;
            fixed::<LockUser, _>(|q| q.bind::<Text, _>(create.user))
                .execute(conn)
                .await?;
            let row = NewConversationRow {
                user_id: create.user,
                id: create.id,
                title: create.title,
                metadata: create.metadata,
                create_time: create.now,
                update_time: create.now,
                message_count: 0,
                forked_from_conversation_id: None,
                forked_at_sequence: None,
                request_id: create.request_id,
                usage_input_tokens: 0,
                usage_output_tokens: 0,
                usage_cached_input_tokens: 0,
                usage_reasoning_tokens: 0,
            };
            Ok(diesel::insert_into(conversations::table)
                .values(&row)
                .on_conflict((conversations::user_id, conversations::request_id))
                .do_nothing()
                .returning(ConversationRow::as_returning())
                .one_row(conn)
                .await
                .optional()?)
        })
        .await
    }
}

/// The conversation an earlier create with this `request_id` made: the
/// insert met it on the key, so it exists. Without a `request_id` nothing
/// can have met the insert, and an empty answer means the database broke
/// its word.
async fn made_by_request(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    request_id: Option<&RequestId>,
) -> Result<Conversation, StoreError> {
    let Some(request_id) = request_id else {
        return Err(StoreError::Corrupt(
            "a conversation without a request_id was neither inserted nor refused".into(),
        ));
    };
    let row: ConversationRow = conversations::table
        .filter(conversations::user_id.eq(owner.as_str()))
        .filter(conversations::request_id.eq(request_id.as_str()))
        .select(ConversationRow::as_select())
        .one_row(conn)
        .await?;
    Ok(row.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::statement::pgbench_statement;

    /// pgbench's create ceiling must run the very statement convo runs.
    #[test]
    fn the_pgbench_script_is_this_statement() {
        let script = pgbench_statement(include_str!("../../benches/pgbench/create.sql"));
        let (ours, _) = statement().numbered();
        let ours = ours
            .replace(
                "$2",
                "(lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 16, '0') \
                 || lpad(to_hex(:n::bigint), 16, '0'))::uuid",
            )
            .replace("$3", "'A new chat'")
            .replace("$4", r#"'{"channel": "bench"}'::jsonb"#)
            .replace("$5", "now()")
            .replace("$6", "('pgbench-' || :n)")
            .replace("$1", ":user");
        assert_eq!(script, ours);
    }
}
