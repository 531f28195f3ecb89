//! The append: one statement, one round trip, in autocommit.
//!
//! [`append_sql`] does in one data-modifying statement what used to take a
//! transaction of six round trips: it bumps the conversation row (whose row
//! lock orders concurrent appenders, so sequences stay gapless), checks
//! `expected_last_sequence` against the row it locked, recognises a replayed
//! `request_id`, checks the batch's tool exchanges, inserts the messages,
//! their tool calls and the request record, and reports why it wrote nothing
//! when it did not. No NOTIFY rides along: live watchers are told after the
//! commit (see `changes.rs`). Before it takes a connection, an append takes
//! its conversation's turn in this replica (`turns.rs`, ADR 0014), so a
//! burst of appends to one conversation waits here, not in the pool.
//!
//! The statement's reads (earlier requests, known tool calls, the count it
//! reports on refusal) see the snapshot taken when it began, while the row
//! lock may hand it a newer conversation row. Where the two can disagree the
//! outcome is still one that a serial order allows, or the statement runs
//! again with a new snapshot:
//! - a concurrent call with the same `request_id`, or a concurrent first use
//!   of the same tool call id, committed while this one waited for the lock:
//!   the insert then breaks the table's primary key, nothing is written, and
//!   the retry sees the earlier call (a replay, or a taken id);
//! - `expected_last_sequence` is compared with the locked row, so it holds at
//!   commit; when it did not match but the snapshot's count does, the count
//!   moved while this call waited, and the retry reports the new count;
//! - a refusal decided from the snapshot (an unknown tool call, a taken id)
//!   is what the conversation looked like during the call: the call is
//!   ordered before whatever committed after it began, having written nothing.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    pg::Pg,
    prelude::*,
    query_builder::{AstPass, Query, QueryFragment},
    result::{DatabaseErrorKind, Error as DieselError},
    sql_types::{
        Array, BigInt, Integer, Jsonb, Nullable, SmallInt, Text, Timestamptz, Uuid as SqlUuid,
    },
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{
    Store, StoreError,
    messages::{MessageRow, messages_of},
    parts,
    pool::OneRow,
    schema::messages,
    statement::{Template, one_text, unknown_parameter},
    values::{message_size, metadata_to_json, now_micros, size_of},
};
use crate::domain::{
    AppendMessages, ConversationId, Message, MessageId, NewMessage, Parts, ToolCallId, Usage,
    UserId,
};

/// Whether an append should report the id of the message before its batch
/// ([`AppendOutcome::Appended`]'s `follows`). Only a watcher in this process
/// uses it, to take the batch without reading; looking it up costs
/// PostgreSQL an index probe per append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follows {
    Wanted,
    NotWanted,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    /// The messages were written now. `follows` is the id of the message just
    /// before them, when it was wanted ([`Follows`]) and the statement could
    /// see it (not when the batch is the conversation's first, nor when the
    /// previous append committed while this one waited for the lock).
    Appended {
        messages: Vec<Message>,
        follows: Option<MessageId>,
    },
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

/// Which parts of the statement an append needs. Each combination is a
/// statement text of its own (see [`append_sql`]), prepared once per
/// connection like any other statement, so an append pays only for the
/// checks its request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    /// A `request_id` was given: recognise a replay and record the request.
    request: bool,
    /// The batch holds tool calls or results: check the exchanges.
    tools: bool,
    /// Report the id of the message before the batch (`follows`), which only
    /// a watcher in this process uses.
    follows: bool,
    /// One message, passed as plain values rather than as arrays to unnest.
    single: bool,
}

impl Shape {
    const COUNT: usize = 16;

    fn index(self) -> usize {
        usize::from(self.request)
            | usize::from(self.tools) << 1
            | usize::from(self.follows) << 2
            | usize::from(self.single) << 3
    }

    fn from_index(index: usize) -> Self {
        Self {
            request: index & 1 != 0,
            tools: index & 2 != 0,
            follows: index & 4 != 0,
            single: index & 8 != 0,
        }
    }
}

