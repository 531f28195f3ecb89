//! Persistence: the connection pool, the schema, the migrations and every query.
//!
//! Every public function takes the owner's [`UserId`] and scopes its SQL by it;
//! nothing here knows about gRPC or protobuf.

mod changes;
mod conversations;
mod error;
mod messages;
mod migrations;
mod pool;
mod retention;
pub mod schema;
mod search;
mod users;

pub use changes::{ChangeFeed, Subscription, Wake};
pub use conversations::ConversationChanges;
pub use error::StoreError;
pub use messages::{AppendOutcome, MessageOrder};
pub use migrations::{
    create_database_if_missing, ensure_schema_current, revert_last_migration,
    run_pending_migrations,
};
pub use pool::{PoolSettings, Store};
pub use search::SEARCH_SQL;

/// One page of a keyset-paginated listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// True when rows follow the last item.
    pub has_more: bool,
}
