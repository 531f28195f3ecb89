//! Resume: the conversation and its latest messages from one snapshot, in
//! one statement.
//!
//! Sequences are gapless and messages are removed only from the end, so the
//! last N are exactly `sequence > message_count - N`: a primary-key range,
//! whatever the conversation's length, read in the same statement (hence
//! the same snapshot) as the count. When that window begins with tool
//! results whose calls lie before it, it starts instead at the earliest
//! message holding those calls (each tool message records it in
//! `answers_from`), so a tool exchange is never split. That search runs only
//! when the window's first message is a tool result (a `CASE` evaluates
//! its subquery only then), and it only moves the lower bound of the one
//! key-range scan: most windows cost one extra key probe. (A second scan for
//! the widened messages, joined by `UNION ALL`, cost PostgreSQL about a fifth
//! of the statement even when it read nothing: its plan nodes are set up on
//! every execution.) The byte bound below applies to the widened messages
//! too; they are the oldest, so they are the first it leaves out, as the
//! service's trim would.
//!
//! The window's bounds come from the conversation row as scalar subqueries,
//! not from a join with it: evaluated once, they are parameters of the index
//! scan, so the plan reads the key range whatever PostgreSQL knows of the
//! tables. Written as a join, the generic plan made on a table not yet
//! analyzed read the whole conversation and filtered it.
//!
//! The window is bounded in bytes too: walking back from the newest message,
//! it keeps every message that begins within `$budget` (the response limit),
//! so a window of 1,000 large messages is not read whole to be cut
//! afterwards. "Begins within" is "the newer messages add up to less than the
//! budget", `total_bytes - bytes_through < $budget`, from the running total
//! the append stores with each message: a filter on the key range, where
//! summing the sizes as the rows went by took a window function over every
//! resumed row (about a fifth of the statement's cost). A message without a
//! total (written by a replica of the previous release during a rolling
//! upgrade) is kept: reading more is safe. Whatever is left out lies before
//! the first message returned, so `has_more` says so; the service trims what
//! it got to the exact encoded size.

use std::sync::LazyLock;

use diesel::{
    Queryable,
    pg::Pg,
    query_builder::{AstPass, QueryFragment},
    result::QueryResult,
    sql_types::{BigInt, Nullable, Record, SmallInt, Text, Uuid as SqlUuid},
};
use futures_util::{Stream, TryStreamExt};
use uuid::Uuid;

use super::{
    Store, StoreError,
    conversations::{ConversationColumns, ConversationRecord, ConversationRow},
    messages::{ConversationMessageColumns, ConversationMessageRow},
    statement::{Template, prepared_statement, unknown_parameter},
};
use crate::domain::{Conversation, Message, ResumeConversation, Resumed, Role, UserId};

/// The conversation (`c`) and the window of its messages (`w`), in either
/// shape of the answer. The messages leave out `conversation_id`, the one
/// asked for.
const WINDOW: &str = "\
WITH c AS (
    SELECT user_id, id, title, metadata, create_time, update_time, message_count,
           forked_from_conversation_id, forked_at_sequence, usage_input_tokens,
           usage_output_tokens, usage_cached_input_tokens, usage_reasoning_tokens,
           total_bytes, greatest(message_count - $max_messages, 0) + 1 AS start
      FROM conversations WHERE user_id = $user AND id = $conversation
), w AS (
    SELECT m.id, m.sequence, m.role, m.content, m.metadata, m.create_time, m.parts, m.name,
           m.model, m.input_tokens, m.output_tokens, m.cached_input_tokens, m.reasoning_tokens
      FROM messages m
     WHERE m.user_id = $user AND m.conversation_id = $conversation
       AND m.sequence BETWEEN (
           SELECT least(c.start, (
                      SELECT CASE WHEN f.role = $tool THEN (
                                 SELECT min(t.answers_from) FROM messages t
                                  WHERE t.user_id = $user AND t.conversation_id = $conversation
                                    AND t.sequence >= f.sequence AND t.role = $tool
                                    AND t.sequence < coalesce(
                                        (SELECT min(o.sequence) FROM messages o
                                          WHERE o.user_id = $user AND o.conversation_id = $conversation
                                            AND o.sequence > f.sequence AND o.role <> $tool),
                                        c.message_count + 1))
                             END
                        FROM messages f
                       WHERE f.user_id = $user AND f.conversation_id = $conversation
                         AND f.sequence = c.start))
             FROM c)
           AND (SELECT message_count FROM c)
       AND (m.bytes_through > (SELECT total_bytes FROM c) - $budget OR m.bytes_through IS NULL)
)
";