/// Appends the batch, or says why not. Parameters are named (see
/// `statement.rs`). A batch of several messages arrives as parallel arrays,
/// numbered from 1 by `WITH ORDINALITY`; one message arrives as plain values,
/// numbered 1 (unnesting eleven arrays of one element each cost PostgreSQL
/// about a tenth of the append, pgbench in BENCHMARKS.md). Each tool call or
/// result names the message holding it by that number (`at`).
///
/// The parts that recognise a replayed `request_id`, that check tool
/// exchanges and that look up the message before the batch are left out of
/// an append that does not need them (see [`Shape`]): the lean statement is
/// about a third faster in PostgreSQL than the full one.
fn append_sql(shape: Shape) -> String {
    let Shape {
        request,
        tools,
        follows,
        single,
    } = shape;
    let pick = |on: bool, text: &str| if on { text.to_owned() } else { String::new() };
    let earlier = pick(
        request,
        "earlier AS (
    SELECT first_sequence, message_count FROM append_requests
     WHERE user_id = $user AND conversation_id = $conversation AND request_id = $request_id
), ",
    );
    let tool_checks = pick(
        tools,
        "batch_calls AS (
    SELECT id, at FROM unnest($call_ids::text[], $call_at::int4[]) AS c (id, at)
), results AS (
    SELECT id, at, n FROM unnest($answered_ids::text[], $answered_at::int4[])
        WITH ORDINALITY AS r (id, at, n)
), known AS (
    SELECT tool_call_id, sequence FROM tool_calls
     WHERE user_id = $user AND conversation_id = $conversation
       AND tool_call_id = ANY ($call_ids || $answered_ids)
), taken AS (
    SELECT c.id FROM batch_calls c JOIN known k ON k.tool_call_id = c.id ORDER BY c.at LIMIT 1
), answers AS (
    SELECT r.at, r.id, r.n, k.sequence AS stored_at,
           (SELECT min(c.at) FROM batch_calls c WHERE c.id = r.id AND c.at < r.at) AS batch_at
      FROM results r LEFT JOIN known k ON k.tool_call_id = r.id
), unanswered AS (
    SELECT id FROM answers WHERE stored_at IS NULL AND batch_at IS NULL ORDER BY n LIMIT 1
), ",
    );
    let request_guard = pick(request, "\n       AND NOT EXISTS (SELECT FROM earlier)");
    let tool_guard = pick(
        tools,
        "\n       AND NOT EXISTS (SELECT FROM taken)\n       AND NOT EXISTS (SELECT FROM unanswered)",
    );
    let answers_from = if tools {
        "(SELECT min(coalesce(a.stored_at, b.base + a.batch_at)) FROM answers a
             WHERE a.at = m.at)"
    } else {
        "NULL::int8"
    };
    let batch = if single {
        "(SELECT $one_id::uuid, $one_role::int2, $one_content::text, $one_metadata::jsonb,
                   $one_parts::bytea, $one_name::text, $one_model::text, $one_input::int8,
                   $one_output::int8, $one_cached::int8, $one_reasoning::int8, 1)"
    } else {
        "unnest($ids::uuid[], $roles::int2[], $contents::text[], $metadata::jsonb[],
                  $parts::bytea[], $names::text[], $models::text[], $inputs::int8[],
                  $outputs::int8[], $cached::int8[], $reasoning::int8[])
             WITH ORDINALITY"
    };
    // The batch's size, as resume's byte bound counts it (see the migration
    // `running_byte_total`): the conversation's total grows by it and each
    // message stores the total through itself.
    let (batch_bytes, bytes_through) = if single {
        (
            size_of("$one_content::text", "$one_parts::bytea"),
            "b.total_bytes".to_owned(),
        )
    } else {
        (
            format!(
                "(SELECT coalesce(sum({}), 0)
                 FROM unnest($contents::text[], $parts::bytea[]) AS x (content, parts))",
                message_size("x")
            ),
            format!(
                "b.total_bytes
             - coalesce(sum({})
                            OVER (ORDER BY m.at ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING),
                        0)",
                message_size("m")
            ),
        )
    };
    let calls = pick(
        tools,
        ", calls AS (
    INSERT INTO tool_calls (user_id, conversation_id, tool_call_id, sequence)
    SELECT $user, $conversation, c.id, b.base + c.at FROM bumped b, batch_calls c
)",
    );
    let recorded = pick(
        request,
        ", recorded AS (
    INSERT INTO append_requests (user_id, conversation_id, request_id, first_sequence,
                                 message_count, create_time)
    SELECT $user, $conversation, $request_id, b.base + 1, $count, b.update_time
      FROM bumped b
)",
    );
    let previous = if follows {
        "(SELECT p.id FROM messages p
         WHERE p.user_id = $user AND p.conversation_id = $conversation
           AND p.sequence = b.base)"
    } else {
        "NULL::uuid"
    };
    let replay = if request {
        "e.first_sequence AS replay_first, e.message_count AS replay_count"
    } else {
        "NULL::int8 AS replay_first, NULL::int4 AS replay_count"
    };
    let refusals = if tools {
        "(SELECT id FROM taken) AS taken, (SELECT id FROM unanswered) AS unanswered"
    } else {
        "NULL::text AS taken, NULL::text AS unanswered"
    };
    let earlier_join = pick(request, "\n  LEFT JOIN earlier e ON true");
    format!(
        "WITH {earlier}{tool_checks}bumped AS (
    UPDATE conversations
       SET message_count = message_count + $count,
           update_time = greatest($now, update_time),
           usage_input_tokens = usage_input_tokens + $input_tokens,
           usage_output_tokens = usage_output_tokens + $output_tokens,
           usage_cached_input_tokens = usage_cached_input_tokens + $cached_input_tokens,
           usage_reasoning_tokens = usage_reasoning_tokens + $reasoning_tokens,
           total_bytes = total_bytes + {batch_bytes}
     WHERE user_id = $user AND id = $conversation
       AND ($expected::int8 IS NULL OR message_count = $expected){request_guard}{tool_guard}
    RETURNING message_count - $count AS base, update_time, total_bytes
), inserted AS (
    INSERT INTO messages (user_id, conversation_id, sequence, id, role, content, metadata,
                          create_time, parts, name, model, input_tokens, output_tokens,
                          cached_input_tokens, reasoning_tokens, answers_from, bytes_through)
    SELECT $user, $conversation, b.base + m.at, m.id, m.role, m.content, m.metadata,
           b.update_time, m.parts, coalesce(m.name, ''), coalesce(m.model, ''),
           m.input_tokens, m.output_tokens, m.cached_input_tokens, m.reasoning_tokens,
           {answers_from}, {bytes_through}
      FROM bumped b,
           {batch}
             AS m (id, role, content, metadata, parts, name, model, input_tokens,
                   output_tokens, cached_input_tokens, reasoning_tokens, at)
    RETURNING 1
){calls}{recorded}
SELECT b.base, b.update_time AS create_time,
       (SELECT count(*) FROM inserted) AS written,
       {previous} AS follows,
       {replay},
       {refusals},
       s.message_count AS snapshot_count
  FROM (SELECT) AS one
  LEFT JOIN bumped b ON true{earlier_join}
  LEFT JOIN conversations s ON s.user_id = $user AND s.id = $conversation"
    )
}

