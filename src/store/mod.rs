//! Persistence: the connection pool, the schema, the migrations and every query.
//!
//! Every public function takes the owner's [`UserId`](crate::domain::UserId)
//! and scopes its SQL by it (the retention sweep, an operator's policy over
//! all users, is the one exception); nothing here knows about gRPC or
//! protobuf. Each table's queries live beside its row types
//! (`conversations.rs`, `messages.rs`, `search.rs`, `users.rs`); the
//! statements of the hot paths, each one statement, have their own
//! (`append.rs`, `resume.rs`, `create.rs`, prepared through `statement.rs`);
//! live changes are in `changes.rs`; conversions
//! of column values shared by them are in `values.rs`.
//!
//! Rules that must hold under concurrency are decided inside the write's
//! transaction, here: sequence allocation under the conversation's row lock,
//! recognising an idempotent replay, `expected_last_sequence`, the fork's
//! bound. A write reports such a refusal as its outcome ([`AppendOutcome`],
//! [`ForkOutcome`]); the service decides what it means for the caller.

mod append;
mod changes;
mod conversations;
mod create;
mod distribute;
mod error;
mod list;
mod list_conversations;
mod messages;
mod migrations;
mod parts;
mod pool;
mod resume;
mod retention;
mod retry;
pub mod schema;
mod script;
mod search;
mod statement;
mod tls;
mod turns;
mod users;
mod values;

pub use append::{AppendOutcome, Follows};
pub use changes::{Appended, ChangeFeed, FeedSettings, Subscription, Wake};
pub use conversations::ForkOutcome;
pub use distribute::{Distribution, Topology};
pub use error::StoreError;
pub use messages::TruncateOutcome;
pub use migrations::{
    create_database_if_missing, distribute, ensure_schema_current, grant_app_role,
    revert_last_migration, run_pending_migrations, wait_for_database,
};
pub use pool::{DatabaseHealth, HealthProbe, PoolSettings, Store};
/// Test support: the statements of the hot paths, and the per-conversation
/// statements of fork and truncate, as PostgreSQL receives them (`$1`…`$n`)
/// with their number of parameters, for the API tests to check their plans.
#[doc(hidden)]
///
/// On a Citus cluster (`citus`), the append is the call of its function.
pub fn hot_statements(citus: bool) -> Vec<(String, String, usize)> {
    let appends = if citus {
        vec![append::by_function()]
    } else {
        append::shapes()
    };
    let mut statements: Vec<(String, String, usize)> = appends
        .into_iter()
        .map(|(name, template)| {
            let (sql, binds) = template.numbered();
            (name, sql, binds)
        })
        .collect();
    let listings = list::shapes()
        .into_iter()
        .chain(list_conversations::shapes());
    statements.extend(listings.map(|(name, template)| {
        let (sql, binds) = template.numbered();
        (name, sql, binds)
    }));
    let (sql, binds) = resume::statement(citus).numbered();
    statements.push(("resume".to_owned(), sql, binds));
    if citus {
        // The rest are PostgreSQL's alone. On Citus a create is a transaction
        // of its own statements, and a statement that writes several tables
        // through CTEs (fork's copy, truncate's cut) is pulled to the
        // coordinator (scale-out rule 11): it works, but it is not one task.
        return statements;
    }
    let (sql, binds) = create::statement().numbered();
    statements.push(("create conversation".to_owned(), sql, binds));
    // Fork's copies and truncate's cut: one conversation's rows each,
    // prepared like the rest.
    use statement::FixedText;
    let per_conversation = [
        ("fork", conversations::Fork::text()),
        ("truncate", messages::Truncate::text()),
    ];
    statements.extend(
        per_conversation
            .map(|(name, sql)| (name.to_owned(), sql.to_owned(), highest_parameter(sql))),
    );
    statements
}

/// The highest `$n` in `sql`: how many values it binds.
fn highest_parameter(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|after| {
            let digits = after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len());
            after[..digits].parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// Test support: the API tests EXPLAIN the search to see its index used.
#[doc(hidden)]
pub use search::{SEARCH_SQL, SearchOutcome};
pub use tls::OpenSessions;
