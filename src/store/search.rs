use std::{sync::LazyLock, time::Duration};

use diesel::{
    QueryableByName,
    sql_types::{BigInt, Bool, Float4, Nullable, Text, Uuid as SqlUuid},
};
use diesel_async::{AsyncConnection, RunQueryDsl};

use super::{
    Store, StoreError, error::is_statement_timeout, messages::MessageRow, pool::OneRow,
    values::message_size,
};
use crate::domain::{Message, Page, SearchCursor, SearchHit, SearchMessages, UserId};

/// Full-text search over one user's messages.
///
/// The GIN index `messages_search (user_id, search_document)` answers
/// `user_id = $1 AND search_document @@ query` on its own, so only the caller's
/// matching entries are read. The query is written out where it is used rather
/// than in a CTE: a constant expression is folded at planning, which is what
/// lets it become an index condition. Matches are ranked in the database; the page is
/// cut by keyset on (rank, conversation_id, sequence), and snippets are made
/// only for the rows of the page. `websearch_to_tsquery` accepts any text.
///
/// The page is bounded in bytes as well: in rank order, every hit that
/// begins within $8 (the response limit) and one more are kept, which tells
/// the service to trim, so snippets and rows are made for about one
/// response's worth of hits (see `list.rs`).
///
/// Snippets keep short words at their edges (`ShortWord=0`): with
/// PostgreSQL's default, words of three letters or fewer are dropped there,
/// and a chat message "It is sunny in Nice, so we go out." came back as
/// "<mark>sunny</mark> in Nice".
///
/// Parameters: $1 user_id, $2 query text, $3 conversation filter or NULL,
/// $4-$6 the cursor (rank, conversation_id, sequence) or NULLs, $7 the limit,
/// $8 the byte budget.
pub static SEARCH_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "\
SELECT page.id, page.conversation_id, page.sequence, page.role, page.content, page.metadata, \
       page.create_time, page.parts, page.name, page.model, page.input_tokens, \
       page.output_tokens, page.cached_input_tokens, page.reasoning_tokens, \
       page.rank, c.title AS conversation_title, \
       ts_headline('simple', left(page.content, 65536), websearch_to_tsquery('simple', $2), \
                   'StartSel=<mark>, StopSel=</mark>, MaxWords=24, MinWords=8, \
                    MaxFragments=2, FragmentDelimiter=\" … \", ShortWord=0') AS snippet \
FROM ( \
    SELECT ranked.*, \
           coalesce(sum({size}) \
                        OVER (ORDER BY ranked.rank DESC, ranked.conversation_id DESC, \
                                       ranked.sequence DESC \
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 2 PRECEDING), 0) \
               AS before_previous \
    FROM ( \
    SELECT m.id, m.conversation_id, m.sequence, m.role, m.content, m.metadata, m.create_time, \
           m.parts, m.name, m.model, m.input_tokens, m.output_tokens, m.cached_input_tokens, \
           m.reasoning_tokens, \
           ts_rank_cd(m.search_document, websearch_to_tsquery('simple', $2), 32) AS rank \
    FROM messages m \
    WHERE m.user_id = $1 \
      AND m.search_document @@ websearch_to_tsquery('simple', $2) \
      AND ($3::uuid IS NULL OR m.conversation_id = $3) \
      AND ($4::real IS NULL \
           OR (ts_rank_cd(m.search_document, websearch_to_tsquery('simple', $2), 32), \
               m.conversation_id, m.sequence) < ($4::real, $5::uuid, $6::bigint)) \
    ORDER BY rank DESC, m.conversation_id DESC, m.sequence DESC \
    LIMIT $7 \
) AS ranked \
) AS page \
JOIN conversations c ON c.user_id = $1 AND c.id = page.conversation_id \
WHERE page.before_previous < $8 \
ORDER BY page.rank DESC, page.conversation_id DESC, page.sequence DESC",
        size = message_size("ranked")
    )
});

#[derive(QueryableByName)]
struct HitRow {
    #[diesel(embed)]
    message: MessageRow,
    #[diesel(sql_type = Float4)]
    rank: f32,
    #[diesel(sql_type = Text)]
    conversation_title: String,
    #[diesel(sql_type = Text)]
    snippet: String,
}

impl TryFrom<HitRow> for SearchHit {
    type Error = StoreError;

    fn try_from(row: HitRow) -> Result<Self, StoreError> {
        Ok(SearchHit {
            message: Message::try_from(row.message)?,
            conversation_title: row.conversation_title,
            snippet: row.snippet,
            rank: row.rank,
        })
    }
}

/// What a search found, or why it did not look.
#[derive(Debug)]
pub enum SearchOutcome {
    Found(Page<SearchHit, SearchCursor>),
    /// The query only excludes words (`-word`, or `word or -other`): it
    /// would match nearly every message, and no index can serve it.
    MatchesEverything,
    /// Ranking the matches took longer than the search's budget; PostgreSQL
    /// stopped it.
    OverBudget(Duration),
}

/// Bounds the search that follows in the same transaction by `$1`, and tells
/// whether the query `$2` can be served by the index at all: `querytree`
/// returns `T` when nothing of the query is indexable.
const SEARCH_GATE_SQL: &str = "\
SELECT set_config('statement_timeout', $1, true) AS timeout, \
       querytree(websearch_to_tsquery('simple', $2)) = 'T' AS matches_everything";

#[derive(QueryableByName)]
struct Gate {
    #[diesel(sql_type = Bool)]
    matches_everything: bool,
}

impl Store {
    /// Searches the owner's messages within the store's search budget (its
    /// own `statement_timeout`, in a transaction of its own).
    pub async fn search_messages(
        &self,
        owner: &UserId,
        search: &SearchMessages,
        max_bytes: usize,
    ) -> Result<SearchOutcome, StoreError> {
        let (query, conversation, size, after) = (
            &search.query,
            search.conversation_id,
            search.size,
            search.cursor,
        );
        let timeout = self.search_timeout;
        let searched = self
            .with_conn(async |conn| {
                conn.transaction(async |conn| {
                    let gate: Gate = diesel::sql_query(SEARCH_GATE_SQL)
                        .bind::<Text, _>(format!("{}ms", timeout.as_millis()))
                        .bind::<Text, _>(query.as_str())
                        .one_row(conn)
                        .await?;
                    if gate.matches_everything {
                        return Ok(SearchOutcome::MatchesEverything);
                    }
                    let rows: Vec<HitRow> = diesel::sql_query(SEARCH_SQL.as_str())
                        .bind::<Text, _>(owner.as_str())
                        .bind::<Text, _>(query.as_str())
                        .bind::<Nullable<SqlUuid>, _>(conversation.map(|id| *id.as_uuid()))
                        .bind::<Nullable<Float4>, _>(after.map(|c| c.rank))
                        .bind::<Nullable<SqlUuid>, _>(after.map(|c| *c.conversation_id.as_uuid()))
                        .bind::<Nullable<BigInt>, _>(after.map(|c| c.sequence))
                        .bind::<BigInt, _>(size.limit_with_lookahead())
                        .bind::<BigInt, _>(i64::try_from(max_bytes).unwrap_or(i64::MAX))
                        .load(conn)
                        .await?;
                    let hits = rows
                        .into_iter()
                        .map(SearchHit::try_from)
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(SearchOutcome::Found(Page::cut(
                        hits,
                        size,
                        SearchCursor::after,
                    )))
                })
                .await
            })
            .await;
        match searched {
            Err(StoreError::TimedOut(message)) if is_statement_timeout(&message) => {
                Ok(SearchOutcome::OverBudget(timeout))
            }
            other => other,
        }
    }
}
