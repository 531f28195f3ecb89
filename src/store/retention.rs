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

/// Deletes up to `$2` conversations idle since before `$1`, oldest first.
///
/// Safe with several sweepers (replicas) at once, and accepted by Citus (which
/// refuses `FOR UPDATE SKIP LOCKED` across shards): the candidates are read
/// without locks, and the DELETE checks the idle time again on each row it
/// locks, so a conversation written to since is kept, and a row another
/// sweeper deleted first is simply not found (each id is reported once).
///
/// Idle time is compared as `timezone('UTC', update_time)`, the key of
/// `conversations_by_idle_time` (the same order as the column's), so both
/// the candidates and the re-check read that index: an index on the column
/// itself was also chosen for listings, where it read other users'
/// conversations (see its migration, 2026-12-04-000009).
const DELETE_IDLE: &str = "\
    DELETE FROM conversations c \
    WHERE (c.user_id, c.id) IN ( \
        SELECT user_id, id FROM conversations \
        WHERE timezone('UTC', update_time) < timezone('UTC', $1) \
        ORDER BY timezone('UTC', update_time) \
        LIMIT $2 \
    ) \
    AND timezone('UTC', c.update_time) < timezone('UTC', $1) \
    RETURNING c.id";

impl Store {
    /// One batch of the retention policy: deletes conversations (and, by
    /// cascade, their messages) not updated since `idle_before`, and returns
    /// the ids deleted, so the caller can tell their watchers.
    ///
    /// Not scoped by an owner: retention is the operator's policy over all
    /// users, and under Citus a multi-shard statement ([`Store::across_owners`]).
    pub async fn delete_idle_conversations(
        &self,
        idle_before: DateTime<Utc>,
        batch: u32,
    ) -> Result<Vec<ConversationId>, StoreError> {
        self.across_owners(async |conn| {
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