/// The conversation's columns, read from `c`.
const CONVERSATION: &str = "\
c.user_id, c.id, c.title, c.metadata, c.create_time, c.update_time, c.message_count,
       c.forked_from_conversation_id, c.forked_at_sequence, c.usage_input_tokens,
       c.usage_output_tokens, c.usage_cached_input_tokens, c.usage_reasoning_tokens";

/// The conversation's columns as NULLs, in the message rows of
/// [`Answer::Spread`].
const NO_CONVERSATION: &str = "\
NULL::text, NULL::uuid, NULL::text, NULL::jsonb, NULL::timestamptz, NULL::timestamptz,
       NULL::int8, NULL::uuid, NULL::int8, NULL::int8, NULL::int8, NULL::int8, NULL::int8";

/// A message's columns, read from `w` (`x`).
const MESSAGE: &str = "\
x.id, x.sequence, x.role, x.content, x.metadata, x.create_time, x.parts, x.name,
       x.model, x.input_tokens, x.output_tokens, x.cached_input_tokens, x.reasoning_tokens";

/// A message's columns as NULLs, named, in the conversation's row.
const NO_MESSAGE: &str = "\
NULL::uuid AS id, NULL::int8 AS sequence, NULL::int2 AS role, NULL::text AS content,
       NULL::jsonb AS metadata, NULL::timestamptz AS create_time, NULL::bytea AS parts,
       NULL::text AS name, NULL::text AS model, NULL::int8 AS input_tokens,
       NULL::int8 AS output_tokens, NULL::int8 AS cached_input_tokens,
       NULL::int8 AS reasoning_tokens";

/// How the answer carries the conversation.
#[derive(Clone, Copy)]
enum Answer {
    /// On PostgreSQL: one row for the conversation, its columns as one record
    /// (the rest NULL), then one per message (the record NULL), in no
    /// particular order; read by position as [`AsRecordColumns`]. As a
    /// record, the conversation costs each message row one NULL column, not
    /// thirteen.
    AsRecord,
    /// On Citus: the conversation's columns spread out, NULL in the message
    /// rows ([`SpreadColumns`]). A coordinator cannot read an anonymous record
    /// back from the worker that ran the statement ("input of anonymous
    /// composite types is not implemented").
    Spread,
}

/// The whole statement: [`WINDOW`], then the answer in the given shape.
fn resume_sql(answer: Answer) -> String {
    let (conversation, no_conversation) = match answer {
        Answer::AsRecord => (format!("ROW({CONVERSATION}) AS conversation"), "NULL"),
        Answer::Spread => (CONVERSATION.to_owned(), NO_CONVERSATION),
    };
    format!(
        "{WINDOW}SELECT {conversation},
       {NO_MESSAGE}
  FROM c
UNION ALL
SELECT {no_conversation},
       {MESSAGE}
  FROM w AS x"
    )
}

struct ResumeStatement<'a> {
    user: &'a str,
    conversation: &'a Uuid,
    max_messages: i64,
    tool: i16,
    budget: i64,
}

/// The columns of [`Answer::AsRecord`], in order: the conversation as one record,
/// or a message's columns, the other part NULL.
type AsRecordColumns = (
    Nullable<Record<ConversationColumns>>,
    Nullable<ConversationMessageColumns>,
);

/// The columns of [`Answer::Spread`], in order: a conversation's or a message's, the
/// other part NULL.
type SpreadColumns = (
    Nullable<ConversationColumns>,
    Nullable<ConversationMessageColumns>,
);

/// The statement with the answer as [`Answer::AsRecord`] (PostgreSQL).
struct AsRecord<'a>(ResumeStatement<'a>);

/// The statement with the answer as [`Answer::Spread`] (Citus).
struct Spread<'a>(ResumeStatement<'a>);

prepared_statement!(AsRecord, sql_type = AsRecordColumns);
prepared_statement!(Spread, sql_type = SpreadColumns);

/// Both statements, parsed once, in the order of [`Answer`].
static PARSED: LazyLock<[Template; 2]> = LazyLock::new(|| {
    [
        Template::parse(&resume_sql(Answer::AsRecord)),
        Template::parse(&resume_sql(Answer::Spread)),
    ]
});

/// The statement resume runs on Citus (`citus`) or on PostgreSQL, for the
/// plan checks (see `store::hot_statements`).
pub(super) fn statement(citus: bool) -> &'static Template {
    template(if citus {
        Answer::Spread
    } else {
        Answer::AsRecord
    })
}

fn template(answer: Answer) -> &'static Template {
    &PARSED[answer as usize]
}