/// Every [`Shape`] of [`append_sql`], parsed once, by [`Shape::index`].
static APPEND: LazyLock<Vec<Template>> = LazyLock::new(|| {
    (0..Shape::COUNT)
        .map(|index| Template::parse(&append_sql(Shape::from_index(index))))
        .collect()
});

/// The append on a Citus cluster: a call of `sql/citus_append.sql`'s
/// function, which Citus runs on the worker holding the user's shard.
static BY_FUNCTION: LazyLock<Template> = LazyLock::new(|| {
    Template::parse(
        "SELECT convo_append_v1($lock_timeout, $user, $conversation, $request_id, $expected, $count, $now, \
         $input_tokens, $output_tokens, $cached_input_tokens, $reasoning_tokens, $ids, $roles, \
         $contents, $metadata, $parts, $names, $models, $inputs, $outputs, $cached, $reasoning, \
         $call_ids, $call_at, $answered_ids, $answered_at) AS report",
    )
});

/// The function behind [`BY_FUNCTION`], created by `convo distribute`.
pub(super) const APPEND_FUNCTION: &str = include_str!("sql/citus_append.sql");

/// The append as `convo distribute` leaves it on Citus, named, for the plan
/// checks (see `store::hot_statements`).
pub(super) fn by_function() -> (String, &'static Template) {
    ("append (Citus function)".to_owned(), &BY_FUNCTION)
}

/// Every shape, named, for plan checks (see `store::hot_statements`).
pub(super) fn shapes() -> Vec<(String, &'static Template)> {
    APPEND
        .iter()
        .enumerate()
        .map(|(index, template)| {
            let Shape {
                request,
                tools,
                follows,
                single,
            } = Shape::from_index(index);
            let name = format!(
                "append (request_id: {request}, tools: {tools}, follows: {follows}, single: {single})"
            );
            (name, template)
        })
        .collect()
}

