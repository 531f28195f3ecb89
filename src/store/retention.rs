use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{BigInt, Timestamptz, Uuid as SqlUuid},
};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::ConversationId;

#[derive(QueryableByName)]
struct Deleted {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// Deletes up to `$2` conversations idle since before `$1`, oldest first. Rows
/// another sweeper (another replica) has locked are skipped, not waited for.
const DELETE_IDLE: &str = "\
    WITH doomed AS ( \
        SELECT user_id, id FROM conversations \
        WHERE update_time < $1 \
        ORDER BY update_time \
        LIMIT $2 \
        FOR UPDATE SKIP LOCKED \
    ) \
    DELETE FROM conversations c USING doomed d \
    WHERE c.user_id = d.user_id AND c.id = d.id \
    RETURNING c.id";

impl Store {
    /// One batch of the retention policy: deletes conversations (and, by
    /// cascade, their messages) not updated since `idle_before`, and returns
    /// the ids deleted, so the caller can tell their watchers.
    ///
    /// The one query that is not scoped by an owner: retention is the
    /// operator's policy over all users. Under Citus it is a multi-shard
    /// statement, to be run per shard or replaced by a per-user sweep.
    pub async fn delete_idle_conversations(
        &self,
        idle_before: DateTime<Utc>,
        batch: u32,
    ) -> Result<Vec<ConversationId>, StoreError> {
        self.with_conn(async |conn| {
            let deleted: Vec<Deleted> = diesel::sql_query(DELETE_IDLE)
                .bind::<Timestamptz, _>(idle_before)
                .bind::<BigInt, _>(i64::from(batch))
                .load(conn)
                .await?;
            Ok(deleted
                .into_iter()
                .map(|d| ConversationId::from_uuid(d.id))
                .collect())
        })
        .await
    }
}