impl QueryFragment<Pg> for AsRecord<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.push(template(Answer::AsRecord), &mut out)
    }
}

impl QueryFragment<Pg> for Spread<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.push(template(Answer::Spread), &mut out)
    }
}

impl ResumeStatement<'_> {
    fn push<'b>(&'b self, template: &Template, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        template.push(out, |name, out| match name {
            "user" => out.push_bind_param::<Text, _>(self.user),
            "conversation" => out.push_bind_param::<SqlUuid, _>(self.conversation),
            "max_messages" => out.push_bind_param::<BigInt, _>(&self.max_messages),
            "tool" => out.push_bind_param::<SmallInt, _>(&self.tool),
            "budget" => out.push_bind_param::<BigInt, _>(&self.budget),
            other => Err(unknown_parameter(other)),
        })
    }
}

/// A row of either answer: the conversation or one of its messages.
#[derive(Queryable)]
struct ResumeRow {
    conversation: Option<ConversationRow>,
    message: Option<ConversationMessageRow>,
}

/// A row of [`Answer::AsRecord`].
#[derive(Queryable)]
struct AsRecordRow {
    conversation: Option<ConversationRecord>,
    message: Option<ConversationMessageRow>,
}

impl From<AsRecordRow> for ResumeRow {
    fn from(row: AsRecordRow) -> Self {
        Self {
            conversation: row.conversation.map(ConversationRow::from),
            message: row.message,
        }
    }
}

impl Store {
    /// The conversation and its last `max_messages` messages in ascending
    /// order (widened to keep a tool exchange whole), and whether older ones
    /// exist: one statement, one snapshot. Reads about `max_bytes` of
    /// messages at most, for the caller to trim exactly.
    pub async fn resume_conversation(
        &self,
        owner: &UserId,
        resume: ResumeConversation,
        max_bytes: usize,
    ) -> Result<Resumed, StoreError> {
        let conversation_id = *resume.conversation_id.as_uuid();
        let statement = ResumeStatement {
            user: owner.as_str(),
            conversation: &conversation_id,
            max_messages: i64::from(resume.max_messages.get()),
            tool: Role::Tool.number() as i16,
            budget: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        };
        let capacity = resume.max_messages.get() as usize;
        let (conversation, mut messages) = self
            .with_conn(async |conn| {
                if self.distributed(conn).await? {
                    let rows = diesel_async::RunQueryDsl::load_stream(Spread(statement), conn);
                    split::<ResumeRow>(rows.await?, conversation_id, capacity).await
                } else {
                    let rows = diesel_async::RunQueryDsl::load_stream(AsRecord(statement), conn);
                    split::<AsRecordRow>(rows.await?, conversation_id, capacity).await
                }
            })
            .await?;
        let conversation = Conversation::from(conversation.ok_or(StoreError::NotFound)?);
        messages.sort_unstable_by_key(|message| message.sequence);
        let has_more = messages
            .first()
            .map_or(conversation.message_count > 0, |first| first.sequence > 1);
        Ok(Resumed {
            conversation,
            messages,
            has_more,
        })
    }
}

/// The conversation and the messages among the rows, split as they arrive:
/// collected first, 51 rows of both shapes were copied at every doubling of
/// the vector.
async fn split<R: Into<ResumeRow>>(
    rows: impl Stream<Item = QueryResult<R>>,
    conversation_id: Uuid,
    capacity: usize,
) -> Result<(Option<ConversationRow>, Vec<Message>), StoreError> {
    let mut rows = std::pin::pin!(rows);
    let mut conversation = None;
    let mut messages = Vec::with_capacity(capacity);
    while let Some(row) = rows.try_next().await? {
        match row.into() {
            ResumeRow {
                conversation: Some(row),
                ..
            } => conversation = Some(row),
            ResumeRow {
                message: Some(row), ..
            } => messages.push(row.into_message(conversation_id)?),
            ResumeRow { .. } => {
                return Err(StoreError::Corrupt(
                    "a resume row holds neither a conversation nor a message".into(),
                ));
            }
        }
    }
    Ok((conversation, messages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::statement::pgbench_statement;

    /// pgbench's resume ceiling must run the very statement convo runs.
    #[test]
    fn the_pgbench_script_is_this_statement() {
        let script = pgbench_statement(include_str!("../../benches/pgbench/resume.sql"));
        let ours = resume_sql(Answer::AsRecord)
            .replace("$max_messages", "50")
            .replace("$tool", &(Role::Tool.number()).to_string())
            .replace("$budget", "4194304")
            .replace("$user", ":user")
            .replace("$conversation", ":conversation::uuid");
        assert_eq!(script, ours);
    }
}