/// One execution of [`append_sql`]: the batch as columns.
struct AppendStatement<'a> {
    /// Call the Citus function instead of running the statement.
    by_function: bool,
    /// Look up the message before the batch (the function always does).
    follows: bool,
    /// The store's lock_timeout (`"300ms"`), for the function to apply where
    /// it runs.
    lock_timeout: String,
    user: &'a str,
    conversation: &'a Uuid,
    request_id: Option<&'a str>,
    expected: Option<i64>,
    count: i64,
    now: DateTime<Utc>,
    usage: Usage,
    ids: Vec<Uuid>,
    roles: Vec<i16>,
    contents: Vec<&'a str>,
    metadata: Vec<serde_json::Value>,
    parts: Vec<Option<Vec<u8>>>,
    names: Vec<Option<&'a str>>,
    models: Vec<Option<&'a str>>,
    inputs: Vec<Option<i64>>,
    outputs: Vec<Option<i64>>,
    cached: Vec<Option<i64>>,
    reasoning: Vec<Option<i64>>,
    call_ids: Vec<&'a str>,
    call_at: Vec<i32>,
    answered_ids: Vec<&'a str>,
    answered_at: Vec<i32>,
}

impl AppendStatement<'_> {
    /// The statement this batch runs, as an index: [`Shape::index`] into
    /// [`APPEND`], or [`Shape::COUNT`] for the Citus function.
    fn statement_index(&self) -> usize {
        if self.by_function {
            return Shape::COUNT;
        }
        Shape {
            request: self.request_id.is_some(),
            tools: !(self.call_ids.is_empty() && self.answered_ids.is_empty()),
            follows: self.follows,
            single: self.count == 1,
        }
        .index()
    }

    fn push<'b>(&'b self, template: &Template, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        template.push(out, |name, out| match name {
            "lock_timeout" => out.push_bind_param::<Text, _>(&self.lock_timeout),
            "user" => out.push_bind_param::<Text, _>(self.user),
            "conversation" => out.push_bind_param::<SqlUuid, _>(self.conversation),
            "request_id" => out.push_bind_param::<Nullable<Text>, _>(&self.request_id),
            "expected" => out.push_bind_param::<Nullable<BigInt>, _>(&self.expected),
            "count" => out.push_bind_param::<BigInt, _>(&self.count),
            "now" => out.push_bind_param::<Timestamptz, _>(&self.now),
            "input_tokens" => out.push_bind_param::<BigInt, _>(&self.usage.input_tokens),
            "output_tokens" => out.push_bind_param::<BigInt, _>(&self.usage.output_tokens),
            "cached_input_tokens" => {
                out.push_bind_param::<BigInt, _>(&self.usage.cached_input_tokens)
            }
            "reasoning_tokens" => out.push_bind_param::<BigInt, _>(&self.usage.reasoning_tokens),
            "ids" => out.push_bind_param::<Array<SqlUuid>, _>(&self.ids),
            "roles" => out.push_bind_param::<Array<SmallInt>, _>(&self.roles),
            "contents" => out.push_bind_param::<Array<Text>, _>(&self.contents),
            "metadata" => out.push_bind_param::<Array<Jsonb>, _>(&self.metadata),
            "parts" => {
                out.push_bind_param::<Array<Nullable<diesel::sql_types::Bytea>>, _>(&self.parts)
            }
            "names" => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.names),
            "models" => out.push_bind_param::<Array<Nullable<Text>>, _>(&self.models),
            "inputs" => out.push_bind_param::<Array<Nullable<BigInt>>, _>(&self.inputs),
            "outputs" => out.push_bind_param::<Array<Nullable<BigInt>>, _>(&self.outputs),
            "cached" => out.push_bind_param::<Array<Nullable<BigInt>>, _>(&self.cached),
            "reasoning" => out.push_bind_param::<Array<Nullable<BigInt>>, _>(&self.reasoning),
            "one_id" => out.push_bind_param::<SqlUuid, _>(only(&self.ids)?),
            "one_role" => out.push_bind_param::<SmallInt, _>(only(&self.roles)?),
            "one_content" => out.push_bind_param::<Text, _>(*only(&self.contents)?),
            "one_metadata" => out.push_bind_param::<Jsonb, _>(only(&self.metadata)?),
            "one_parts" => {
                out.push_bind_param::<Nullable<diesel::sql_types::Bytea>, _>(only(&self.parts)?)
            }
            "one_name" => out.push_bind_param::<Nullable<Text>, _>(only(&self.names)?),
            "one_model" => out.push_bind_param::<Nullable<Text>, _>(only(&self.models)?),
            "one_input" => out.push_bind_param::<Nullable<BigInt>, _>(only(&self.inputs)?),
            "one_output" => out.push_bind_param::<Nullable<BigInt>, _>(only(&self.outputs)?),
            "one_cached" => out.push_bind_param::<Nullable<BigInt>, _>(only(&self.cached)?),
            "one_reasoning" => out.push_bind_param::<Nullable<BigInt>, _>(only(&self.reasoning)?),
            "call_ids" => out.push_bind_param::<Array<Text>, _>(&self.call_ids),
            "call_at" => out.push_bind_param::<Array<Integer>, _>(&self.call_at),
            "answered_ids" => out.push_bind_param::<Array<Text>, _>(&self.answered_ids),
            "answered_at" => out.push_bind_param::<Array<Integer>, _>(&self.answered_at),
            other => Err(unknown_parameter(other)),
        })
    }

    /// Runs the statement as the type of its shape (see [`AppendShape`])
    /// and returns its report once it has committed (see `OneRow`).
    async fn run(&self, conn: &mut AsyncPgConnection) -> QueryResult<AppendReport> {
        macro_rules! by_shape {
            ($($index:literal)*) => {
                match self.statement_index() {
                    $($index => one_text::<AppendShape<$index>, _>(self)
                        .one_row::<AppendReport>(conn)
                        .await,)*
                    Shape::COUNT => one_text::<AppendShape<{ Shape::COUNT }>, _>(self)
                        .one_row::<FunctionReport>(conn)
                        .await
                        .map(AppendReport::from),
                    other => Err(DieselError::QueryBuilderError(
                        format!("no append statement {other}").into(),
                    )),
                }
            };
        }
        by_shape!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    }
}

