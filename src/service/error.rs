use crate::{domain::ToolCallId, store::StoreError};

/// Why an operation was refused or failed, in the service's terms. The gRPC
/// edge maps each variant to a status in one place (`grpc/error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The caller has no such conversation (it may be someone else's).
    #[error("conversation not found")]
    ConversationNotFound,
    /// A request_id was reused on this conversation with a different payload.
    #[error("request_id was already used with a different payload")]
    RequestIdReused,
    /// `expected_last_sequence` did not match the conversation; nothing was written.
    #[error("expected last sequence {expected}, but the conversation is at {current}")]
    SequenceMismatch { expected: i64, current: i64 },
    /// A fork asked for messages beyond the end of its source; nothing was written.
    #[error("cannot fork up to sequence {requested}: the conversation has {length} messages")]
    ForkBeyondEnd { requested: i64, length: i64 },
    /// A truncation asked to keep more messages than the conversation holds;
    /// nothing was removed.
    #[error("cannot truncate after sequence {requested}: the conversation has {length} messages")]
    TruncateBeyondEnd { requested: i64, length: i64 },
    /// A tool result answers no call made earlier in the conversation or the
    /// batch; nothing was written.
    #[error("no earlier tool call has id {0}")]
    UnansweredToolResult(ToolCallId),
    /// A tool call reuses an id already used in the conversation; nothing was
    /// written.
    #[error("tool call id {0} is already used in this conversation")]
    ToolCallIdTaken(ToolCallId),
    /// The conversation was truncated below a watch stream's position.
    #[error("the conversation was truncated below sequence {position}")]
    WatchTruncated { position: i64 },
    /// The caller, or the whole server, already has as many watch streams
    /// open as allowed.
    #[error("too many watch streams")]
    TooManyWatches(WatchCap),
    /// A search query only excludes words: it would match nearly every
    /// message, and no index can serve it.
    #[error("the search query only excludes words")]
    SearchMatchesEverything,
    /// Ranking a search's matches took longer than the server allows.
    #[error("the search took longer than {0:?} to rank its matches")]
    SearchOverBudget(std::time::Duration),
    /// The server is shutting down; the client should reconnect elsewhere.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The database could not be reached in time; retrying is safe.
    #[error("storage unavailable")]
    Unavailable(#[source] StoreError),
    /// A failure that is not the caller's doing.
    #[error("internal error")]
    Internal(#[source] StoreError),
}

/// Which cap on watch streams was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchCap {
    PerUser(usize),
    Server(usize),
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        // Counted here, where the store's failure kinds are still in view.
        let kind = match &error {
            StoreError::NotFound => return Self::ConversationNotFound,
            StoreError::TimedOut(_) => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Conflict(_) => "conflict",
            StoreError::Database(_) | StoreError::Corrupt(_) | StoreError::InvalidUrl(_) => {
                "internal"
            }
        };
        metrics::counter!("convo_db_errors_total", "kind" => kind).increment(1);
        match error {
            StoreError::Unavailable(_) | StoreError::TimedOut(_) | StoreError::Conflict(_) => {
                Self::Unavailable(error)
            }
            _ => Self::Internal(error),
        }
    }
}
