//! How database failures are classified.
//!
//! diesel-async 0.9 turns a tokio-postgres error into diesel's
//! `DatabaseErrorKind` (unique, foreign key, check, not-null, serialization
//! failure, …) and keeps PostgreSQL's `DbError` only behind
//! `DatabaseErrorInformation`, which exposes the message, detail, hint and
//! names but not the SQLSTATE (`src/pg/error_helper.rs` in diesel-async).
//! There is no supported way to read the code through it, so what has a kind
//! is classified by kind (serialization failures), and the rest, timeouts
//! (55P03, 57014), ended sessions (57P*), deadlocks (40P01) and a Citus
//! coordinator's lost workers (08*), by
//! PostgreSQL's English message. English is made sure of where possible:
//! a pooled session answering in another language is switched with
//! `SET lc_messages = 'C'` (allowed to superusers), the
//! private cluster's application role has `lc_messages = 'C'` set on it, and
//! a session that cannot have English messages is reported once, at warn,
//! with the statement an operator runs to fix it (see `store/pool.rs`).

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::PoolError;

/// Why a store operation failed. Variants are what callers act on; the text of
/// database errors stays inside for the log. A refusal that a write decides
/// inside its transaction (a stale `expected_last_sequence`, a fork past the
/// end) is not a failure: it comes back as the write's outcome.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No row for this owner: missing and foreign rows look the same.
    #[error("not found")]
    NotFound,
    /// The database could not be reached or the pool had no connection in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL cancelled the statement: it waited longer than
    /// `lock_timeout` for a lock or ran longer than `statement_timeout`.
    /// Nothing was written; trying again later is safe.
    #[error("the database cancelled the statement: {0}")]
    TimedOut(String),
    /// PostgreSQL aborted the transaction to resolve a conflict with another
    /// (a deadlock, or a serialization failure). Nothing was written; trying
    /// again is safe.
    #[error("the database aborted a conflicting transaction: {0}")]
    Conflict(String),
    /// The database URL asks for something convo cannot do (an unknown
    /// `sslmode`, an unreadable `sslrootcert`).
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// Any other database failure: a bug or a broken invariant, never the client's doing.
    #[error("database error: {0}")]
    Database(DieselError),
    /// A stored value that the domain types refuse (the schema should prevent it).
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl From<DieselError> for StoreError {
    fn from(error: DieselError) -> Self {
        match error {
            DieselError::NotFound => Self::NotFound,
            DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                ref info,
            ) => Self::Unavailable(info.message().to_owned()),
            // diesel-async keeps the message but not the SQLSTATE of these
            // errors, so they are told apart by PostgreSQL's message; pooled
            // sessions ask for English ones (lc_messages = C).
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if is_timeout(info.message()) =>
            {
                Self::TimedOut(info.message().to_owned())
            }
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, ref info) => {
                Self::Conflict(info.message().to_owned())
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if is_deadlock(info.message()) =>
            {
                Self::Conflict(info.message().to_owned())
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if is_session_ended(info.message()) =>
            {
                Self::Unavailable(info.message().to_owned())
            }
            // Citus: a worker holding this user's shards cannot be reached
            // (08xxx raised by the coordinator on a healthy session).
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if is_node_unreachable(info.message()) =>
            {
                Self::Unavailable(info.message().to_owned())
            }
            DieselError::BrokenTransactionManager => {
                Self::Unavailable("the connection's transaction state was lost".to_owned())
            }
            other => Self::Database(other),
        }
    }
}

impl From<bb8::RunError<PoolError>> for StoreError {
    fn from(error: bb8::RunError<PoolError>) -> Self {
        match error {
            bb8::RunError::TimedOut => {
                Self::Unavailable("timed out waiting for a pooled connection".to_owned())
            }
            bb8::RunError::User(error) => Self::Unavailable(error.to_string()),
        }
    }
}

/// 55P03 lock_not_available and 57014 query_canceled (by a timeout).
fn is_timeout(message: &str) -> bool {
    message.starts_with("canceling statement due to lock timeout") || is_statement_timeout(message)
}

/// 57014 query_canceled by `statement_timeout`.
pub(super) fn is_statement_timeout(message: &str) -> bool {
    message.starts_with("canceling statement due to statement timeout")
}

/// 40P01 deadlock_detected: PostgreSQL chose this transaction to end.
fn is_deadlock(message: &str) -> bool {
    message.starts_with("deadlock detected")
}

/// Class 57P (operator intervention: shutdown, crash of another backend,
/// terminated backend, server starting up or shutting down). The session is
/// gone or going, though the socket may not show it yet.
fn is_session_ended(message: &str) -> bool {
    message.starts_with("terminating connection") || message.starts_with("the database system is")
}

/// The constraint a violation names. A Citus worker's error carries no
/// constraint name, only a message naming the shard's copy of it
/// (`"append_requests_pkey_102030"`): the name is then read from the message
/// and the shard's suffix dropped (convo's constraint names never end in
/// digits).
pub(super) fn violated_constraint(
    info: &dyn diesel::result::DatabaseErrorInformation,
) -> Option<String> {
    if let Some(name) = info.constraint_name() {
        return Some(name.to_owned());
    }
    let quoted = info.message().split('"').nth(1)?;
    let name = match quoted.rsplit_once('_') {
        Some((base, shard)) if !shard.is_empty() && shard.bytes().all(|b| b.is_ascii_digit()) => {
            base
        }
        _ => quoted,
    };
    Some(name.to_owned())
}

/// Citus's connection failures to a worker (class 08, raised on the
/// coordinator): "connection to the remote node …", "connection
/// establishment for node … failed", "could not establish any connections
/// to the node …".
fn is_node_unreachable(message: &str) -> bool {
    message.starts_with("connection to the remote node")
        || message.starts_with("connection establishment for node")
        || message.starts_with("could not establish any connections to the node")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_constraint_is_known_by_its_table_constraint() {
        struct Worker;
        impl diesel::result::DatabaseErrorInformation for Worker {
            fn message(&self) -> &str {
                "duplicate key value violates unique constraint \"append_requests_pkey_102030\""
            }
            fn details(&self) -> Option<&str> {
                None
            }
            fn hint(&self) -> Option<&str> {
                None
            }
            fn table_name(&self) -> Option<&str> {
                None
            }
            fn column_name(&self) -> Option<&str> {
                None
            }
            fn constraint_name(&self) -> Option<&str> {
                None
            }
            fn statement_position(&self) -> Option<i32> {
                None
            }
        }
        assert_eq!(
            violated_constraint(&Worker).as_deref(),
            Some("append_requests_pkey")
        );
    }

    #[test]
    fn postgres_messages_are_classified() {
        assert!(is_timeout("canceling statement due to lock timeout"));
        assert!(is_timeout("canceling statement due to statement timeout"));
        assert!(!is_timeout("canceling statement due to user request"));
        assert!(is_session_ended(
            "terminating connection due to administrator command"
        ));
        assert!(is_session_ended(
            "terminating connection because of crash of another server process"
        ));
        assert!(is_session_ended("the database system is shutting down"));
        assert!(!is_session_ended(
            "duplicate key value violates unique constraint"
        ));
        assert!(is_node_unreachable(
            "connection to the remote node postgres@127.0.0.1:9702 failed with the following \
             error: Connection refused"
        ));
        assert!(is_node_unreachable(
            "connection establishment for node 127.0.0.1:9702 failed"
        ));
        assert!(!is_node_unreachable("relation \"messages\" does not exist"));
        assert!(is_deadlock("deadlock detected"));
        assert!(!is_deadlock(
            "duplicate key value violates unique constraint"
        ));
    }
}