/// The type standing for statement `S` (see
/// [`AppendStatement::statement_index`]) in diesel's statement cache, through
/// [`one_text`]: a statement without a fixed type is found by its text, which
/// diesel hashes (SipHash over several KB) and compares at every call, 9 % of
/// an append's server instructions (BENCHMARKS.md). `run` only ever gives
/// statement `S` this type, so each type writes one text.
struct AppendShape<const S: usize>;

impl Query for AppendStatement<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl QueryFragment<Pg> for AppendStatement<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let template = APPEND.get(self.statement_index()).unwrap_or(&BY_FUNCTION);
        self.push(template, &mut out)
    }
}

/// What [`append_sql`] reports: where the batch went, or what stopped it.
#[derive(QueryableByName)]
struct AppendReport {
    #[diesel(sql_type = Nullable<BigInt>)]
    base: Option<i64>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    create_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    written: i64,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    follows: Option<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    replay_first: Option<i64>,
    #[diesel(sql_type = Nullable<Integer>)]
    replay_count: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    taken: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    unanswered: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    snapshot_count: Option<i64>,
}

/// The Citus function's record: an [`AppendReport`] as one value.
#[derive(QueryableByName)]
struct FunctionReport {
    #[diesel(sql_type = diesel::sql_types::Record<(
        Nullable<BigInt>,
        Nullable<Timestamptz>,
        BigInt,
        Nullable<SqlUuid>,
        Nullable<BigInt>,
        Nullable<Integer>,
        Nullable<Text>,
        Nullable<Text>,
        Nullable<BigInt>,
    )>)]
    #[allow(clippy::type_complexity)]
    report: (
        Option<i64>,
        Option<DateTime<Utc>>,
        i64,
        Option<Uuid>,
        Option<i64>,
        Option<i32>,
        Option<String>,
        Option<String>,
        Option<i64>,
    ),
}

impl From<FunctionReport> for AppendReport {
    fn from(FunctionReport { report }: FunctionReport) -> Self {
        let (
            base,
            create_time,
            written,
            follows,
            replay_first,
            replay_count,
            taken,
            unanswered,
            snapshot_count,
        ) = report;
        Self {
            base,
            create_time,
            written,
            follows,
            replay_first,
            replay_count,
            taken,
            unanswered,
            snapshot_count,
        }
    }
}

/// How many times an append runs when races with concurrent writers send it
/// back (see the module's comment); each retry sees what the previous one
/// waited for, so more than one is already rare.
const APPEND_ATTEMPTS: usize = 4;

/// What one run of the statement decided.
enum Attempt {
    Done(AppendOutcome),
    /// The snapshot and the locked row disagreed; run again.
    Again,
}

