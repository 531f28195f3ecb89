//! ListConversations: a page of the owner's conversations, newest first, in
//! one prepared statement on the `(user_id, update_time, id)` index.
//!
//! Two statements of fixed text, the first page and a page after a cursor,
//! each its own type: cached by type, so a call neither walks a query tree
//! nor hashes its SQL to find the prepared statement (the boxed DSL query
//! did both, about 5 % of the server's time under ListConversations).

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use diesel::{
    pg::Pg,
    query_builder::{AstPass, QueryFragment},
    result::QueryResult,
    sql_types::{BigInt, Text, Timestamptz, Uuid as SqlUuid},
};
use futures_util::{Stream, TryStreamExt};
use uuid::Uuid;

use super::{
    Store, StoreError,
    conversations::{CONVERSATION_COLUMNS, ConversationColumns, ConversationRow},
    statement::{Template, prepared_statement, unknown_parameter},
};
use crate::domain::{Conversation, ConversationCursor, ListConversations, Page, UserId};

/// The statement of one page; `after_cursor` adds the cursor's bounds:
/// `update_time <= $before` bounds the index scan, the OR breaks ties by id.
/// One row more than the page is asked for, to know whether another follows.
fn list_sql(after_cursor: bool) -> String {
    let cursor = if after_cursor {
        " AND update_time <= $before\n   AND (update_time < $before OR id < $before_id)"
    } else {
        ""
    };
    format!(
        "\
SELECT {CONVERSATION_COLUMNS}
  FROM conversations
 WHERE user_id = $user{cursor}
 ORDER BY update_time DESC, id DESC
 LIMIT $limit"
    )
}

static FIRST_PAGE: LazyLock<Template> = LazyLock::new(|| Template::parse(&list_sql(false)));
static NEXT_PAGE: LazyLock<Template> = LazyLock::new(|| Template::parse(&list_sql(true)));

/// Both statements, named, for the plan checks (see `hot_statements`).
pub(super) fn shapes() -> Vec<(String, &'static Template)> {
    vec![
        ("list conversations (first page)".to_owned(), &FIRST_PAGE),
        ("list conversations (after a cursor)".to_owned(), &NEXT_PAGE),
    ]
}

struct FirstPage<'a> {
    user: &'a str,
    limit: i64,
}

struct NextPage<'a> {
    user: &'a str,
    limit: i64,
    before: DateTime<Utc>,
    before_id: &'a Uuid,
}

prepared_statement!(FirstPage, sql_type = ConversationColumns);
prepared_statement!(NextPage, sql_type = ConversationColumns);

impl QueryFragment<Pg> for FirstPage<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        FIRST_PAGE.push(&mut out, |name, out| match name {
            "user" => out.push_bind_param::<Text, _>(self.user),
            "limit" => out.push_bind_param::<BigInt, _>(&self.limit),
            other => Err(unknown_parameter(other)),
        })
    }
}

impl QueryFragment<Pg> for NextPage<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        NEXT_PAGE.push(&mut out, |name, out| match name {
            "user" => out.push_bind_param::<Text, _>(self.user),
            "limit" => out.push_bind_param::<BigInt, _>(&self.limit),
            "before" => out.push_bind_param::<Timestamptz, _>(&self.before),
            "before_id" => out.push_bind_param::<SqlUuid, _>(self.before_id),
            other => Err(unknown_parameter(other)),
        })
    }
}

impl Store {
    /// The owner's conversations, most recently updated first, after the
    /// cursor: keyset pagination on the index, so a page deep in the listing
    /// costs what the first page costs.
    pub async fn list_conversations(
        &self,
        owner: &UserId,
        list: ListConversations,
    ) -> Result<Page<Conversation, ConversationCursor>, StoreError> {
        let ListConversations { size, cursor } = list;
        let user = owner.as_str();
        let limit = size.limit_with_lookahead();
        self.with_conn(async |conn| {
            let items = match &cursor {
                None => {
                    let page = FirstPage { user, limit };
                    conversations_of(
                        diesel_async::RunQueryDsl::load_stream(page, conn).await?,
                        limit,
                    )
                    .await?
                }
                Some(cursor) => {
                    let page = NextPage {
                        user,
                        limit,
                        before: cursor.update_time,
                        before_id: cursor.id.as_uuid(),
                    };
                    conversations_of(
                        diesel_async::RunQueryDsl::load_stream(page, conn).await?,
                        limit,
                    )
                    .await?
                }
            };
            Ok(Page::cut(items, size, ConversationCursor::after))
        })
        .await
    }
}

/// The rows of a page, converted as they arrive into a vector of the
/// statement's limit: a page collected first was copied at every doubling,
/// then again.
async fn conversations_of(
    rows: impl Stream<Item = QueryResult<ConversationRow>>,
    limit: i64,
) -> Result<Vec<Conversation>, StoreError> {
    let mut rows = std::pin::pin!(rows);
    let mut items = Vec::with_capacity(usize::try_from(limit).unwrap_or_default());
    while let Some(row) = rows.try_next().await? {
        items.push(Conversation::from(row));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::statement::pgbench_statement;

    /// pgbench's list ceiling must run the very statement convo runs.
    #[test]
    fn the_pgbench_script_is_the_first_page_statement() {
        let script = pgbench_statement(include_str!("../../benches/pgbench/list.sql"));
        let ours = list_sql(false)
            .replace("$user", ":user")
            .replace("$limit", ":limit");
        assert_eq!(script, ours);
    }

    #[test]
    fn a_later_page_binds_the_cursor_time_once() {
        let (sql, binds) = NEXT_PAGE.numbered();
        assert_eq!(binds, 4);
        assert!(sql.contains("update_time <= $2") && sql.contains("update_time < $2"));
        assert!(sql.contains("id < $3") && sql.ends_with("LIMIT $4"));
    }
}
