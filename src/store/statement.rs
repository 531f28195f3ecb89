//! Hand-written statements that diesel's DSL cannot express (data-modifying
//! CTEs, unions of two row shapes), prepared once per connection like DSL
//! queries.
//!
//! `diesel::sql_query` is never cached: diesel-async prepares it again at
//! every call, which costs a round trip of its own before the one that runs
//! it. A statement declared with [`prepared_statement!`], or a `sql_query`
//! of a fixed text run through [`fixed`], is kept in the connection's
//! statement cache after its first use, so every later call is one round
//! trip.
//!
//! Its SQL names parameters (`$user`, `$conversation`). A [`Template`], parsed
//! once per statement text, turns them into PostgreSQL's `$1`, `$2`, … in order
//! of first appearance and asks the statement to bind each once, so one value
//! used in several places is sent once.

use std::marker::PhantomData;

use diesel::{
    pg::Pg,
    query_builder::{AstPass, Query, QueryFragment, QueryId, SqlQuery},
    result::{Error as DieselError, QueryResult},
};

/// A statement's SQL, split once at its named parameters.
#[derive(Debug)]
pub(super) struct Template {
    pieces: Vec<Piece>,
}

#[derive(Debug)]
enum Piece {
    Sql(String),
    /// A parameter's first appearance: bound here, becoming `$n`.
    Bind(String),
    /// A later appearance: `$n` again, nothing bound.
    Again(String),
}

impl Template {
    /// Splits `sql` at every `$name` (lower-case letters and `_`); any other
    /// `$` stays SQL text.
    pub(super) fn parse(sql: &str) -> Self {
        let mut pieces = Vec::new();
        let mut seen: Vec<&str> = Vec::new();
        let mut text = String::new();
        let mut rest = sql;
        while let Some(at) = rest.find('$') {
            text.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let len = after
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                text.push('$');
                rest = after;
                continue;
            }
            pieces.push(Piece::Sql(std::mem::take(&mut text)));
            let name = &after[..len];
            pieces.push(match seen.iter().position(|known| *known == name) {
                Some(index) => Piece::Again(format!("${}", index + 1)),
                None => {
                    seen.push(name);
                    Piece::Bind(name.to_owned())
                }
            });
            rest = &after[len..];
        }
        text.push_str(rest);
        pieces.push(Piece::Sql(text));
        Self { pieces }
    }

    /// Writes the statement to `out`, calling `bind(name, out)` (which must
    /// push exactly one bind) at each parameter's first appearance.
    pub(super) fn push<'b>(
        &self,
        out: &mut AstPass<'_, 'b, Pg>,
        mut bind: impl FnMut(&str, &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>,
    ) -> QueryResult<()> {
        for piece in &self.pieces {
            match piece {
                Piece::Sql(text) | Piece::Again(text) => out.push_sql(text),
                Piece::Bind(name) => bind(name, out)?,
            }
        }
        Ok(())
    }

    /// The statement as PostgreSQL receives it, `$1`…`$n`, and `n`.
    pub(super) fn numbered(&self) -> (String, usize) {
        let mut sql = String::new();
        let mut binds = 0;
        for piece in &self.pieces {
            match piece {
                Piece::Sql(text) | Piece::Again(text) => sql.push_str(text),
                Piece::Bind(_) => {
                    binds += 1;
                    sql.push_str(&format!("${binds}"));
                }
            }
        }
        (sql, binds)
    }
}

/// Names one hand-written statement of a fixed text, for [`fixed`].
pub(super) trait FixedText: 'static {
    /// The statement, the same at every call.
    fn text() -> &'static str;
}

/// A statement of one text with its binds, kept prepared on its connection
/// under the type `M`, which stands for that text: built by [`fixed`] (a
/// `sql_query`, which diesel never caches, its text could be anything) or by
/// [`one_text`] (a DSL statement diesel will not cache). Uncached, every call
/// paid a prepare round trip before its own.
pub(super) struct Fixed<M, Q> {
    query: Q,
    text: PhantomData<M>,
}

/// `M`'s statement, its values bound by `bind` (`.bind::<Text, _>(…)`…).
pub(super) fn fixed<M: FixedText, Q>(bind: impl FnOnce(SqlQuery) -> Q) -> Fixed<M, Q> {
    Fixed {
        query: bind(diesel::sql_query(M::text())),
        text: PhantomData,
    }
}

/// A statement built with diesel's DSL that diesel will not keep prepared
/// (it never caches an UPDATE, whose changeset could vary), kept prepared
/// under the type `M`. Only for a statement that writes one text at every
/// call: `M` stands for that text.
pub(super) fn one_text<M: 'static, Q>(query: Q) -> Fixed<M, Q> {
    Fixed {
        query,
        text: PhantomData,
    }
}