impl<'a> AppendStatement<'a> {
    fn new(
        owner: &'a UserId,
        append: &'a AppendMessages,
        messages: &'a [Message],
        by_function: bool,
        follows: Follows,
        lock_timeout: std::time::Duration,
    ) -> Self {
        let batch = &append.messages;
        let usage = batch
            .iter()
            .filter_map(|m| m.usage)
            .reduce(|sum, u| sum.plus(&u))
            .unwrap_or_default();
        let mut call_ids = Vec::new();
        let mut call_at = Vec::new();
        let mut answered_ids = Vec::new();
        let mut answered_at = Vec::new();
        for (message, at) in batch.iter().zip(1..) {
            let Some(parts) = message.parts() else {
                continue;
            };
            for call in parts.tool_calls() {
                call_ids.push(call.id.as_str());
                call_at.push(at);
            }
            for answered in parts.answered_calls() {
                answered_ids.push(answered.as_str());
                answered_at.push(at);
            }
        }
        let tokens = |of: fn(&Usage) -> i64| -> Vec<Option<i64>> {
            batch.iter().map(|m| m.usage.as_ref().map(of)).collect()
        };
        Self {
            by_function,
            follows: follows == Follows::Wanted,
            lock_timeout: format!("{}ms", lock_timeout.as_millis()),
            user: owner.as_str(),
            conversation: append.conversation_id.as_uuid(),
            request_id: append.request_id.as_ref().map(|r| r.as_str()),
            expected: append.expected_last_sequence.map(|s| s.get()),
            count: batch.len() as i64,
            now: now_micros(),
            usage,
            ids: messages.iter().map(|m| *m.id.as_uuid()).collect(),
            roles: batch.iter().map(|m| m.role.number() as i16).collect(),
            contents: messages.iter().map(|m| m.content.as_str()).collect(),
            metadata: batch
                .iter()
                .map(|m| metadata_to_json(&m.metadata))
                .collect(),
            parts: batch.iter().map(|m| m.parts().map(parts::encode)).collect(),
            names: batch.iter().map(|m| non_empty(m.name.as_str())).collect(),
            models: batch.iter().map(|m| non_empty(m.model.as_str())).collect(),
            inputs: tokens(|u| u.input_tokens),
            outputs: tokens(|u| u.output_tokens),
            cached: tokens(|u| u.cached_input_tokens),
            reasoning: tokens(|u| u.reasoning_tokens),
            call_ids,
            call_at,
            answered_ids,
            answered_at,
        }
    }
}

/// The value of a batch's one message, for the shape that binds a single
/// message's values one by one.
fn only<T>(values: &[T]) -> QueryResult<&T> {
    match values {
        [one] => Ok(one),
        _ => Err(DieselError::QueryBuilderError(
            format!("{} values for the single-message append", values.len()).into(),
        )),
    }
}

fn non_empty(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

/// The messages a batch becomes, before the database numbers them: ids are
/// made here, so nothing needs to come back but where they start.
fn unnumbered(append: &AppendMessages) -> Vec<Message> {
    append
        .messages
        .iter()
        .map(|message: &NewMessage| Message {
            id: MessageId::generate(),
            conversation_id: append.conversation_id,
            sequence: 0,
            role: message.role,
            content: message.text().into_owned(),
            metadata: message.metadata.clone(),
            create_time: DateTime::<Utc>::MIN_UTC,
            parts: message
                .parts()
                .map(|parts| Parts::as_slice(parts).to_vec())
                .unwrap_or_default(),
            name: message.name.clone(),
            model: message.model.clone(),
            usage: message.usage,
        })
        .collect()
}

/// A primary key that a concurrent writer claimed first: the request record
/// (a concurrent replay) or a tool call id (a concurrent first use).
fn lost_a_race(error: &DieselError) -> bool {
    matches!(
        error,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)
            if matches!(
                super::error::violated_constraint(info.as_ref()).as_deref(),
                Some("append_requests_pkey" | "tool_calls_pkey")
            )
    )
}

impl Store {
    /// Appends the batch at the end of the conversation, all or nothing, in
    /// one statement (see the module's comment for how it stays correct
    /// under concurrency).
    pub async fn append_messages(
        &self,
        owner: &UserId,
        append: &AppendMessages,
        follows: Follows,
    ) -> Result<AppendOutcome, StoreError> {
        let mut messages = unnumbered(append);
        let _turn = self
            .append_turns
            .take(owner, append.conversation_id, self.lock_timeout)
            .await?;
        self.with_conn(async |conn| {
            let by_function = self.distributed(conn).await?;
            for _ in 0..APPEND_ATTEMPTS {
                let statement = AppendStatement::new(
                    owner,
                    append,
                    &messages,
                    by_function,
                    follows,
                    self.lock_timeout,
                );
                let report = match statement.run(conn).await {
                    Ok(report) => report,
                    Err(error) if lost_a_race(&error) => continue,
                    Err(error) => return Err(error.into()),
                };
                match decide(conn, owner, append, report, &mut messages).await? {
                    Attempt::Done(outcome) => return Ok(outcome),
                    Attempt::Again => continue,
                }
            }
            Err(StoreError::Conflict(format!(
                "the append to {} kept racing other writers",
                append.conversation_id
            )))
        })
        .await
    }
}

