//! Hand-written statements that diesel's DSL cannot express (data-modifying
//! CTEs, unions of two row shapes), prepared once per connection like DSL
//! queries.
//!
//! `diesel::sql_query` is never cached: diesel-async prepares it again at
//! every call, which costs a round trip of its own before the one that runs
//! it. A statement declared with [`prepared_statement!`] has a static query
//! id, so the connection's statement cache keeps it after its first use and
//! every later call is one round trip.
//!
//! Its SQL names parameters (`$user`, `$conversation`); [`push_named`] turns
//! them into PostgreSQL's `$1`, `$2`, … in order of first appearance and asks
//! the statement to bind each once, so one value used in several places is
//! sent once.

use diesel::{
    pg::Pg,
    query_builder::AstPass,
    result::{Error as DieselError, QueryResult},
};

/// Writes `sql` to `out`, binding each `$name` at its first appearance with
/// `bind(name, out)` (which must push exactly one bind) and repeating its
/// number afterwards.
pub(super) fn push_named<'b>(
    out: &mut AstPass<'_, 'b, Pg>,
    sql: &'static str,
    mut bind: impl FnMut(&str, &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>,
) -> QueryResult<()> {
    let mut seen: Vec<&str> = Vec::new();
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_sql(&rest[..at]);
        let after = &rest[at + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(after.len());
        if len == 0 {
            return Err(DieselError::QueryBuilderError(
                format!("a '$' without a parameter name in: {sql}").into(),
            ));
        }
        let name = &after[..len];
        match seen.iter().position(|known| *known == name) {
            Some(index) => out.push_sql(&format!("${}", index + 1)),
            None => {
                seen.push(name);
                bind(name, out)?;
            }
        }
        rest = &after[len..];
    }
    out.push_sql(rest);
    Ok(())
}

/// The error for a `$name` that the statement does not bind.
pub(super) fn unknown_parameter(name: &str) -> DieselError {
    DieselError::QueryBuilderError(format!("no value for parameter ${name}").into())
}

/// Declares `$statement<'a>` a cacheable query whose rows are read by name
/// (`QueryableByName`), given its `QueryFragment<Pg>` impl; diesel-async's
/// `RunQueryDsl` then runs it.
/// `sql_type = (…)` instead reads rows by position into a `Queryable` (no
/// lookup of each column by name in every row: for statements that return
/// many rows).
macro_rules! prepared_statement {
    ($statement:ident) => {
        prepared_statement!($statement, sql_type = diesel::sql_types::Untyped);
    };
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
            push_named(
                &mut out,
                "SELECT $user, $count::int8 + 1, $user",
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
        assert_eq!(shown, "SELECT $1, $2::int8 + 1, $1 -- binds: [\"ada\", 2]");
    }
}
