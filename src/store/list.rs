//! ListMessages: a page of a conversation's messages, bounded in rows and in
//! bytes by the database, in one prepared statement.
//!
//! A page of 1,000 rows of 100 KB would be 100 MB read into the server only to
//! be cut to the response limit afterwards. The statement sums the rows'
//! sizes as it walks the primary key and stops one row after the budget is
//! reached: that row tells the service that the page was cut (it trims the
//! page to the exact encoded size and gives a next_page_token), so no more
//! than about one response's worth of messages is ever read.

use std::sync::LazyLock;

use diesel::{
    pg::Pg,
    query_builder::{AstPass, QueryFragment},
    result::QueryResult,
    sql_types::{BigInt, Nullable, Text, Uuid as SqlUuid},
};
use uuid::Uuid;

use super::{
    messages::ConversationMessageColumns,
    statement::{Template, prepared_statement, unknown_parameter},
    values::message_size,
};
use crate::domain::MessageOrder;

/// The page in either order. `$after` bounds it below (ListMessages'
/// after_sequence); the cursor continues a previous page. Both bounds are
/// parameters of the index scan (never a filter over rows already passed),
/// so a deep page costs what the first does.
///
/// `before_previous` is the size of the rows before the previous one: a row
/// is kept while the previous one began within the budget, which keeps every
/// row that begins within it and one more.
fn list_sql(order: MessageOrder) -> String {
    let (direction, bound) = match order {
        MessageOrder::OldestFirst => ("ASC", "m.sequence > greatest($after, coalesce($cursor, 0))"),
        MessageOrder::NewestFirst => (
            "DESC",
            "m.sequence > $after AND m.sequence < coalesce($cursor, 9223372036854775807)",
        ),
    };
    let size = message_size("m");
    format!(
        "\
SELECT id, sequence, role, content, metadata, create_time, parts, name, model, input_tokens,
       output_tokens, cached_input_tokens, reasoning_tokens
  FROM (
    SELECT m.id, m.sequence, m.role, m.content, m.metadata, m.create_time, m.parts, m.name,
           m.model, m.input_tokens, m.output_tokens, m.cached_input_tokens, m.reasoning_tokens,
           coalesce(sum({size})
                        OVER (ORDER BY m.sequence {direction}
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 2 PRECEDING), 0)
               AS before_previous
      FROM messages m
     WHERE m.user_id = $user AND m.conversation_id = $conversation AND {bound}
     ORDER BY m.sequence {direction}
     LIMIT $limit
  ) AS page
 WHERE before_previous < $budget
 ORDER BY sequence {direction}"
    )
}

/// The two orders of [`list_sql`], parsed once.
static LIST: LazyLock<[Template; 2]> = LazyLock::new(|| {
    [
        Template::parse(&list_sql(MessageOrder::OldestFirst)),
        Template::parse(&list_sql(MessageOrder::NewestFirst)),
    ]
});

/// The two shapes, named, for plan checks (see `store::hot_statements`).
pub(super) fn shapes() -> Vec<(String, &'static Template)> {
    vec![
        ("list (oldest first)".to_owned(), &LIST[0]),
        ("list (newest first)".to_owned(), &LIST[1]),
    ]
}

/// One execution of [`list_sql`], in either order: run as [`OldestFirst`]
/// or [`NewestFirst`].
pub(super) struct ListStatement<'a> {
    pub(super) user: &'a str,
    pub(super) conversation: &'a Uuid,
    pub(super) after: i64,
    pub(super) cursor: Option<i64>,
    pub(super) limit: i64,
    pub(super) budget: i64,
}

/// The page oldest first. Each order is a type of its own, so the prepared
/// statement is found by type: cached by its text, every call wrote the SQL
/// out and hashed it to look it up.
pub(super) struct OldestFirst<'a>(pub(super) ListStatement<'a>);

/// The page newest first (see [`OldestFirst`]).
pub(super) struct NewestFirst<'a>(pub(super) ListStatement<'a>);

prepared_statement!(OldestFirst, sql_type = ConversationMessageColumns);
prepared_statement!(NewestFirst, sql_type = ConversationMessageColumns);

impl QueryFragment<Pg> for OldestFirst<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.push(&LIST[0], &mut out)
    }
}

impl QueryFragment<Pg> for NewestFirst<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.push(&LIST[1], &mut out)
    }
}

impl ListStatement<'_> {
    fn push<'b>(&'b self, template: &Template, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        template.push(out, |name, out| match name {
            "user" => out.push_bind_param::<Text, _>(self.user),
            "conversation" => out.push_bind_param::<SqlUuid, _>(self.conversation),
            "after" => out.push_bind_param::<BigInt, _>(&self.after),
            "cursor" => out.push_bind_param::<Nullable<BigInt>, _>(&self.cursor),
            "limit" => out.push_bind_param::<BigInt, _>(&self.limit),
            "budget" => out.push_bind_param::<BigInt, _>(&self.budget),
            other => Err(unknown_parameter(other)),
        })
    }
}