/// Turns the statement's report into the append's outcome, in the order of
/// precedence the contract gives: a replay wins over a stale
/// `expected_last_sequence`, which wins over tool-exchange refusals.
async fn decide(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    append: &AppendMessages,
    report: AppendReport,
    messages: &mut Vec<Message>,
) -> Result<Attempt, StoreError> {
    let conversation_id = append.conversation_id;
    if let (Some(base), Some(create_time)) = (report.base, report.create_time) {
        if report.written != messages.len() as i64 {
            return Err(StoreError::Corrupt(format!(
                "an append of {} messages to {conversation_id} wrote {}",
                messages.len(),
                report.written
            )));
        }
        for (message, sequence) in messages.iter_mut().zip(base + 1..) {
            message.sequence = sequence;
            message.create_time = create_time;
        }
        return Ok(Attempt::Done(AppendOutcome::Appended {
            messages: std::mem::take(messages),
            follows: report.follows.map(MessageId::from_uuid),
        }));
    }
    if let (Some(first), Some(count)) = (report.replay_first, report.replay_count) {
        let stored = replayed(conn, owner, conversation_id, first, count).await?;
        // A truncation removed them (and forgot the request) meanwhile: the
        // call is new again.
        if stored.len() != count as usize {
            return Ok(Attempt::Again);
        }
        return Ok(Attempt::Done(AppendOutcome::Replayed(stored)));
    }
    let Some(current) = report.snapshot_count else {
        return Err(StoreError::NotFound);
    };
    if let Some(expected) = append.expected_last_sequence
        && expected.get() != current
    {
        return Ok(Attempt::Done(AppendOutcome::Stale { current }));
    }
    if let Some(taken) = report.taken {
        return Ok(Attempt::Done(AppendOutcome::ToolCallIdTaken(
            ToolCallId::from_stored(taken),
        )));
    }
    if let Some(unanswered) = report.unanswered {
        return Ok(Attempt::Done(AppendOutcome::UnansweredToolResult(
            ToolCallId::from_stored(unanswered),
        )));
    }
    if append.expected_last_sequence.is_none() {
        // The row was there in the snapshot but not when locked: deleted
        // while this call waited.
        return Err(StoreError::NotFound);
    }
    // The snapshot's count matched but the locked row's did not: it moved
    // while this call waited. Run again to report the count it moved to.
    Ok(Attempt::Again)
}