impl<M: 'static, Q> QueryId for Fixed<M, Q> {
    type QueryId = M;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<M, Q: Query> Query for Fixed<M, Q> {
    type SqlType = Q::SqlType;
}

impl<M, Q: QueryFragment<Pg>> QueryFragment<Pg> for Fixed<M, Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.query.walk_ast(pass)
    }

    /// The text is `M`'s at every call, which a bare `sql_query` cannot say.
    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

/// Declares `$marker`, the [`FixedText`] standing for the statement `$text`
/// (an expression, evaluated once).
macro_rules! fixed_text {
    ($(#[$meta:meta])* $vis:vis $marker:ident = $text:expr) => {
        $(#[$meta])*
        $vis enum $marker {}

        impl $crate::store::statement::FixedText for $marker {
            fn text() -> &'static str {
                static TEXT: std::sync::LazyLock<String> =
                    std::sync::LazyLock::new(|| String::from($text));
                &TEXT
            }
        }
    };
}

pub(super) use fixed_text;

/// The error for a `$name` that the statement does not bind.
pub(super) fn unknown_parameter(name: &str) -> DieselError {
    DieselError::QueryBuilderError(format!("no value for parameter ${name}").into())
}

/// Declares `$statement<'a>` a cacheable query, given its `QueryFragment<Pg>`
/// impl, whose rows are read by position into a `Queryable` of `sql_type`
/// (or by name, with `Untyped`); diesel-async's `RunQueryDsl` then runs it.
/// It is cached by its type, so it must write one SQL text (a statement of
/// several shapes gives each a type, as the append's `AppendShape` does).
macro_rules! prepared_statement {
    ($statement:ident, sql_type = $sql_type:ty) => {
        impl diesel::query_builder::QueryId for $statement<'_> {
            type QueryId = $statement<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }

        impl diesel::query_builder::Query for $statement<'_> {
            type SqlType = $sql_type;
        }
    };
}

pub(super) use prepared_statement;

/// The statement of a pgbench script under `benches/pgbench`: its lines
/// without the `--` comments, the `\set` meta-commands and the final `;`,
/// for the tests that keep a script equal to the statement convo runs.
#[cfg(test)]
pub(super) fn pgbench_statement(script: &str) -> String {
    script
        .lines()
        .filter(|line| !line.starts_with("--") && !line.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end_matches(';')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use diesel::{
        debug_query,
        query_builder::{QueryFragment, QueryId},
        sql_types::{BigInt, Text},
    };

    use super::*;

    struct Probe<'a> {
        user: &'a str,
        count: i64,
    }

    impl QueryId for Probe<'_> {
        type QueryId = ();
        const HAS_STATIC_QUERY_ID: bool = false;
    }

    impl QueryFragment<Pg> for Probe<'_> {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
            Template::parse("SELECT $user, $count::int8 + 1, $user, '$1'").push(
                &mut out,
                |name, out| match name {
                    "user" => out.push_bind_param::<Text, _>(self.user),
                    "count" => out.push_bind_param::<BigInt, _>(&self.count),
                    other => Err(unknown_parameter(other)),
                },
            )
        }
    }

    #[test]
    fn named_parameters_become_numbered_binds_sent_once() {
        let probe = Probe {
            user: "ada",
            count: 2,
        };
        let shown = debug_query::<Pg, _>(&probe).to_string();
        assert_eq!(
            shown,
            "SELECT $1, $2::int8 + 1, $1, '$1' -- binds: [\"ada\", 2]"
        );
    }

    fixed_text!(LockUser = "SELECT pg_advisory_xact_lock(hashtext($1))");

    /// A `sql_query` of a fixed text is kept prepared: a static query id,
    /// safe to cache, its text exactly `M`'s; a bare one is neither.
    #[test]
    fn a_fixed_text_is_cached_by_its_type() {
        use diesel::pg::Pg;
        let query = super::fixed::<LockUser, _>(|q| q.bind::<Text, _>("alice"));
        assert_eq!(query.is_safe_to_cache_prepared(&Pg).ok(), Some(true));
        assert!(
            <super::Fixed<LockUser, diesel::query_builder::SqlQuery> as QueryId>::query_id()
                .is_some()
        );
        let sql = debug_query::<Pg, _>(&query).to_string();
        assert!(
            sql.starts_with("SELECT pg_advisory_xact_lock(hashtext($1)) -- binds"),
            "{sql}"
        );
        let bare = diesel::sql_query("SELECT 1");
        assert_eq!(bare.is_safe_to_cache_prepared(&Pg).ok(), Some(false));
    }
}