/// The messages an earlier call with the same request_id wrote.
async fn replayed(
    conn: &mut AsyncPgConnection,
    owner: &UserId,
    conversation_id: ConversationId,
    first: i64,
    count: i32,
) -> Result<Vec<Message>, StoreError> {
    let rows: Vec<MessageRow> = messages::table
        .filter(messages::user_id.eq(owner.as_str()))
        .filter(messages::conversation_id.eq(conversation_id.as_uuid()))
        .filter(messages::sequence.between(first, first + i64::from(count) - 1))
        .order(messages::sequence.asc())
        .select(MessageRow::as_select())
        .load(conn)
        .await?;
    messages_of(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::statement::pgbench_statement;

    #[test]
    fn every_shape_has_its_own_statement() {
        let texts: std::collections::HashSet<String> = (0..Shape::COUNT)
            .map(|index| {
                let shape = Shape::from_index(index);
                assert_eq!(shape.index(), index);
                append_sql(shape)
            })
            .collect();
        assert_eq!(texts.len(), Shape::COUNT);
        let lean = append_sql(Shape::from_index(0));
        assert!(!lean.contains("FROM messages") && !lean.contains("$one_id"));
        let text = append_sql(Shape {
            follows: true,
            ..SINGLE
        });
        assert!(text.contains("FROM messages p") && text.contains("$one_id"));
        assert!(!text.contains("unnest($ids"));
    }

    /// Each statement index is a type of its own that writes its own
    /// statement: the shapes of [`APPEND`], then the Citus function.
    #[test]
    fn each_statement_index_is_a_type_writing_its_statement() {
        use diesel::query_builder::QueryId;
        let conversation = Uuid::nil();
        let statement = |by_function: bool, request_id: Option<&'static str>| AppendStatement {
            by_function,
            follows: false,
            lock_timeout: "300ms".to_owned(),
            user: "alice",
            conversation: &conversation,
            request_id,
            expected: None,
            count: 1,
            now: Utc::now(),
            usage: Usage::default(),
            ids: vec![Uuid::nil()],
            roles: vec![1],
            contents: vec!["hi"],
            metadata: vec![serde_json::json!({})],
            parts: vec![None],
            names: vec![None],
            models: vec![None],
            inputs: vec![None],
            outputs: vec![None],
            cached: vec![None],
            reasoning: vec![None],
            call_ids: Vec::new(),
            call_at: Vec::new(),
            answered_ids: Vec::new(),
            answered_at: Vec::new(),
        };
        let (plain, replayable, citus) = (
            statement(false, None),
            statement(false, Some("r1")),
            statement(true, None),
        );
        assert_eq!(plain.statement_index(), SINGLE.index());
        let with_request = Shape {
            request: true,
            ..SINGLE
        };
        assert_eq!(replayable.statement_index(), with_request.index());
        assert_eq!(citus.statement_index(), Shape::COUNT);

        let sql = |text: String| {
            text.split(" -- binds")
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        const S: usize = 8; // SINGLE's index
        const R: usize = 9; // with a request_id
        assert_eq!((SINGLE.index(), with_request.index()), (S, R));
        let (single, request, function) = (
            one_text::<AppendShape<S>, _>(&plain),
            one_text::<AppendShape<R>, _>(&replayable),
            one_text::<AppendShape<{ Shape::COUNT }>, _>(&citus),
        );
        fn id_of<T: QueryId>(_: &T) -> Option<std::any::TypeId> {
            T::query_id()
        }
        let ids = [id_of(&single), id_of(&request), id_of(&function)];
        let single = sql(diesel::debug_query::<Pg, _>(&single).to_string());
        let request = sql(diesel::debug_query::<Pg, _>(&request).to_string());
        let function = sql(diesel::debug_query::<Pg, _>(&function).to_string());
        assert!(single.contains("INSERT INTO messages") && !single.contains("append_requests"));
        assert!(request.contains("append_requests"));
        assert!(
            function.starts_with("SELECT convo_append_v1("),
            "{function}"
        );
        assert!(
            ids.iter().all(Option::is_some),
            "every shape is cached by type"
        );
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    }

    /// One message with no request_id, no tools and no watcher.
    const SINGLE: Shape = Shape {
        request: false,
        tools: false,
        follows: false,
        single: true,
    };

    /// A shape of the single-message append as pgbench's scripts write it:
    /// each client appends to its own conversation of user 'pgbench'.
    fn as_pgbench_script(shape: Shape) -> String {
        let conversation = "('00000000-0000-0000-0000-' || lpad(:client_id::text, 12, '0'))::uuid";
        let content = "'The quick brown fox jumps over the lazy dog, again and again, while \
                       the orchestrator keeps the whole conversation in PostgreSQL for the next turn.'";
        let mut ours = append_sql(shape)
            .replace("$user", "'pgbench'")
            .replace("$conversation", conversation)
            .replace("$count", "1")
            .replace("$now", "now()")
            .replace("$expected", "NULL")
            .replace("$request_id", "('request-' || :request)")
            .replace("$one_id", "gen_random_uuid()")
            .replace("$one_role", "1")
            .replace("$one_content", content)
            .replace("$one_metadata", "'{}'");
        for zero in [
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "reasoning_tokens",
        ] {
            ours = ours.replace(&format!("${zero}"), "0");
        }
        for null in [
            "parts",
            "name",
            "model",
            "input",
            "output",
            "cached",
            "reasoning",
        ] {
            ours = ours.replace(&format!("$one_{null}"), "NULL");
        }
        ours
    }

    /// pgbench's script of convo's own append must be the statement convo
    /// runs for one message with no request_id, no tools and no watcher.
    #[test]
    fn the_pgbench_script_is_the_lean_statement() {
        let script = pgbench_statement(include_str!("../../benches/pgbench/append-convo.sql"));
        assert_eq!(script, as_pgbench_script(SINGLE));
    }

    /// And the one with a request_id, as every append of a turn carries.
    #[test]
    fn the_pgbench_request_script_is_the_request_statement() {
        let script = pgbench_statement(include_str!("../../benches/pgbench/append-request.sql"));
        let request = Shape {
            request: true,
            ..SINGLE
        };
        assert_eq!(script, as_pgbench_script(request));
    }
}
